//! Encryption of the data streams: per-migration credentials for QEMU's own TLS on the RAM and
//! NBD streams.
//!
//! The handshake ([`super::handshake`]) proves a connection belongs to the migration; TLS inside
//! it, run by the two QEMUs, keeps guest RAM and disk contents unreadable and unalterable on the
//! wire, also to someone on the path who relays the handshake.
//!
//! The destination agent makes the credentials in `PrepareIncoming`: a CA that exists for this
//! one migration (its key is dropped as soon as the two leaves are signed), a server certificate
//! for its QEMU and a client certificate for the source's QEMU. Its QEMU gets the server side;
//! the client side travels back in the answer and on to the source in `StartMigration`, over
//! the authenticated control channel (mutual TLS between agents, or the node's root-only unix
//! socket), as the stream secret does. QEMU's `tls-creds-x509` trusts a CA file, not a
//! fingerprint, and the destination's QEMU must trust its client before the source takes part,
//! so the destination makes both. Each QEMU reads its files once when the credentials object
//! is created; the agents delete them right after.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

/// The name in the destination's certificate, which the source's QEMU checks (`tls-hostname`).
/// Trust comes from the per-migration CA, so one fixed name serves every migration.
pub const SERVER_NAME: &str = "destination.stream.katamaran.io";

/// How long the certificates are valid: from an hour before now (clock skew between nodes) to
/// a week after, longer than any migration's streams take to connect.
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

/// The finite-field Diffie-Hellman group `ffdhe2048` of RFC 7919 (Appendix A.1), as PKCS#3 PEM,
/// given to the server QEMU as `dh-params.pem`. Without it QEMU generates a group when the
/// credentials are created, which took 85 to 380 ms on the lab machine and sat on the way to
/// the source's start; with it, `object-add` takes 2 ms. TLS 1.3 with ECDSA keys uses ECDHE,
/// so the group only serves a peer that would fall back to DHE.
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Upper bound of one PEM field received from the network (a P-256 certificate is ~600 bytes).
const MAX_PEM: usize = 8 * 1024;

/// Why stream credentials could not be made or were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Making a key or certificate failed.
    #[error("cannot make the stream TLS credentials: {0}")]
    Generate(String),
    /// Received credentials that are not what the destination makes.
    #[error("invalid stream TLS credentials: {0}")]
    Invalid(String),
    /// Writing the files QEMU reads failed.
    #[error("cannot write the stream TLS files to {path}")]
    Write {
        /// The file or directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Which end of the TLS session a QEMU is (`tls-creds-x509`'s `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The destination: serves the RAM stream and the NBD exports.
    Server,
    /// The source: connects.
    Client,
}

impl Endpoint {
    /// As QEMU spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Client => "client",
        }
    }
}

/// One side's credentials: the per-migration CA, its own certificate and key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct StreamCredentials {
    /// The per-migration CA certificate, the only one trusted.
    pub ca_pem: String,
    /// This side's certificate, signed by the CA.
    pub cert_pem: String,
    /// This side's private key (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for StreamCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamCredentials").finish_non_exhaustive()
    }
}

/// Both sides' credentials of one migration.
#[derive(Debug)]
pub struct CredentialPair {
    /// For the destination's QEMU.
    pub server: StreamCredentials,
    /// For the source's QEMU.
    pub client: StreamCredentials,
}

fn offset(t: SystemTime) -> Result<OffsetDateTime, TlsError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .ok_or_else(|| TlsError::Generate("the clock is before 1970".into()))?;
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| TlsError::Generate(e.to_string()))
}

