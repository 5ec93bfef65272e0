use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tributary_store::SharedStore;
use tributary_store::embedded::{Embedded, EmbeddedConfig};

use super::*;
use crate::identity::verify::{VerifyError, certs_from_pem, verify_chain};

pub(crate) fn memory_store() -> SharedStore {
    Arc::new(Embedded::in_memory(EmbeddedConfig::default()).unwrap())
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn parsed<T>(der: &[u8], f: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>) -> T) -> T {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    f(&cert)
}

fn sans(der: &[u8]) -> Vec<String> {
    parsed(der, |c| {
        c.subject_alternative_name()
            .unwrap()
            .map(|s| {
                s.value
                    .general_names
                    .iter()
                    .map(|n| n.to_string())
                    .collect()
            })
            .unwrap_or_default()
    })
}

fn issuer_cn(der: &[u8]) -> String {
    parsed(der, |c| c.issuer().to_string())
}

const WORKLOAD: &str = "spiffe://mesh.local/env/prod/ns/shop/sa/checkout";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_certificate_names_exactly_its_spiffe_id_and_verifies() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let issued = ca.issue(&id(WORKLOAD)).unwrap();
    let chain = certs_from_pem("chain", &issued.chain_pem).unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate, not the root");
    assert_eq!(sans(&chain[0]), vec![format!("URI({WORKLOAD})")]);
    parsed(&chain[0], |c| {
        assert!(!c.is_ca());
        assert!(
            c.subject().iter().next().is_none(),
            "empty subject: the SPIFFE id is the name"
        );
        let san = c
            .extensions()
            .iter()
            .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME)
            .unwrap();
        assert!(san.critical, "SAN must be critical with an empty subject");
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    });
    // The default lifetime: 24 h from issuance (backdated by a minute for skew).
    assert_eq!(
        issued.not_after.duration_since(issued.not_before).unwrap(),
        DEFAULT_CERT_LIFETIME + BACKDATE
    );
    let now = SystemTime::now();
    assert!(issued.not_before <= now && issued.not_after > now + Duration::from_secs(23 * 3600));
    // The leaf key is the certificate's.
    let key = KeyPair::from_pem(&issued.key_pem).unwrap();
    parsed(&chain[0], |c| {
        assert_eq!(c.public_key().raw, key.subject_public_key_info().as_slice())
    });
    // A real chain verification against the bundle, and the id it proves.
    let proven = verify_chain(&ca.trust_bundle_pem(), &issued.chain_pem, now).unwrap();
    assert_eq!(proven, id(WORKLOAD));
    // Workloads issued without a known cluster are signed by the mesh intermediate.
    assert!(
        issuer_cn(&chain[0]).contains("intermediate mesh"),
        "{}",
        issuer_cn(&chain[0])
    );
    parsed(&chain[1], |c| {
        assert!(c.is_ca());
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(0));
        assert_eq!(
            c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
            (DEFAULT_INTERMEDIATE_LIFETIME + BACKDATE).as_secs() as i64
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_signed_by_their_clusters_intermediate_and_hubs_carry_serving_names() {
    let mut cfg = CaConfig::new("mesh.local");
    cfg.cert_lifetime = Duration::from_secs(3600);
    cfg.serving_sans = vec!["hub.example".into(), "::1".into(), "127.0.0.1".into()];
    let ca = Ca::open(memory_store(), cfg).await.unwrap();
    let agent = ca.issue(&id("spiffe://mesh.local/cluster/eu-1a")).unwrap();
    let chain = certs_from_pem("chain", &agent.chain_pem).unwrap();
    assert!(
        issuer_cn(&chain[0]).contains("intermediate cluster/eu-1a"),
        "{}",
        issuer_cn(&chain[0])
    );
    assert_eq!(
        sans(&chain[0]),
        vec!["URI(spiffe://mesh.local/cluster/eu-1a)".to_string()]
    );
    assert_eq!(
        agent.not_after.duration_since(agent.not_before).unwrap(),
        Duration::from_secs(3600) + BACKDATE
    );
    // The serving names go only into hub and router certificates.
    let hub = ca.issue(&id("spiffe://mesh.local/hub/hub-0")).unwrap();
    let hub_leaf = &certs_from_pem("chain", &hub.chain_pem).unwrap()[0];
    assert_eq!(
        sans(hub_leaf),
        vec![
            "URI(spiffe://mesh.local/hub/hub-0)".to_string(),
            "DNSName(hub.example)".into(),
            // x509-parser prints addresses as hex bytes.
            "IPAddress(00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:01)".into(),
            "IPAddress(7f:00:00:01)".into()
        ]
    );
    // Another trust domain is not this CA's to name.
    let err = ca
        .issue(&id("spiffe://other.org/hub/x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("trust domain \"mesh.local\""), "{err}");
    let status = ca.status();
    assert!(
        status.intermediates.contains_key("cluster/eu-1a")
            && status.intermediates.contains_key("mesh")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_or_another_ca_is_refused_by_the_verifier() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let other = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let issued = ca.issue(&id(WORKLOAD)).unwrap();
    let bundle = ca.trust_bundle_pem();
    // Valid until its notAfter, refused after it.
    verify_chain(
        &bundle,
        &issued.chain_pem,
        issued.not_after - Duration::from_secs(1),
    )
    .unwrap();
    let expired = verify_chain(
        &bundle,
        &issued.chain_pem,
        issued.not_after + Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(
        matches!(&expired, VerifyError::Untrusted(m) if m.contains("certificate expired")),
        "{expired}"
    );
    // Not yet valid before its notBefore.
    let early = verify_chain(
        &bundle,
        &issued.chain_pem,
        issued.not_before - Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(
        matches!(&early, VerifyError::Untrusted(m) if m.contains("not valid yet")),
        "{early}"
    );
    // A certificate of another CA (another store, another root) is refused.
    let foreign = other.issue(&id(WORKLOAD)).unwrap();
    let wrong = verify_chain(&bundle, &foreign.chain_pem, SystemTime::now()).unwrap_err();
    assert!(
        matches!(&wrong, VerifyError::Untrusted(m) if m.contains("UnknownIssuer")),
        "{wrong}"
    );
    // A chain missing its intermediate does not verify either.
    let leaf_only = issued
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap();
    assert!(verify_chain(&bundle, leaf_only, SystemTime::now()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_store_share_the_root_and_the_intermediates() {
    let store = memory_store();
    let a = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let b = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    assert_eq!(a.status().root, b.status().root);
    assert_eq!(
        a.status().intermediates["mesh"],
        b.status().intermediates["mesh"]
    );
    // A intermediate created through one replica is the one the other uses.
    let from_a = a
        .issue_with(
            &id("spiffe://mesh.local/cluster/c1"),
            &Signer::Cluster("c1".into()),
        )
        .await
        .unwrap();
    b.reload().await.unwrap();
    let from_b = b.issue(&id("spiffe://mesh.local/cluster/c1")).unwrap();
    let inter = |pem: &str| certs_from_pem("chain", pem).unwrap()[1].to_vec();
    assert_eq!(inter(&from_a.chain_pem), inter(&from_b.chain_pem));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_supplied_root_signs_and_a_different_one_is_refused_later() {
    let mut cfg = CaConfig::new("mesh.local");
    let root = generate_root(&cfg, SystemTime::now()).unwrap();
    cfg.root = Some(SuppliedRoot {
        cert_pem: root.cert_pem.clone(),
        key_pem: root.key_pem.clone(),
        source: "test root".into(),
    });
    let store = memory_store();
    let ca = Ca::open(store.clone(), cfg.clone()).await.unwrap();
    assert_eq!(ca.trust_bundle_pem(), root.cert_pem);
    let issued = ca.issue(&id(WORKLOAD)).unwrap();
    verify_chain(&root.cert_pem, &issued.chain_pem, SystemTime::now()).unwrap();
    // Reopening with the same root is fine; with another one, refused with both names.
    Ca::open(store.clone(), cfg.clone()).await.unwrap();
    let other = generate_root(&cfg, SystemTime::now()).unwrap();
    cfg.root = Some(SuppliedRoot {
        cert_pem: other.cert_pem,
        key_pem: other.key_pem,
        source: "--ca-root-cert other.pem".into(),
    });
    let err = Ca::open(store, cfg.clone()).await.unwrap_err().to_string();
    assert!(
        err.contains("--ca-root-cert other.pem")
            && err.contains("different root")
            && err.contains("tributary ca rotate --root"),
        "{err}"
    );
    // A key that does not belong to the certificate is refused on an empty store.
    cfg.root.as_mut().unwrap().key_pem = root.key_pem;
    let err = Ca::open(memory_store(), cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("the key does not belong to the certificate"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_trusts_old_and_new_for_the_overlap_then_only_the_new() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let replica = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let follower = tokio::spawn(replica.clone().run(stop));
    let old_root = ca.trust_bundle_pem();
    let before = ca.issue(&id(WORKLOAD)).unwrap();

    let overlap = Duration::from_secs(3600);
    let t0 = SystemTime::now();
    let status = ca.rotate_root(Duration::ZERO, overlap).await.unwrap();
    assert_eq!(status.retiring.len(), 1);
    let new_root = status.root.clone();
    assert_ne!(fingerprint(&first_der(&old_root).unwrap()), new_root);
    // Every intermediate moved to the new root.
    assert!(
        status.intermediates.values().all(|i| i.root == new_root),
        "{status:?}"
    );

    // During the window: the bundle holds both roots, the old certificate verifies.
    let bundle = ca.trust_bundle_pem();
    assert_eq!(certs_from_pem("bundle", &bundle).unwrap().len(), 2);
    verify_chain(&bundle, &before.chain_pem, SystemTime::now()).unwrap();
    // New certificates chain to the new root: they verify against it alone, not the old.
    let after = ca.issue(&id(WORKLOAD)).unwrap();
    let new_only = ca.snapshot().root.cert_pem.clone();
    verify_chain(&new_only, &after.chain_pem, SystemTime::now()).unwrap();
    assert!(verify_chain(&old_root, &after.chain_pem, SystemTime::now()).is_err());

    // The other replica follows through the store watch.
    let mut seen = replica.status();
    for _ in 0..200 {
        if seen.root == new_root {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        seen = replica.status();
    }
    assert_eq!(seen.root, new_root, "the replica reloads the rotated root");
    assert_eq!(replica.trust_bundle_pem(), bundle);

    // After the window the old root has left the bundle: the old certificate (still
    // within its own lifetime) no longer verifies, the new one does.
    let later = t0 + overlap + Duration::from_secs(2);
    let bundle_later = ca.trust_bundle_at(later);
    assert_eq!(certs_from_pem("bundle", &bundle_later).unwrap().len(), 1);
    let refused = verify_chain(&bundle_later, &before.chain_pem, later).unwrap_err();
    assert!(
        matches!(&refused, VerifyError::Untrusted(m) if m.contains("UnknownIssuer")),
        "{refused}"
    );
    verify_chain(&bundle_later, &after.chain_pem, later).unwrap();

    // Finishing early removes the old root from the bundle now.
    let done = ca.finish_rotation().await.unwrap();
    assert!(done.retiring.is_empty());
    assert!(verify_chain(&ca.trust_bundle_pem(), &before.chain_pem, SystemTime::now()).is_err());
    let _ = stop_tx.send(true);
    follower.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_rotation_signs_with_the_new_one_and_old_leaves_still_verify() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let agent = id("spiffe://mesh.local/cluster/c1");
    let before = ca.issue(&agent).unwrap();
    let old = ca.status().intermediates["cluster/c1"].clone();
    let status = ca
        .rotate_intermediate(
            &Signer::Cluster("c1".into()),
            ca.default_intermediate_overlap(),
        )
        .await
        .unwrap();
    let new = status.intermediates["cluster/c1"].clone();
    assert_ne!(old.fingerprint, new.fingerprint);
    assert_eq!(
        status.intermediates["mesh"],
        ca.status().intermediates["mesh"]
    );
    let after = ca.issue(&agent).unwrap();
    let inter = |pem: &str| fingerprint(&certs_from_pem("chain", pem).unwrap()[1]);
    assert_eq!(inter(&after.chain_pem), new.fingerprint);
    assert_eq!(inter(&before.chain_pem), old.fingerprint);
    let bundle = ca.trust_bundle_pem();
    verify_chain(&bundle, &before.chain_pem, SystemTime::now()).unwrap();
    verify_chain(&bundle, &after.chain_pem, SystemTime::now()).unwrap();
}

#[tokio::test]
async fn lifetimes_are_checked_at_start() {
    let mut cfg = CaConfig::new("mesh.local");
    cfg.cert_lifetime = Duration::from_secs(20 * 24 * 3600);
    let err = Ca::open(memory_store(), cfg).await.unwrap_err().to_string();
    assert!(
        err.contains("--cert-lifetime 20days") && err.contains("--ca-intermediate-lifetime 30days"),
        "{err}"
    );
    let mut cfg = CaConfig::new("mesh.local");
    cfg.serving_sans = vec!["héllo".into()];
    let err = Ca::open(memory_store(), cfg).await.unwrap_err().to_string();
    assert!(err.contains("--serving-san \"héllo\""), "{err}");
}

/// The rotation's clock: with no operator action, the new root is trusted first
/// (the old one signs), signs when its trust window ends, and the old root leaves the
/// bundle when the overlap ends; each step is announced on `changes()`, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_moves_through_its_phases_by_the_clock_and_announces_each() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let clock = tokio::spawn(ca.clone().run(stop));
    let mut changes = ca.changes();
    changes.borrow_and_update();
    let old_root = ca.trust_bundle_pem();
    let old_fp = ca.status().root;

    let window = Duration::from_secs(2);
    let status = ca.rotate_root(window, window).await.unwrap();
    assert_eq!(status.phase, RotationPhase::TrustingNew);
    let new_fp = status.incoming.clone().unwrap().root;
    // Announced at once: peers must get the two-root bundle now.
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("the new bundle is announced")
        .unwrap();
    assert_eq!(
        certs_from_pem("bundle", &ca.trust_bundle_pem())
            .unwrap()
            .len(),
        2
    );
    // Still issued from the old root.
    let trusting = ca.issue(&id(WORKLOAD)).unwrap();
    verify_chain(&old_root, &trusting.chain_pem, SystemTime::now()).unwrap();
    assert_eq!(ca.status().root, old_fp);

    // The window ends: the new root signs (written by `run`), announced.
    let wait = Duration::from_secs(10);
    // (The promotion is two writes: the roots, then the intermediates under the new
    // root; each is announced.)
    let moved =
        |s: &CaStatus| s.root == new_fp && s.intermediates.values().all(|i| i.root == new_fp);
    tokio::time::timeout(wait, changes.wait_for(|_| moved(&ca.status())))
        .await
        .expect("the new root signs when its trust window ends")
        .unwrap();
    let status = ca.status();
    assert_eq!(status.phase, RotationPhase::IssuingFromNew, "{status:?}");
    assert!(
        status.intermediates.values().all(|i| i.root == new_fp),
        "{status:?}"
    );
    let after = ca.issue(&id(WORKLOAD)).unwrap();
    let bundle = ca.trust_bundle_pem();
    verify_chain(&bundle, &trusting.chain_pem, SystemTime::now()).unwrap();
    verify_chain(&bundle, &after.chain_pem, SystemTime::now()).unwrap();
    assert!(verify_chain(&old_root, &after.chain_pem, SystemTime::now()).is_err());

    // The overlap ends: the old root leaves the bundle, announced.
    tokio::time::timeout(
        wait,
        changes.wait_for(|_| ca.status().phase == RotationPhase::Steady),
    )
    .await
    .expect("the old root leaves when the overlap ends")
    .unwrap();
    let bundle = ca.trust_bundle_pem();
    assert_eq!(certs_from_pem("bundle", &bundle).unwrap().len(), 1);
    assert!(verify_chain(&bundle, &trusting.chain_pem, SystemTime::now()).is_err());
    verify_chain(&bundle, &after.chain_pem, SystemTime::now()).unwrap();
    let _ = stop_tx.send(true);
    clock.await.unwrap();
}

/// A replica that starts after a trust window ended promotes the new root itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_window_that_ended_while_no_replica_ran_is_promoted_at_open() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let past = SystemTime::now() - Duration::from_secs(3600);
    let status = ca
        .rotate_root_at(Duration::from_secs(60), DEFAULT_OVERLAP, past)
        .await
        .unwrap();
    let new_fp = status.incoming.unwrap().root;
    let reopened = Ca::open(store, CaConfig::new("mesh.local")).await.unwrap();
    let status = reopened.status();
    assert_eq!(status.root, new_fp);
    assert_eq!(status.phase, RotationPhase::IssuingFromNew);
    assert!(status.intermediates["mesh"].root == new_fp, "{status:?}");
}

/// The issuer names of the CRLs in `pem`, and the serials (hex) each lists.
fn crls_in(pem: &str) -> Vec<(String, Vec<String>)> {
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .map(|c| {
            let der = c.unwrap();
            let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
            (
                crl.issuer().to_string(),
                crl.iter_revoked_certificates()
                    .map(|r| hex(r.raw_serial()))
                    .collect(),
            )
        })
        .collect()
}

fn intermediate_serial(chain_pem: &str) -> String {
    let der = certs_from_pem("chain", chain_pem).unwrap()[1].to_vec();
    serial_of(&der).unwrap()
}

/// An intermediate rotation with an overlap: the new intermediate signs at once, the
/// old one's certificates verify during the overlap; finishing it revokes the old
/// one (its serial in the root's CRL), and its certificates are refused as revoked
/// while the new one's still verify. Every CA has a CRL, empty unless it revoked
/// something; another replica follows through the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_rotation_keeps_the_old_one_for_the_overlap_then_revokes_it() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let agent = id("spiffe://mesh.local/cluster/c1");
    let c1 = Signer::Cluster("c1".into());
    let before = ca.issue(&agent).unwrap();
    let mesh_leaf = ca.issue(&id(WORKLOAD)).unwrap();
    // Root, mesh and cluster/c1: one empty CRL each.
    let crls = crls_in(&ca.crl_pem());
    assert_eq!(crls.len(), 3, "{crls:?}");
    assert!(
        crls.iter().all(|(_, revoked)| revoked.is_empty()),
        "{crls:?}"
    );
    let mut trust = ca.trust_changes();
    trust.borrow_and_update();

    let status = ca
        .rotate_intermediate(&c1, Duration::from_secs(3600))
        .await
        .unwrap();
    let old_serial = intermediate_serial(&before.chain_pem);
    let retiring = &status.intermediates["cluster/c1"].retiring;
    assert_eq!(retiring.len(), 1, "{status:?}");
    assert_eq!(retiring[0].serial, old_serial);
    assert!(
        trust.has_changed().unwrap(),
        "the new intermediate's CRL is announced"
    );
    // The old intermediate keeps its CRL during the overlap (Envoy needs one per CA).
    assert_eq!(crls_in(&ca.crl_pem()).len(), 4);
    let after = ca.issue(&agent).unwrap();
    assert_ne!(intermediate_serial(&after.chain_pem), old_serial);
    let now = SystemTime::now();
    let file = ca.trust_file_pem_at(now);
    verify_chain(&file, &before.chain_pem, now).expect("the old intermediate during the overlap");
    verify_chain(&file, &after.chain_pem, now).expect("the new intermediate");

    trust.borrow_and_update();
    let status = ca.finish_intermediate_rotation(&c1).await.unwrap();
    assert!(
        status.intermediates["cluster/c1"].retiring.is_empty(),
        "{status:?}"
    );
    assert_eq!(status.revoked.len(), 1, "{status:?}");
    assert_eq!(status.revoked[0].serial, old_serial);
    assert_eq!(status.revoked[0].what, "intermediate cluster/c1");
    assert_eq!(status.revoked[0].issuer, status.root);
    assert!(trust.has_changed().unwrap(), "the revocation is announced");
    let crls = crls_in(&ca.crl_pem());
    assert_eq!(
        crls.len(),
        3,
        "the revoked intermediate needs no CRL of its own: {crls:?}"
    );
    let root_crl: Vec<_> = crls.iter().filter(|(_, r)| !r.is_empty()).collect();
    assert_eq!(root_crl.len(), 1, "{crls:?}");
    assert!(root_crl[0].0.contains("Tributary root"), "{crls:?}");
    assert_eq!(root_crl[0].1, vec![old_serial.clone()]);

    let now = SystemTime::now();
    let file = ca.trust_file_pem_at(now);
    let err = verify_chain(&file, &before.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
    verify_chain(&file, &after.chain_pem, now).expect("the new intermediate still verifies");
    verify_chain(&file, &mesh_leaf.chain_pem, now).expect("other signers are untouched");
    // Without the CRLs (roots only) the old chain would still verify: the CRL is
    // what refuses it.
    verify_chain(&ca.trust_bundle_pem(), &before.chain_pem, now).unwrap();

    // Another replica reads the same revocation from the store.
    let replica = Ca::open(store, CaConfig::new("mesh.local")).await.unwrap();
    assert_eq!(replica.status().revoked, ca.status().revoked);
    let err = verify_chain(&replica.trust_file_pem_at(now), &before.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
}

/// With no operator action the old intermediate is revoked when its overlap ends
/// (by `run`'s clock): first the new intermediate's CRL is announced, then the
/// revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_overlap_ends_by_the_clock_with_a_revocation() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let clock = tokio::spawn(ca.clone().run(stop));
    let before = ca.issue(&id(WORKLOAD)).unwrap();
    let mut trust = ca.trust_changes();
    trust.borrow_and_update();
    ca.rotate_intermediate(&Signer::Mesh, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(trust.has_changed().unwrap());
    trust.borrow_and_update();
    assert!(ca.status().revoked.is_empty(), "not during the overlap");
    tokio::time::timeout(
        Duration::from_secs(10),
        trust.wait_for(|_| !ca.status().revoked.is_empty()),
    )
    .await
    .expect("revoked when the overlap ends")
    .unwrap();
    let status = ca.status();
    assert!(
        status.intermediates["mesh"].retiring.is_empty(),
        "{status:?}"
    );
    assert_eq!(
        status.revoked[0].serial,
        intermediate_serial(&before.chain_pem)
    );
    let now = SystemTime::now();
    assert!(verify_chain(&ca.trust_file_pem_at(now), &before.chain_pem, now).is_err());
    let _ = stop_tx.send(true);
    clock.await.unwrap();
}

/// A zero overlap revokes the old intermediate in the same write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_rotation_without_overlap_revokes_at_once() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let before = ca.issue(&id(WORKLOAD)).unwrap();
    let status = ca
        .rotate_intermediate(&Signer::Mesh, Duration::ZERO)
        .await
        .unwrap();
    assert!(status.intermediates["mesh"].retiring.is_empty());
    assert_eq!(status.revoked.len(), 1);
    let now = SystemTime::now();
    let err = verify_chain(&ca.trust_file_pem_at(now), &before.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
    // Finishing again revokes nothing more, and an unknown signer is named.
    let again = ca
        .finish_intermediate_rotation(&Signer::Mesh)
        .await
        .unwrap();
    assert_eq!(again.revoked, status.revoked);
    let err = ca
        .finish_intermediate_rotation(&Signer::Cluster("nope".into()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cluster/nope"), "{err}");
}

/// A root promotion replaces every intermediate; the replaced ones stay in their
/// overlap (one leaf lifetime) with their CRLs, so certificates they signed keep
/// verifying wherever every CA of a chain needs a CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediates_replaced_by_a_root_promotion_keep_their_crls_for_a_leaf_lifetime() {
    let ca = Ca::open(memory_store(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let before = ca.issue(&id(WORKLOAD)).unwrap();
    ca.rotate_root(Duration::ZERO, DEFAULT_OVERLAP)
        .await
        .unwrap();
    let status = ca.status();
    let retiring = &status.intermediates["mesh"].retiring;
    assert_eq!(retiring.len(), 1, "{status:?}");
    assert_eq!(retiring[0].serial, intermediate_serial(&before.chain_pem));
    // Two roots and two mesh intermediates: four CRLs.
    let crls = crls_in(&ca.crl_pem());
    assert_eq!(crls.len(), 4, "{crls:?}");
    let now = SystemTime::now();
    verify_chain(&ca.trust_file_pem_at(now), &before.chain_pem, now).unwrap();
}

fn leaf_serial_of(chain_pem: &str) -> String {
    let der = certs_from_pem("chain", chain_pem).unwrap()[0].to_vec();
    serial_of(&der).unwrap()
}

/// One leaf revoked by its serial (as `openssl x509 -noout -serial` prints it):
/// the intermediate's CRL lists it, its chain is refused as revoked while a sibling
/// of the same intermediate still verifies, `ca status` lists it, and another
/// replica on the same store reads the same CRL. A serial that is not hex, or an
/// intermediate that does not exist, is refused naming what was expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_revoked_by_serial_is_refused_and_its_siblings_are_not() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let agent = SpiffeId::new(
        "mesh.local",
        Identity::Agent {
            cluster: "east-1".into(),
        },
    );
    let east = Signer::Cluster("east-1".into());
    let revoked = ca.issue_with(&agent, &east).await.unwrap();
    let sibling = ca.issue_with(&agent, &east).await.unwrap();
    let serial = leaf_serial_of(&revoked.chain_pem);
    let openssl = format!(
        "serial={}",
        serial
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":")
    );
    let status = ca.revoke_leaf(&openssl, Some(&east)).await.unwrap();
    assert_eq!(
        status
            .revoked
            .iter()
            .map(|r| (r.serial.as_str(), r.what.as_str()))
            .collect::<Vec<_>>(),
        vec![(
            serial.as_str(),
            format!("leaf {serial} (intermediate cluster/east-1)").as_str()
        )]
    );
    let now = SystemTime::now();
    let trust = ca.trust_file_pem_at(now);
    let err = verify_chain(&trust, &revoked.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
    verify_chain(&trust, &sibling.chain_pem, now).expect("the sibling still verifies");
    assert!(
        crls_in(&trust)
            .iter()
            .any(|(issuer, serials)| issuer.contains("east-1") && serials == &vec![serial.clone()]),
        "{:?}",
        crls_in(&trust)
    );
    // Revoking it again changes nothing.
    assert_eq!(
        ca.revoke_leaf(&serial, Some(&east)).await.unwrap().revoked,
        status.revoked
    );
    // Another replica reads the revocation from the store.
    let other = Ca::open(store, CaConfig::new("mesh.local")).await.unwrap();
    let err = verify_chain(&other.trust_file_pem_at(now), &revoked.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
    // Without --intermediate, every intermediate's CRL lists it.
    let mesh_leaf = ca.issue(&id(WORKLOAD)).unwrap();
    ca.revoke_leaf(&leaf_serial_of(&mesh_leaf.chain_pem), None)
        .await
        .unwrap();
    let now = SystemTime::now();
    let err = verify_chain(&ca.trust_file_pem_at(now), &mesh_leaf.chain_pem, now).unwrap_err();
    assert!(err.to_string().contains("Revoked"), "{err}");
    // What is refused, and why.
    let err = ca.revoke_leaf("not-hex", None).await.unwrap_err();
    assert!(
        err.to_string().contains("openssl x509 -noout -serial"),
        "{err}"
    );
    let err = ca
        .revoke_leaf(&serial, Some(&Signer::Cluster("nope".into())))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cluster/nope"), "{err}");
}

/// A root retired before CRLs existed (the store kept no key for it) has no CRL:
/// `ca status` warns, naming it, while it is in the bundle, and the warning goes
/// with it. A retiring root with its key has a CRL, and no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retiring_root_without_a_crl_is_warned_about() {
    let store = memory_store();
    let ca = Ca::open(store.clone(), CaConfig::new("mesh.local"))
        .await
        .unwrap();
    let old_root = ca.status().root;
    ca.rotate_root(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(ca.status().retiring.len(), 1);
    assert_eq!(ca.status().warnings, Vec::<String>::new());
    // The record as a hub from before CRLs wrote it: no key for the retiring root.
    let (kv, _) = store.get(ROOTS_KEY).await.unwrap();
    let mut record: RootsRecord = serde_json::from_slice(&kv.unwrap().value).unwrap();
    for r in &mut record.retiring {
        r.key_pem = None;
    }
    store
        .put(ROOTS_KEY, serde_json::to_vec(&record).unwrap(), 0)
        .await
        .unwrap();
    ca.reload().await.unwrap();
    let warnings = ca.status().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&old_root) && warnings[0].contains("has no CRL"),
        "{warnings:?}"
    );
    ca.finish_rotation().await.unwrap();
    assert_eq!(ca.status().warnings, Vec::<String>::new());
}
