//! The cluster CA: made once at install time, loaded by every agent, signing short-lived
//! identities.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PublicKeyData, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::{Error, PeerName, CA_CERT_FILE, CA_KEY_FILE, CA_SECRET, CLOCK_SKEW};

/// The CA's name constraint: it can only vouch for names under this domain (node identities,
/// the administrators' identity), so trusting it anywhere else grants nothing more.
const PERMITTED_DOMAIN: &str = "katamaran.io";

/// The cluster CA: every certificate of `ca.crt` (all trusted as roots) and the key of one of
/// them (the newest CA, which signs).
pub struct ClusterCa {
    roots: Vec<CertificateDer<'static>>,
    bundle_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("roots", &self.roots.len()).finish_non_exhaustive()
    }
}

/// A certificate (with its chain, without the root) and its private key.
pub struct Identity {
    /// Who the certificate names.
    pub name: PeerName,
    /// The leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn offset(t: SystemTime, what: &str) -> Result<OffsetDateTime, Error> {
    // Certificates carry whole seconds.
    let secs = t.duration_since(UNIX_EPOCH).map_err(|_| Error::Validity { what: what.to_owned() })?.as_secs();
    let secs = i64::try_from(secs).map_err(|_| Error::Validity { what: what.to_owned() })?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|_| Error::Validity { what: what.to_owned() })
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |source| Error::Generate { what: what.to_owned(), source }
}

impl ClusterCa {
    /// A new CA (ECDSA P-256, self-signed) valid for `validity` from now, constrained to names
    /// under `katamaran.io`.
    ///
    /// # Errors
    /// [`Error::Generate`] or [`Error::Validity`].
    pub fn generate(validity: Duration) -> Result<Self, Error> {
        let what = "the cluster CA";
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate(what))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "katamaran.io");
        // A distinct subject per CA, so that old and new CAs of a rotation are told apart:
        // certificate paths are built by subject name.
        let stamp = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag).map_err(|e| Error::Random(e.to_string()))?;
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        dn.push(DnType::CommonName, format!("katamaran agent CA {stamp}-{tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName(PERMITTED_DOMAIN.to_owned())],
            excluded_subtrees: Vec::new(),
        });
        params.not_before = offset(now - CLOCK_SKEW, what)?;
        params.not_after = offset(
            now.checked_add(validity).ok_or_else(|| Error::Validity { what: what.to_owned() })?,
            what,
        )?;
        let cert = params.self_signed(&key).map_err(generate(what))?;
        Self::from_pem(&cert.pem(), &key.serialize_pem(), what)
    }

    /// The CA from PEM: `cert_pem` holds one or more CA certificates (all trusted), `key_pem`
    /// the key of one of them, which signs. `what` names the input in errors.
    ///
    /// # Errors
    /// [`Error::Certificate`] (none, or one that cannot be parsed), [`Error::Key`],
    /// [`Error::KeyMismatch`], [`Error::NotCa`].
    pub fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, Error> {
        let roots = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Certificate { what: what.to_owned(), why: format!("bad PEM: {e}") })?;
        if roots.is_empty() {
            return Err(Error::Certificate { what: what.to_owned(), why: "no certificate in it".into() });
        }
        let key =
            KeyPair::from_pem(key_pem).map_err(|source| Error::Key { what: what.to_owned(), source })?;
        let spki = key.subject_public_key_info();
        let mut signer = None;
        for (i, der) in roots.iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| Error::Certificate {
                what: what.to_owned(),
                why: format!("certificate {} cannot be parsed: {e}", i + 1),
            })?;
            if cert.public_key().raw == spki.as_slice() {
                if !cert.is_ca() {
                    return Err(Error::NotCa { what: what.to_owned() });
                }
                signer = Some(der.clone());
            }
        }
        let Some(signer) = signer else {
            return Err(Error::KeyMismatch { what: what.to_owned(), count: roots.len() });
        };
        let issuer = Issuer::from_ca_cert_der(&signer, key).map_err(|e| Error::Certificate {
            what: what.to_owned(),
            why: format!("the CA certificate of the key cannot sign: {e}"),
        })?;
        Ok(Self { roots, bundle_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer })
    }

    /// The CA from `dir/ca.crt` and `dir/ca.key` (the mounted Secret).
    ///
    /// # Errors
    /// [`Error::Read`], and those of [`Self::from_pem`].
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
        };
        Self::from_pem(&read(CA_CERT_FILE)?, &read(CA_KEY_FILE)?, &dir.display().to_string())
    }

    /// The trusted CA certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// `ca.crt`: every CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// `ca.key`: the signing key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A certificate for `name`, valid from a little before now (clock skew) for `lifetime`.
    ///
    /// # Errors
    /// [`Error::Generate`] or [`Error::Validity`].
    pub fn issue(&self, name: &PeerName, lifetime: Duration) -> Result<Identity, Error> {
        let now = SystemTime::now();
        let until = now
            .checked_add(lifetime)
            .ok_or_else(|| Error::Validity { what: format!("the certificate of {name}") })?;
        self.issue_between(name, now - CLOCK_SKEW, until)
    }

    /// A certificate for `name` valid from `not_before` to `not_after` (tests issue expired
    /// ones with it). A node's certificate serves and calls (serverAuth, clientAuth); the
    /// administrators' only calls (clientAuth).
    ///
    /// # Errors
    /// [`Error::Generate`] or [`Error::Validity`].
    pub fn issue_between(
        &self,
        name: &PeerName,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Identity, Error> {
        let what = format!("the certificate of {name}");
        let dns = name.dns_name();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate(&what))?;
        let mut params = CertificateParams::new(vec![dns.clone()]).map_err(generate(&what))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match name {
            PeerName::Node(_) => {
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
            }
            PeerName::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(not_before, &what)?;
        params.not_after = offset(not_after, &what)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate(&what))?;
        Ok(Identity {
            name: name.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }

    /// The Secret `katamaran-agent-ca` in `namespace` holding this CA, as a YAML manifest for
    /// `kubectl apply -f -`.
    pub fn secret_manifest(&self, namespace: &str) -> String {
        let indent = |pem: &str| pem.lines().map(|l| format!("    {l}\n")).collect::<String>();
        format!(
            "# The katamaran agents' CA (docs/SECURITY.md): whoever holds ca.key can act as any agent.\n\
             apiVersion: v1\n\
             kind: Secret\n\
             metadata:\n  name: {CA_SECRET}\n  namespace: {namespace}\n  labels:\n    \
             app.kubernetes.io/name: katamaran-agent\n    app.kubernetes.io/part-of: katamaran\n\
             type: Opaque\n\
             stringData:\n  {CA_CERT_FILE}: |\n{}  {CA_KEY_FILE}: |\n{}",
            indent(&self.bundle_pem),
            indent(&self.key_pem)
        )
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, created 0700 if missing. Existing
    /// files are never replaced.
    ///
    /// # Errors
    /// [`Error::Write`].
    pub fn write_dir(&self, dir: &Path) -> Result<(), Error> {
        crate::private_files::write(
            dir,
            true,
            &[(CA_CERT_FILE, &self.bundle_pem), (CA_KEY_FILE, &self.key_pem)],
        )
        .map_err(|(path, source)| Error::Write { path, source })
    }
}
