//! `tributary status ...` against a running hub's admin endpoint: the real binary,
//! over IPv4 and IPv6 loopback.

mod common;

use common::{TestHub, docs, endpoints, service};

fn tributary(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("running tributary")
}

async fn run(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tributary(&refs);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn hub(admin: &str) -> TestHub {
    let admin = admin.parse().unwrap();
    TestHub::start_with(
        &[(
            "mesh.yaml",
            docs(&[
                service("a", "prod", 8080),
                endpoints("a", "prod", &["10.0.0.1", "10.0.0.2"], 80),
            ]),
        )],
        |cfg| cfg.admin_addr = admin,
    )
    .await
}

/// Rows of a printed table, split on runs of two or more spaces (a cell may hold one).
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

async fn environments_table(admin_bind: &str) {
    let hub = hub(admin_bind).await;
    let admin = hub.hub.admin_addr.to_string();
    let (ok, out, err) = run(vec![
        "status".into(),
        "environments".into(),
        "--admin".into(),
        admin,
    ])
    .await;
    assert!(ok, "{err}");
    let rows = rows(&out);
    assert_eq!(
        rows[0],
        [
            "ENVIRONMENT",
            "SEQ",
            "CLUSTERS",
            "ENDPOINTS",
            "LISTENERS",
            "ROUTES"
        ],
        "{out}"
    );
    let prod = rows
        .iter()
        .find(|r| r[0] == "prod")
        .unwrap_or_else(|| panic!("{out}"));
    let snap = hub.hub.snapshots.current("prod");
    assert_eq!(prod[1], snap.seq.to_string(), "{out}");
    // a's two clusters (all endpoints, subset v1) and the passthrough cluster.
    assert_eq!(prod[2], "3", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_environments_prints_a_table_ipv4() {
    environments_table("127.0.0.1:0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_environments_prints_a_table_ipv6() {
    environments_table("[::1]:0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_empty_tables() {
    let hub = hub("127.0.0.1:0").await;
    let admin = hub.hub.admin_addr.to_string();
    let (ok, out, err) = run(vec![
        "status".into(),
        "environments".into(),
        "--json".into(),
        "--admin".into(),
        format!("http://{admin}/"),
    ])
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["environments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["environment"] == "prod"),
        "{out}"
    );
    // No clients, no clusters: the header alone.
    for (what, header) in [
        (
            "sync",
            vec![
                "NODE",
                "ENV",
                "ROLE",
                "PROTOCOL",
                "TYPE",
                "SENT",
                "ACKED",
                "NACKS",
                "LAST NACK",
            ],
        ),
        (
            "clusters",
            vec![
                "CLUSTER",
                "STATE",
                "REGION",
                "ZONE",
                "VERSION",
                "SERVICES",
                "ENDPOINTS",
                "LAG",
                "SESSIONS",
                "REJECTED",
            ],
        ),
    ] {
        let (ok, out, err) = run(vec![
            "status".into(),
            what.into(),
            "--admin".into(),
            admin.clone(),
        ])
        .await;
        assert!(ok, "{err}");
        assert_eq!(rows(&out), vec![header], "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_an_unreachable_admin_address() {
    // A port nobody listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let (ok, _, err) = run(vec![
        "status".into(),
        "clusters".into(),
        "--admin".into(),
        admin.clone(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains(&admin) && err.contains("--admin"), "{err}");
}
