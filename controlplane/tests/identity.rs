//! The certificate authority through a running hub: join tokens over the admin API,
//! the CSR API, rotation through the API, and the `token`/`ca`/`cert` commands (the
//! real binary), over IPv4 and IPv6 loopback.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TestHub, docs, service};
use tributary_controlplane::http_client;
use tributary_controlplane::identity::client::{
    CA_FILE, CERT_FILE, Credential, KEY_FILE, new_csr, request_certificate,
};
use tributary_controlplane::identity::verify::{certs_from_pem, verify_chain};
use tributary_controlplane::identity::{CertificateIssuer, SpiffeId};

async fn hub(admin: &str) -> TestHub {
    let admin = admin.parse().unwrap();
    TestHub::start_with(
        &[("mesh.yaml", docs(&[service("a", "prod", 8080)]))],
        |cfg| cfg.admin_addr = admin,
    )
    .await
}

async fn post(addr: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let (status, resp) =
        http_client::request(addr, "POST", path, &serde_json::to_vec(&body).unwrap())
            .await
            .unwrap();
    (
        status,
        serde_json::from_slice(&resp).unwrap_or(serde_json::Value::Null),
    )
}

async fn create_token(addr: &str, identity: &str, uses: u32) -> serde_json::Value {
    let (status, created) = post(
        addr,
        "/v1/tokens",
        serde_json::json!({"identity": identity, "ttl": "1h", "uses": uses}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    created
}

const AGENT: &str = "spiffe://tributary.local/cluster/eu-1a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_one_certificate_for_its_identity_only() {
    let h = hub("[::1]:0").await;
    let admin = h.hub.admin_addr.to_string();
    let server = format!("http://{admin}");
    let token = create_token(&admin, AGENT, 1).await;
    let secret = token["token"].as_str().unwrap().to_string();

    // A CSR asking for another identity is refused, naming both, and does not use
    // the token up.
    let other = SpiffeId::parse("spiffe://tributary.local/cluster/us-2b").unwrap();
    let err = request_certificate(
        &server,
        &Credential::JoinToken(secret.clone()),
        Some(&other),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("HTTP 403"), "{err}");
    assert!(
        err.contains("the CSR asks for spiffe://tributary.local/cluster/us-2b but join token")
            && err.contains(&format!("proves {AGENT}")),
        "{err}"
    );

    // The right identity (named in the CSR, or left to the token).
    let want = SpiffeId::parse(AGENT).unwrap();
    let got = request_certificate(&server, &Credential::JoinToken(secret.clone()), Some(&want))
        .await
        .unwrap();
    assert_eq!(got.spiffe_id, AGENT);
    let now = SystemTime::now();
    assert_eq!(
        verify_chain(&got.trust_bundle_pem, &got.cert.chain_pem, now).unwrap(),
        want
    );
    // The roots, then the CRL of every CA (written to ca.pem, where every reader of
    // --tls-ca finds them).
    assert_eq!(got.trust_bundle_pem, h.hub.ca.trust_file_pem_at(now));
    assert!(
        got.trust_bundle_pem
            .starts_with(&h.hub.ca.trust_bundle_pem())
    );
    assert!(got.trust_bundle_pem.contains("-----BEGIN X509 CRL-----"));
    let lifetime = got
        .cert
        .not_after
        .duration_since(got.cert.not_before)
        .unwrap();
    assert_eq!(
        lifetime.as_secs(),
        24 * 3600 + 60,
        "24 h, backdated a minute"
    );
    // The key the client generated is the one certified.
    let leaf = &certs_from_pem("chain", &got.cert.chain_pem).unwrap()[0];
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).unwrap();
    use rcgen::PublicKeyData;
    let key = rcgen::KeyPair::from_pem(&got.cert.key_pem).unwrap();
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );

    // Single use: the second attempt is refused, saying so.
    let err = request_certificate(&server, &Credential::JoinToken(secret.clone()), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("already used"),
        "{err}"
    );

    // A revoked token is refused, saying so.
    let token = create_token(&admin, AGENT, 5).await;
    let (status, _) = http_client::request(
        &admin,
        "DELETE",
        &format!("/v1/tokens/{}", token["id"].as_str().unwrap()),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 204);
    let err = request_certificate(
        &server,
        &Credential::JoinToken(token["token"].as_str().unwrap().into()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("HTTP 401") && err.contains("was revoked at"),
        "{err}"
    );

    // A CSR asking for a DNS name or with a bad signature is refused.
    let token = create_token(&admin, AGENT, 1).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec!["evil.example".to_string()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let (status, body) = post(
        &admin,
        "/v1/certificates",
        serde_json::json!({"csr": csr, "join_token": token["token"]}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("evil.example"),
        "{body}"
    );
    let (_, good_csr) = new_csr(None).unwrap();
    // Change one character of the public key: the CSR's signature no longer holds.
    let mut lines: Vec<String> = good_csr.lines().map(str::to_string).collect();
    let c = lines[2].remove(20);
    lines[2].insert(20, if c == 'A' { 'B' } else { 'A' });
    let tampered = lines.join("\n");
    let (status, body) = post(
        &admin,
        "/v1/certificates",
        serde_json::json!({"csr": tampered, "join_token": token["token"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    // No credential, or two.
    let (status, body) = post(
        &admin,
        "/v1/certificates",
        serde_json::json!({"csr": good_csr}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("exactly one credential"),
        "{body}"
    );
    h.hub.shutdown().await.unwrap();
}

/// A root rotation through the API, phase by phase: (1) the new root is trusted
/// alongside the old one, which still signs; (2) the new root signs, and a workload
/// with an old-chain certificate and one with a new-chain certificate both verify
/// against the bundle; (3) the old root is dropped and the old-chain certificate is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_trusts_then_issues_from_the_new_root_then_drops_the_old() {
    let h = hub("127.0.0.1:0").await;
    let admin = h.hub.admin_addr.to_string();
    let server = format!("http://{admin}");
    let token = create_token(&admin, AGENT, 3).await;
    let cred = Credential::JoinToken(token["token"].as_str().unwrap().into());
    let before = request_certificate(&server, &cred, None).await.unwrap();
    let old_root = before.trust_bundle_pem.clone();
    assert_eq!(certs_from_pem("bundle", &old_root).unwrap().len(), 1);
    let view = ca_view(&admin).await;
    assert_eq!(view["phase"], "steady", "{view}");

    // Phase 1: trust the new root. The old one still signs.
    let (status, rotated) = post(
        &admin,
        "/v1/ca/rotate",
        serde_json::json!({"root": true, "trust_window": "1h", "overlap": "1h"}),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["phase"], "trusting-new", "{rotated}");
    assert_eq!(rotated["retiring"].as_array().unwrap().len(), 0);
    let new_root_fp = rotated["incoming"]["root"].as_str().unwrap().to_string();
    assert_ne!(new_root_fp, rotated["root"].as_str().unwrap());
    let trusting = request_certificate(&server, &cred, None).await.unwrap();
    assert_eq!(
        certs_from_pem("bundle", &trusting.trust_bundle_pem)
            .unwrap()
            .len(),
        2,
        "the bundle handed out in phase 1 holds both roots"
    );
    let now = SystemTime::now();
    // Still issued from the old root: a peer that has not yet received the new bundle
    // accepts it.
    verify_chain(&old_root, &trusting.cert.chain_pem, now).unwrap();
    // Dropping the old root now would strand every certificate: refused, saying why.
    let (status, body) = post(&admin, "/v1/ca/finish-rotation", serde_json::Value::Null).await;
    assert_eq!(status, 400, "{body}");
    let err = body["error"].as_str().unwrap();
    assert!(
        err.contains("does not sign yet") && err.contains("tributary ca promote"),
        "{body}"
    );
    // A second rotation while one is in phase 1 is refused, naming the new root.
    let (status, body) = post(&admin, "/v1/ca/rotate", serde_json::json!({"root": true})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(&new_root_fp),
        "{body}"
    );

    // Phase 2: the new root signs; the old one is still trusted.
    let (status, promoted) = post(&admin, "/v1/ca/promote", serde_json::Value::Null).await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["phase"], "issuing-from-new", "{promoted}");
    assert_eq!(promoted["root"], new_root_fp.as_str());
    assert_eq!(promoted["retiring"].as_array().unwrap().len(), 1);
    let after = request_certificate(&server, &cred, None).await.unwrap();
    let bundle = after.trust_bundle_pem.clone();
    assert_eq!(certs_from_pem("bundle", &bundle).unwrap().len(), 2);
    let now = SystemTime::now();
    // Old-chain and new-chain workloads both verify during the overlap...
    verify_chain(&bundle, &before.cert.chain_pem, now).unwrap();
    verify_chain(&bundle, &after.cert.chain_pem, now).unwrap();
    // ...including for a peer that still holds the bundle of phase 1.
    verify_chain(&trusting.trust_bundle_pem, &after.cert.chain_pem, now).unwrap();
    // The new certificate does not chain to the old root alone.
    assert!(verify_chain(&old_root, &after.cert.chain_pem, now).is_err());

    // Phase 3: the old root leaves the bundle; the old-chain certificate is refused.
    let (status, done) = post(&admin, "/v1/ca/finish-rotation", serde_json::Value::Null).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["phase"], "steady", "{done}");
    let view = ca_view(&admin).await;
    let bundle = view["trust_bundle_pem"].as_str().unwrap();
    assert_eq!(certs_from_pem("bundle", bundle).unwrap().len(), 1);
    let refused = verify_chain(bundle, &before.cert.chain_pem, now).unwrap_err();
    assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    verify_chain(bundle, &after.cert.chain_pem, now).unwrap();

    // Nothing to promote any more.
    let (status, body) = post(&admin, "/v1/ca/promote", serde_json::Value::Null).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("no new root"),
        "{body}"
    );
    // Bad rotation requests say what was expected.
    for (bad, needle) in [
        (
            serde_json::json!({"intermediate": "eu-1a", "overlap": "soon"}),
            "overlap \"soon\"",
        ),
        (
            serde_json::json!({"intermediate": "eu-1a", "trust_window": "1h"}),
            "applies to a root rotation",
        ),
        (
            serde_json::json!({"intermediate": "no/such"}),
            "expected a remote cluster id",
        ),
    ] {
        let (status, body) = post(&admin, "/v1/ca/rotate", bad).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains(needle), "{body}");
    }
    let (status, body) = post(
        &admin,
        "/v1/ca/finish-rotation",
        serde_json::json!({"intermediate": "nope"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("cluster/nope"),
        "{body}"
    );
    let (status, body) = post(
        &admin,
        "/v1/ca/rotate",
        serde_json::json!({"root": true, "trust_window": "soon"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("trust_window"),
        "{body}"
    );
    let (status, body) = post(&admin, "/v1/ca/rotate", serde_json::json!({})).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("exactly one of"),
        "{body}"
    );
    h.hub.shutdown().await.unwrap();
}

async fn ca_view(admin: &str) -> serde_json::Value {
    let (status, view) = http_client::request(admin, "GET", "/v1/ca", b"")
        .await
        .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&view).unwrap()
}

fn tributary(args: &[String]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("running tributary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run(args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || tributary(&args))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_a_token_gets_a_certificate_and_rotates() {
    let h = hub("[::1]:0").await;
    let admin = h.hub.admin_addr.to_string();
    let (ok, token, err) = run(&[
        "token",
        "create",
        "--admin",
        &admin,
        "--identity",
        AGENT,
        "--ttl",
        "10m",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("it is shown only now"), "{err}");
    let token = token.trim().to_string();
    let out = h.dir.path().join("certs");
    let server = format!("http://{admin}");
    let (ok, _, err) = run(&[
        "cert",
        "request",
        "--server",
        &server,
        "--token",
        &token,
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    let read = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
    let id = verify_chain(&read(CA_FILE), &read(CERT_FILE), SystemTime::now()).unwrap();
    assert_eq!(id.to_string(), AGENT);
    rcgen::KeyPair::from_pem(&read(KEY_FILE)).unwrap();
    // The token was single use.
    let (ok, _, err) = run(&[
        "cert",
        "request",
        "--server",
        &server,
        "--token",
        &token,
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert!(!ok && err.contains("already used"), "{err}");
    // Revoke by id; rotate; status.
    let id = token.split('.').next().unwrap();
    let (ok, _, err) = run(&["token", "revoke", "--admin", &admin, id]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["token", "revoke", "--admin", &admin, "0000000000000000"]).await;
    assert!(
        !ok && err.contains("HTTP 404") && err.contains("unknown"),
        "{err}"
    );
    let (ok, status, err) =
        run(&["ca", "rotate", "--admin", &admin, "--intermediate", "eu-1a"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["intermediates"]["cluster/eu-1a"].is_object(),
        "{status}"
    );
    // A second rotation with an overlap: two intermediates retiring, then both
    // revoked by finish-rotation.
    let (ok, status, err) = run(&[
        "ca",
        "rotate",
        "--admin",
        &admin,
        "--intermediate",
        "eu-1a",
        "--overlap",
        "1h",
    ])
    .await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let retiring = status["intermediates"]["cluster/eu-1a"]["retiring"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(retiring.len(), 2, "{status}");
    let (ok, status, err) = run(&[
        "ca",
        "finish-rotation",
        "--admin",
        &admin,
        "--intermediate",
        "eu-1a",
    ])
    .await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["intermediates"]["cluster/eu-1a"]["retiring"].is_null(),
        "{status}"
    );
    let revoked: Vec<&str> = status["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    let retired: Vec<&str> = retiring
        .iter()
        .map(|r| r["serial"].as_str().unwrap())
        .collect();
    assert_eq!(revoked, retired, "{status}");
    let (ok, _, err) = run(&[
        "ca",
        "rotate",
        "--admin",
        &admin,
        "--intermediate",
        "eu-1a",
        "--trust-window",
        "1h",
    ])
    .await;
    assert!(!ok && err.contains("--root"), "{err}");
    let (ok, status, err) = run(&["ca", "status", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert!(status.contains("BEGIN CERTIFICATE"), "{status}");
    // A root rotation's three phases, one command each.
    let phase = |out: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        v["phase"].as_str().unwrap().to_string()
    };
    let (ok, out, err) = run(&[
        "ca",
        "rotate",
        "--admin",
        &admin,
        "--root",
        "--trust-window",
        "1h",
        "--overlap",
        "2h",
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(phase(&out), "trusting-new", "{out}");
    let (ok, out, err) = run(&["ca", "promote", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert_eq!(phase(&out), "issuing-from-new", "{out}");
    let (ok, out, err) = run(&["ca", "finish-rotation", "--admin", &admin]).await;
    assert!(ok, "{err}");
    assert_eq!(phase(&out), "steady", "{out}");
    h.hub.shutdown().await.unwrap();
}

/// An intermediate rotation that names no overlap keeps the old intermediate for one
/// leaf lifetime, whatever `--cert-lifetime` is: a fixed 24 h revoked the old
/// intermediate while leaves it signed under a longer lifetime were still in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediate_rotation_without_an_overlap_keeps_the_old_one_a_leaf_lifetime() {
    const LIFETIME: u64 = 72 * 3600;
    let h = TestHub::start_with(
        &[("mesh.yaml", docs(&[service("a", "prod", 8080)]))],
        |cfg| {
            cfg.admin_addr = "127.0.0.1:0".parse().unwrap();
            cfg.identity.ca.cert_lifetime = Duration::from_secs(LIFETIME);
        },
    )
    .await;
    let admin = h.hub.admin_addr.to_string();
    let unix = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = unix();
    let (status, body) = post(
        &admin,
        "/v1/ca/rotate",
        serde_json::json!({"intermediate": "mesh"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let after = unix();
    let retiring = body["intermediates"]["mesh"]["retiring"]
        .as_array()
        .unwrap_or_else(|| panic!("the old intermediate is retiring: {body}"));
    assert_eq!(retiring.len(), 1, "{body}");
    let until = humantime::parse_rfc3339(retiring[0]["until"].as_str().unwrap())
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (before + LIFETIME..=after + LIFETIME).contains(&until),
        "retiring until {until}, expected now + {LIFETIME} s ({before}..{after} + {LIFETIME})"
    );
}
