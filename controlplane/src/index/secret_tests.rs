//! Credentials from Kubernetes Secrets in the index: held in memory, resolved into
//! the environment's credentials, the last good pair kept.

use prometheus_client::registry::Registry;

use super::*;

const NAME: &str = "credential/default/wild";

fn index() -> (Index, Arc<Snapshots>) {
    let snapshots = Arc::new(Snapshots::default());
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    (
        Index::new(IndexConfig::default(), snapshots.clone(), metrics),
        snapshots,
    )
}

fn mesh(with_credential: bool) -> Arc<Mesh> {
    let credential = "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {name: wild, environment: prod}\nspec: {kubernetesSecret: {cluster: east, namespace: shop, name: wild-tls}}\n---\napiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge, environment: prod}\nspec:\n  listeners: [{name: https, port: 8443, tls: {credential: wild}}]\n";
    let other = "apiVersion: tributary.io/v1alpha1\nkind: Gateway\nmetadata: {name: edge, environment: prod}\nspec:\n  listeners: [{name: http, port: 8080}]\n";
    let text = if with_credential { credential } else { other };
    Arc::new(crate::config::parse_files([("m.yaml", text)]).unwrap())
}

fn secret() -> SecretRef {
    SecretRef {
        cluster: "east".into(),
        namespace: "shop".into(),
        name: "wild-tls".into(),
    }
}

fn valid(n: u32) -> SecretEvent {
    SecretEvent::Valid {
        credential: Credential {
            certificate_pem: format!("certificate {n}"),
            private_key_pem: format!("key {n}"),
        },
        not_after: SystemTime::now() + Duration::from_secs(3600),
    }
}

fn served(snapshots: &Snapshots) -> Option<String> {
    snapshots
        .current("prod")
        .get(XdsType::Secret, NAME)
        .map(|r| r.version().to_string())
}

/// A Secret that reaches the index before the config naming it (the session saw the
/// newer config first) is served once the config arrives; an invalid or deleted
/// update keeps the last good pair (same version); a new pair is a new version; a
/// config that no longer names it drops it from memory.
#[test]
fn a_secret_is_served_from_memory_and_bad_updates_keep_the_last_good() {
    let (mut ix, snapshots) = index();
    let now = Instant::now();
    ix.apply_secret(secret(), valid(1), now);
    ix.set_file(mesh(true), now);
    ix.flush(now);
    let v1 = served(&snapshots).expect("served once the config names it");

    for bad in [SecretEvent::Invalid("no".into()), SecretEvent::Deleted] {
        ix.apply_secret(secret(), bad, now);
        ix.flush(now);
        assert_eq!(served(&snapshots).as_ref(), Some(&v1), "the last good pair");
    }
    let held = &ix.sources.secrets[&secret()];
    assert_eq!((held.state, held.good.is_some()), ("deleted", true));

    ix.apply_secret(secret(), valid(2), now);
    ix.flush(now);
    let v2 = served(&snapshots).unwrap();
    assert_ne!(v1, v2, "a rotation is a new version");

    ix.set_file(mesh(false), now);
    ix.flush(now);
    assert_eq!(served(&snapshots), None);
    assert!(ix.sources.secrets.is_empty(), "no longer held");
}
