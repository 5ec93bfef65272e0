//! Gateway credentials from remote clusters' Kubernetes Secrets: the hub's side.
//!
//! A `Credential` with `spec.kubernetesSecret` names a Secret of a remote cluster.
//! The hub asks that cluster's agent for it ([`requested`]: only Secrets of the
//! environments this replica serves, and only in namespaces and environments the
//! cluster's `RemoteCluster` grant covers), checks the key material the agent sends
//! ([`validate`]: the chain and key parse, the key matches the leaf, the leaf is valid
//! now), and hands the result to the index, which keeps it in memory only (never in
//! the store) and serves it over SDS like any credential. A Secret that turns invalid
//! or is deleted leaves the last good pair served, and is reported.

use std::collections::BTreeSet;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::authz::export_refusal;
use crate::model::{Credential, Mesh, ObjectKey, SecretRef};

/// What one update from an agent means for the credential it backs.
#[derive(Clone, PartialEq)]
pub enum SecretEvent {
    /// A valid certificate chain and key; the leaf expires at `not_after`.
    Valid {
        credential: Credential,
        not_after: SystemTime,
    },
    /// Not usable (why): the last good pair stays served.
    Invalid(String),
    /// Deleted in its cluster (or never created): the last good pair stays served.
    Deleted,
}

impl std::fmt::Debug for SecretEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // `Credential`'s own `Debug` redacts the key.
            SecretEvent::Valid {
                credential,
                not_after,
            } => f
                .debug_struct("Valid")
                .field("credential", credential)
                .field("not_after", not_after)
                .finish(),
            SecretEvent::Invalid(why) => f.debug_tuple("Invalid").field(why).finish(),
            SecretEvent::Deleted => f.write_str("Deleted"),
        }
    }
}

/// The Secrets (namespace/name) that `cluster`'s agent must send this replica: those
/// named by credentials of the environments it serves (`serves`), in `cluster`, and
/// granted to it; and the ones not asked for because the grant does not cover them,
/// with why. `certified`: the agent holds a certificate (a cluster without a
/// `RemoteCluster` entry is then refused everything, as for its services).
pub fn requested(
    mesh: &Mesh,
    cluster: &str,
    certified: bool,
    serves: impl Fn(&str) -> bool,
) -> (BTreeSet<ObjectKey>, Vec<(SecretRef, String)>) {
    let mut asked = BTreeSet::new();
    let mut refused = Vec::new();
    for (env, e) in &mesh.environments {
        for secret in e.secret_credentials.values() {
            if secret.cluster != cluster || !serves(env) {
                continue;
            }
            match export_refusal(
                &mesh.security.remote_clusters,
                cluster,
                certified,
                env,
                &secret.namespace,
            ) {
                Some(why) => refused.push((secret.clone(), why)),
                None => {
                    asked.insert(ObjectKey {
                        namespace: secret.namespace.clone(),
                        name: secret.name.clone(),
                    });
                }
            }
        }
    }
    // A Secret refused for one environment but asked for another is asked for.
    refused.retain(|(s, _)| {
        !asked.contains(&ObjectKey {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        })
    });
    (asked, refused)
}

/// Checks a Secret's `tls.crt` and `tls.key`: PEM, at least one certificate (the leaf
/// first) that parses as X.509 and is valid at `now`, a private key (PKCS#8, PKCS#1
/// or SEC1) that matches the leaf. Wildcard SANs are fine. The error never quotes the
/// key.
pub fn validate(chain: &[u8], key: &[u8], now: SystemTime) -> Result<SecretEvent, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: not a PEM certificate chain ({e})"))?;
    let Some(leaf) = certs.first() else {
        return Err("tls.crt: no CERTIFICATE block".into());
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("tls.crt: the first certificate does not parse as X.509: {e}"))?;
    let validity = parsed.validity();
    let not_before: SystemTime = to_system_time(validity.not_before.timestamp());
    let not_after: SystemTime = to_system_time(validity.not_after.timestamp());
    if now > not_after {
        return Err(format!(
            "tls.crt: the certificate expired at {} ({})",
            humantime::format_rfc3339_seconds(not_after),
            subject(&parsed)
        ));
    }
    if now < not_before {
        return Err(format!(
            "tls.crt: the certificate is not valid before {} ({})",
            humantime::format_rfc3339_seconds(not_before),
            subject(&parsed)
        ));
    }
    let private_key = PrivateKeyDer::from_pem_slice(key).map_err(|_| {
        "tls.key: not a PEM private key (PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY)"
            .to_string()
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private_key)
        .map_err(|e| format!("tls.key: unsupported private key ({e})"))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "tls.key does not match the certificate's public key ({})",
                subject(&parsed)
            ));
        }
        // The key's public half could not be derived to compare: the handshake
        // would tell; nothing here says it is wrong.
        Err(_) => {}
    }
    let text = |what: &str, b: &[u8]| {
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: PEM must be ASCII text"))
    };
    Ok(SecretEvent::Valid {
        credential: Credential {
            certificate_pem: text("tls.crt", chain)?,
            private_key_pem: text("tls.key", key)?,
        },
        not_after,
    })
}

