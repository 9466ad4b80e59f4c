//! RBAC as the API server evaluates it, from the YAML in deploy/ plus bindings a test adds:
//! ClusterRoles and Roles (apiGroups, resources with `res/sub`, verbs, resourceNames, `*`),
//! ClusterRoleBindings (everywhere) and RoleBindings (their namespace only, to a Role or a
//! ClusterRole), subjects User, Group and ServiceAccount (whose user is
//! `system:serviceaccount:NS:NAME`, in the groups `system:serviceaccounts` and
//! `system:serviceaccounts:NS`). Aggregation is not evaluated.

use std::path::Path;

use serde_json::Value;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn user(name: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        groups.push("system:authenticated".to_owned());
        Self { name: name.to_owned(), groups }
    }

    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self::user(
            &format!("system:serviceaccount:{namespace}:{name}"),
            &["system:serviceaccounts", &format!("system:serviceaccounts:{namespace}")],
        )
    }
}

/// What is asked: the API server's authorization attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// The API server's sentence for a denial.
    pub fn forbidden(&self, user: &UserInfo) -> String {
        let what = match &self.name {
            Some(n) => {
                let qualified = if self.group.is_empty() {
                    self.resource.clone()
                } else {
                    format!("{}.{}", self.resource, self.group)
                };
                format!("{qualified} \"{n}\" is forbidden")
            }
            None => "forbidden".to_owned(),
        };
        let resource = match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        };
        let scope = match &self.namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_owned(),
        };
        format!(
            "{what}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\"{scope}",
            user.name, self.verb, self.group
        )
    }
}

#[derive(Debug, Clone)]
struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
}

#[derive(Debug, Clone)]
struct Role {
    /// None: a ClusterRole.
    namespace: Option<String>,
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Binding {
    /// None: a ClusterRoleBinding.
    namespace: Option<String>,
    role_kind: String,
    role_name: String,
    subjects: Vec<(String, String, Option<String>)>,
}

#[derive(Debug, Clone, Default)]
pub struct Rbac {
    roles: Vec<Role>,
    bindings: Vec<Binding>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

impl Rbac {
    /// The RBAC objects of these files under the repository's deploy/.
    pub fn from_deploy(files: &[&str]) -> Self {
        let mut rbac = Self::default();
        for f in files {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(f);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            rbac.add_yaml(&text);
        }
        rbac
    }

    pub fn add_yaml(&mut self, text: &str) {
        for doc in serde_saphyr::from_multiple::<Value>(text).unwrap() {
            self.add(&doc);
        }
    }

    pub fn add(&mut self, doc: &Value) {
        let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = doc["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        match doc["kind"].as_str() {
            Some(kind @ ("ClusterRole" | "Role")) => {
                let rules = doc["rules"]
                    .as_array()
                    .map(|rules| {
                        rules
                            .iter()
                            .map(|r| Rule {
                                groups: strings(&r["apiGroups"]),
                                resources: strings(&r["resources"]),
                                verbs: strings(&r["verbs"]),
                                names: strings(&r["resourceNames"]),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let namespace = if kind == "Role" { ns } else { None };
                self.roles.push(Role { namespace, name, rules });
            }
            Some(kind @ ("ClusterRoleBinding" | "RoleBinding")) => {
                let subjects = doc["subjects"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .map(|s| {
                                (
                                    s["kind"].as_str().unwrap_or_default().to_owned(),
                                    s["name"].as_str().unwrap_or_default().to_owned(),
                                    s["namespace"].as_str().map(str::to_owned),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                self.bindings.push(Binding {
                    namespace: if kind == "RoleBinding" { ns } else { None },
                    role_kind: doc["roleRef"]["kind"].as_str().unwrap_or_default().to_owned(),
                    role_name: doc["roleRef"]["name"].as_str().unwrap_or_default().to_owned(),
                    subjects,
                });
            }
            _ => {}
        }
    }

    /// Binds `cluster_role` to a user in `namespace` (a RoleBinding) or everywhere (None).
    pub fn bind(&mut self, cluster_role: &str, namespace: Option<&str>, user: &str) {
        self.bindings.push(Binding {
            namespace: namespace.map(str::to_owned),
            role_kind: "ClusterRole".to_owned(),
            role_name: cluster_role.to_owned(),
            subjects: vec![("User".to_owned(), user.to_owned(), None)],
        });
    }

    pub fn allows(&self, user: &UserInfo, a: &Attributes) -> bool {
        self.bindings.iter().any(|b| {
            let in_scope = match (&b.namespace, &a.namespace) {
                (None, _) => true,
                (Some(bns), Some(ns)) => bns == ns,
                (Some(_), None) => false,
            };
            in_scope
                && b.subjects.iter().any(|s| subject_matches(s, user))
                && self
                    .roles
                    .iter()
                    .filter(|r| {
                        r.name == b.role_name
                            && match b.role_kind.as_str() {
                                "ClusterRole" => r.namespace.is_none(),
                                _ => r.namespace.is_some() && r.namespace == b.namespace,
                            }
                    })
                    .any(|r| r.rules.iter().any(|rule| rule_matches(rule, a)))
        })
    }
}

fn subject_matches((kind, name, ns): &(String, String, Option<String>), user: &UserInfo) -> bool {
    match kind.as_str() {
        "User" => &user.name == name,
        "Group" => user.groups.contains(name),
        "ServiceAccount" => {
            user.name == format!("system:serviceaccount:{}:{name}", ns.as_deref().unwrap_or_default())
        }
        _ => false,
    }
}

fn rule_matches(rule: &Rule, a: &Attributes) -> bool {
    let any = |list: &[String], want: &str| list.iter().any(|x| x == "*" || x == want);
    let resource = match &a.subresource {
        Some(s) => format!("{}/{s}", a.resource),
        None => a.resource.clone(),
    };
    let resource_ok = rule.resources.iter().any(|r| {
        r == "*" || *r == resource || a.subresource.as_ref().is_some_and(|s| *r == format!("*/{s}"))
    });
    any(&rule.groups, &a.group)
        && resource_ok
        && any(&rule.verbs, &a.verb)
        && (rule.names.is_empty() || a.name.as_ref().is_some_and(|n| rule.names.contains(n)))
}