fn gen(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl CredentialPair {
    /// Fresh credentials for migration `migration_id` (ECDSA P-256): a CA whose key is gone when
    /// this returns, a server and a client certificate.
    ///
    /// # Errors
    /// [`TlsError::Generate`].
    pub fn generate(migration_id: &str) -> Result<Self, TlsError> {
        let now = SystemTime::now();
        let not_before = offset(now - CLOCK_SKEW)?;
        let not_after = offset(now + VALIDITY)?;
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let mut ca = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "katamaran.io");
        dn.push(DnType::CommonName, format!("katamaran stream CA {migration_id}"));
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = not_before;
        ca.not_after = not_after;
        let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<StreamCredentials, TlsError> {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
            let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(gen)?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name);
            params.distinguished_name = dn;
            // QEMU requires both usages when the extension is present (it checks for RSA key
            // exchange too); GnuTLS uses the first with ECDSA.
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            params.not_before = not_before;
            params.not_after = not_after;
            let cert = params.signed_by(&key, &issuer).map_err(gen)?;
            Ok(StreamCredentials {
                ca_pem: ca_pem.clone(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
        };
        Ok(Self {
            server: leaf(SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?,
            client: leaf("source.stream.katamaran.io", ExtendedKeyUsagePurpose::ClientAuth)?,
        })
    }
}

impl StreamCredentials {
    /// Checks credentials received from the network before they reach QEMU: bounded sizes, one
    /// CA certificate, one certificate it issued that is not a CA and is meant for `endpoint`,
    /// and the key of that certificate.
    ///
    /// # Errors
    /// [`TlsError::Invalid`] naming what is wrong.
    pub fn validate(&self, endpoint: Endpoint) -> Result<(), TlsError> {
        let invalid = |why: String| TlsError::Invalid(why);
        for (field, value) in [("CA", &self.ca_pem), ("certificate", &self.cert_pem), ("key", &self.key_pem)]
        {
            if value.is_empty() || value.len() > MAX_PEM {
                return Err(invalid(format!("the {field} is {} bytes (1 to {MAX_PEM})", value.len())));
            }
        }
        let one = |pem: &str, field: &str| -> Result<CertificateDer<'static>, TlsError> {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(format!("the {field} is not PEM: {e}")))?;
            match <[_; 1]>::try_from(certs) {
                Ok([cert]) => Ok(cert),
                Err(certs) => {
                    Err(invalid(format!("the {field} holds {} certificates, not one", certs.len())))
                }
            }
        };
        let ca_der = one(&self.ca_pem, "CA")?;
        let cert_der = one(&self.cert_pem, "certificate")?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| invalid(format!("the CA cannot be parsed: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| invalid(format!("the certificate cannot be parsed: {e}")))?;
        if !ca.is_ca() {
            return Err(invalid("the CA certificate is not a CA".into()));
        }
        if cert.is_ca() {
            return Err(invalid("the certificate is a CA".into()));
        }
        if cert.issuer() != ca.subject() {
            return Err(invalid("the certificate was not issued by the CA".into()));
        }
        let wanted = match endpoint {
            Endpoint::Server => "serverAuth",
            Endpoint::Client => "clientAuth",
        };
        let usage = cert.extended_key_usage().ok().flatten().map(|e| {
            if endpoint == Endpoint::Server {
                e.value.server_auth
            } else {
                e.value.client_auth
            }
        });
        if usage != Some(true) {
            return Err(invalid(format!("the certificate is not for {wanted}")));
        }
        let key =
            KeyPair::from_pem(&self.key_pem).map_err(|e| invalid(format!("the key cannot be read: {e}")))?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(invalid("the key does not belong to the certificate".into()));
        }
        Ok(())
    }

    /// Writes the files QEMU's `tls-creds-x509` reads for `endpoint` into a new directory
    /// `dir` (0700, files 0600): `ca-cert.pem`, `<endpoint>-cert.pem`, `<endpoint>-key.pem`, and
    /// on the server `dh-params.pem`.
    ///
    /// # Errors
    /// [`TlsError::Write`], also when `dir` exists already.
    pub fn write_dir(&self, dir: &Path, endpoint: Endpoint) -> Result<(), TlsError> {
        let side = endpoint.as_str();
        let (cert, key) = (format!("{side}-cert.pem"), format!("{side}-key.pem"));
        let mut files =
            vec![("ca-cert.pem", self.ca_pem.as_str()), (&cert, &self.cert_pem), (&key, &self.key_pem)];
        if endpoint == Endpoint::Server {
            files.push(("dh-params.pem", FFDHE2048_PEM));
        }
        crate::private_files::write(dir, false, &files)
            .map_err(|(path, source)| TlsError::Write { path: path.display().to_string(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_validate_for_their_own_endpoint_only() {
        let pair = CredentialPair::generate("m-1").expect("generate");
        pair.server.validate(Endpoint::Server).expect("server side");
        pair.client.validate(Endpoint::Client).expect("client side");
        assert_eq!(pair.server.ca_pem, pair.client.ca_pem, "one CA for both");
        let err = pair.client.validate(Endpoint::Server).expect_err("a client certificate cannot serve");
        assert!(err.to_string().contains("not for serverAuth"), "{err}");
        assert!(!format!("{:?}", pair.client).contains("PRIVATE"), "Debug hides the key");
    }

    #[test]
    fn foreign_or_malformed_credentials_are_refused_naming_the_field() {
        let pair = CredentialPair::generate("m-1").expect("generate");
        let other = CredentialPair::generate("m-2").expect("generate");
        let cases = [
            (
                StreamCredentials { ca_pem: other.client.ca_pem.clone(), ..pair.client.clone() },
                "not issued by the CA",
            ),
            (
                StreamCredentials { key_pem: other.client.key_pem.clone(), ..pair.client.clone() },
                "does not belong",
            ),
            (StreamCredentials { ca_pem: pair.client.cert_pem.clone(), ..pair.client.clone() }, "not a CA"),
            (StreamCredentials { cert_pem: pair.client.ca_pem.clone(), ..pair.client.clone() }, "is a CA"),
            (
                StreamCredentials {
                    cert_pem: format!("{}{}", pair.client.cert_pem, pair.client.cert_pem),
                    ..pair.client.clone()
                },
                "holds 2 certificates",
            ),
            (
                StreamCredentials { key_pem: "x".repeat(MAX_PEM + 1), ..pair.client.clone() },
                "the key is 8193 bytes",
            ),
            (StreamCredentials { ca_pem: String::new(), ..pair.client.clone() }, "the CA is 0 bytes"),
            (
                StreamCredentials { key_pem: "not a key".into(), ..pair.client.clone() },
                "the key cannot be read",
            ),
        ];
        for (creds, want) in cases {
            let err = creds.validate(Endpoint::Client).expect_err(want);
            assert!(err.to_string().contains(want), "{err} (wanted {want:?})");
        }
    }

    #[test]
    fn files_are_private_and_named_as_qemu_reads_them() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let pair = CredentialPair::generate("m").expect("generate");
        let dir = tmp.path().join("tls");
        pair.server.write_dir(&dir, Endpoint::Server).expect("write");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for name in ["ca-cert.pem", "server-cert.pem", "server-key.pem", "dh-params.pem"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        assert_eq!(std::fs::read_to_string(dir.join("server-key.pem")).expect("read"), pair.server.key_pem);
        let again = pair.server.write_dir(&dir, Endpoint::Server).expect_err("exists");
        assert!(again.to_string().contains(&dir.display().to_string()), "{again}");
    }
}