fn to_system_time(unix: i64) -> SystemTime {
    let secs = std::time::Duration::from_secs(unix.unsigned_abs());
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + secs
    } else {
        SystemTime::UNIX_EPOCH - secs
    }
}

fn subject(cert: &x509_parser::certificate::X509Certificate<'_>) -> String {
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(ToString::to_string)
                .collect()
        })
        .unwrap_or_default();
    if sans.is_empty() {
        format!("subject {}", cert.subject())
    } else {
        format!("SANs {}", sans.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn issue(names: &[&str], not_after: time::OffsetDateTime) -> (String, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = not_after;
        (params.self_signed(&key).unwrap().pem(), key)
    }

    #[test]
    fn a_valid_wildcard_pair_is_taken_and_bad_ones_say_why() {
        let later = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        let (cert, key) = issue(&["*.example.test"], later);
        let now = SystemTime::now();
        let ok = validate(cert.as_bytes(), key.serialize_pem().as_bytes(), now).unwrap();
        assert!(
            matches!(ok, SecretEvent::Valid { ref credential, .. } if credential.certificate_pem == cert)
        );

        let other = rcgen::KeyPair::generate().unwrap();
        let err = validate(cert.as_bytes(), other.serialize_pem().as_bytes(), now).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        assert!(
            err.contains("*.example.test"),
            "names the certificate: {err}"
        );
        assert!(!err.contains("PRIVATE"), "{err}");

        let err = validate(
            cert.as_bytes(),
            key.serialize_pem().as_bytes(),
            now + Duration::from_secs(31 * 86_400),
        )
        .unwrap_err();
        assert!(err.contains("expired"), "{err}");

        let err = validate(b"garbage", key.serialize_pem().as_bytes(), now).unwrap_err();
        assert!(err.starts_with("tls.crt"), "{err}");
        let err = validate(cert.as_bytes(), b"garbage", now).unwrap_err();
        assert!(err.starts_with("tls.key"), "{err}");
    }

    #[test]
    fn only_granted_secrets_of_served_environments_are_requested() {
        let yaml = r#"
apiVersion: tributary.io/v1alpha1
kind: RemoteCluster
metadata: {name: east}
spec: {environments: [prod], namespaces: [shop]}
---
apiVersion: tributary.io/v1alpha1
kind: Credential
metadata: {name: a, environment: prod}
spec: {kubernetesSecret: {cluster: east, namespace: shop, name: wild}}
---
apiVersion: tributary.io/v1alpha1
kind: Credential
metadata: {name: b, environment: prod}
spec: {kubernetesSecret: {cluster: east, namespace: secret-place, name: wild}}
---
apiVersion: tributary.io/v1alpha1
kind: Credential
metadata: {name: c, environment: staging}
spec: {kubernetesSecret: {cluster: east, namespace: shop, name: other}}
---
apiVersion: tributary.io/v1alpha1
kind: Credential
metadata: {name: d, environment: prod}
spec: {kubernetesSecret: {cluster: west, namespace: shop, name: wild}}
"#;
        let mesh = crate::config::parse_files([("c.yaml", yaml)]).unwrap();
        let (asked, refused) = requested(&mesh, "east", true, |_| true);
        let key = |ns: &str, n: &str| ObjectKey {
            namespace: ns.into(),
            name: n.into(),
        };
        assert_eq!(asked, [key("shop", "wild")].into());
        let mut why: Vec<String> = refused.iter().map(|(s, w)| format!("{s}: {w}")).collect();
        why.sort();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why[0].contains("east/secret-place/wild") && why[0].contains("may export namespaces"),
            "{why:?}"
        );
        assert!(
            why[1].contains("east/shop/other") && why[1].contains("environments"),
            "{why:?}"
        );
        // A replica not serving prod asks for nothing of it.
        let (asked, _) = requested(&mesh, "east", true, |env| env != "prod");
        assert!(asked.is_empty());
    }
}
