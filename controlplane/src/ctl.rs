//! `tributary ctl`: config through a hub's admin API, and the shard assignment.
//!
//! | command | API |
//! |---|---|
//! | `apply -f FILE\|DIR...` | `POST /config/apply` |
//! | `validate -f FILE\|DIR...` | `POST /config/apply?dry_run=true` (errors, exit 1) |
//! | `diff -f FILE\|DIR...` | `POST /config/apply?dry_run=true` (a line diff per changed object; exit 1 when something differs) |
//! | `get KIND [NAME]` | `GET /config?kind=&name=&env=` |
//! | `delete KIND NAME` | `DELETE /config/{env}/{kind}/{namespace}/{name}` |
//! | `shards` | `GET /status/shards` |
//!
//! Output: a table, or `-o json` / `-o yaml`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::config::{DEFAULT_NAMESPACE, KINDS};
use crate::http_client;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

impl std::str::FromStr for Output {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Output::Table),
            "json" => Ok(Output::Json),
            "yaml" => Ok(Output::Yaml),
            other => Err(format!(
                "{other:?} is not an output format, expected table, json or yaml"
            )),
        }
    }
}

/// One `ctl` command.
#[derive(Debug, Clone)]
pub enum Command {
    Apply {
        files: Vec<PathBuf>,
    },
    Validate {
        files: Vec<PathBuf>,
    },
    Diff {
        files: Vec<PathBuf>,
    },
    Get {
        kind: String,
        name: Option<String>,
        env: Option<String>,
    },
    Delete {
        kind: String,
        name: String,
        env: String,
        namespace: String,
    },
    Shards,
}

/// The canonical kind for what a user typed (`service`, `Services`, `Service`).
pub fn canonical_kind(kind: &str) -> anyhow::Result<&'static str> {
    let k = kind.to_ascii_lowercase();
    KINDS
        .iter()
        .copied()
        .find(|c| {
            let c = c.to_ascii_lowercase();
            k == c || k == format!("{c}s") || (c == "endpoints" && k == "endpoint")
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{kind:?} is not a kind, expected one of {}",
                KINDS.join(", ")
            )
        })
}

/// The documents of the YAML files under `paths` (a file, or a directory's
/// `*.yaml`/`*.yml` in name order), as one multi-document body.
fn read_body(paths: &[PathBuf]) -> anyhow::Result<String> {
    let files = crate::config::watch::list_files(paths)?;
    let contents = crate::config::watch::read_files(&files)?;
    Ok(contents
        .into_iter()
        .map(|(_, text)| text)
        .collect::<Vec<_>>()
        .join("\n---\n"))
}

/// Sends a request; returns the JSON answer of a 2xx, or fails with the hub's error
/// lines (one per config error).
async fn call(admin: &Admin, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Value> {
    let (status, bytes) =
        http_client::request_with(&admin.addr, admin.tls.as_ref(), method, path, body)
            .await
            .with_context(|| format!("asking the hub's admin endpoint {} (--admin)", admin.addr))?;
    let v: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes).trim() }));
    if (200..300).contains(&status) {
        return Ok(v);
    }
    let mut msg = v["error"].as_str().unwrap_or("request failed").to_string();
    for e in v["errors"].as_array().into_iter().flatten() {
        msg.push_str("\n  ");
        msg.push_str(e.as_str().unwrap_or_default());
    }
    bail!("{method} {path}: HTTP {status}: {msg}")
}

fn print_structured(v: &Value, out: Output) -> anyhow::Result<()> {
    match out {
        Output::Yaml => print!("{}", serde_yaml::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

/// A hub's admin endpoint: its address, and the TLS to reach it with (when it
/// serves mutual TLS).
#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: String,
    pub tls: Option<crate::identity::tls::ClientTls>,
}

/// Runs a command against the hub at `admin`; the process exit code.
pub async fn run(cmd: Command, admin: &Admin, out: Output) -> anyhow::Result<i32> {
    match cmd {
        Command::Apply { files } => {
            let r = call(
                admin,
                "POST",
                "/config/apply",
                read_body(&files)?.as_bytes(),
            )
            .await?;
            if out != Output::Table {
                print_structured(&r, out)?;
                return Ok(0);
            }
            for c in r["changes"].as_array().into_iter().flatten() {
                println!("{} {}", object(c), c["action"].as_str().unwrap_or_default());
            }
            Ok(0)
        }
        Command::Validate { files } => {
            let body = read_body(&files)?;
            match call(admin, "POST", "/config/apply?dry_run=true", body.as_bytes()).await {
                Ok(r) => {
                    if out != Output::Table {
                        print_structured(&r, out)?;
                    } else {
                        let n = r["changes"].as_array().map_or(0, Vec::len);
                        println!("valid: {n} object(s)");
                    }
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("{e:#}");
                    Ok(1)
                }
            }
        }
        Command::Diff { files } => {
            let body = read_body(&files)?;
            let r = call(admin, "POST", "/config/apply?dry_run=true", body.as_bytes()).await?;
            if out != Output::Table {
                print_structured(&r, out)?;
            }
            let mut differs = false;
            for c in r["changes"].as_array().into_iter().flatten() {
                if c["action"] == "unchanged" {
                    continue;
                }
                differs = true;
                if out == Output::Table {
                    let before = c["before"].as_str().unwrap_or_default();
                    let after = c["after"].as_str().unwrap_or_default();
                    println!("--- {} (stored)", object(c));
                    println!("+++ {} (applied)", object(c));
                    print!("{}", line_diff(before, after));
                }
            }
            Ok(i32::from(differs))
        }
        Command::Get { kind, name, env } => {
            let kind = canonical_kind(&kind)?;
            let mut path = format!("/config?kind={kind}");
            if let Some(n) = &name {
                path.push_str(&format!("&name={n}"));
            }
            if let Some(e) = &env {
                path.push_str(&format!("&env={e}"));
            }
            let r = call(admin, "GET", &path, b"").await?;
            let objects = r["objects"].as_array().cloned().unwrap_or_default();
            if name.is_some() && objects.is_empty() {
                bail!("{kind} {:?} not found", name.unwrap_or_default());
            }
            match out {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Yaml => {
                    let docs: Vec<&str> = objects
                        .iter()
                        .filter_map(|o| o["document"].as_str())
                        .collect();
                    print!("{}", docs.join("---\n"));
                }
                Output::Table => {
                    let mut rows = vec![
                        ["KIND", "ENVIRONMENT", "NAMESPACE", "NAME", "REVISION"]
                            .map(String::from)
                            .to_vec(),
                    ];
                    for o in &objects {
                        rows.push(vec![
                            text(&o["kind"]),
                            text(&o["environment"]),
                            text(&o["namespace"]),
                            text(&o["name"]),
                            text(&o["mod_revision"]),
                        ]);
                    }
                    println!("{}", table(rows));
                }
            }
            Ok(0)
        }
        Command::Delete {
            kind,
            name,
            env,
            namespace,
        } => {
            let kind = canonical_kind(&kind)?;
            let (env, namespace) = if kind == "Environment" {
                (name.clone(), DEFAULT_NAMESPACE.to_string())
            } else if crate::config::security::is_mesh_kind(kind) {
                (
                    crate::config::security::MESH_SCOPE.to_string(),
                    DEFAULT_NAMESPACE.to_string(),
                )
            } else {
                (env, namespace)
            };
            let path = format!("/config/{env}/{kind}/{namespace}/{name}");
            let r = call(admin, "DELETE", &path, b"").await?;
            if out != Output::Table {
                print_structured(&r, out)?;
            } else {
                for c in r["changes"].as_array().into_iter().flatten() {
                    println!("{} deleted", object(c));
                }
            }
            Ok(0)
        }
        Command::Shards => {
            let v = call(admin, "GET", "/status/shards", b"").await?;
            if out != Output::Table {
                print_structured(&v, out)?;
                return Ok(0);
            }
            println!(
                "replica {} (leader: {})",
                text(&v["replica"]),
                text(&v["leader"])
            );
            if let Some(e) = v["store_error"].as_str() {
                println!("store: {e}");
            }
            let mut replicas = vec![
                ["REPLICA", "XDS", "ADMIN", "STREAMS", "SHARDS"]
                    .map(String::from)
                    .to_vec(),
            ];
            for r in v["replicas"].as_array().into_iter().flatten() {
                replicas.push(vec![
                    text(&r["id"]),
                    text(&r["xds_addr"]),
                    text(&r["admin_addr"]),
                    text(&r["streams"]),
                    r["shards"].as_array().map_or(0, Vec::len).to_string(),
                ]);
            }
            println!("{}\n", table(replicas));
            let live: Vec<&str> = v["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["id"].as_str())
                .collect();
            let mut shards = vec![
                ["ENVIRONMENT", "ZONE", "REPLICAS", "LIVE"]
                    .map(String::from)
                    .to_vec(),
            ];
            for s in v["assignment"]["shards"].as_array().into_iter().flatten() {
                let names: Vec<&str> = s["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let alive = names.iter().filter(|n| live.contains(n)).count();
                shards.push(vec![
                    text(&s["environment"]),
                    text(&s["zone"]),
                    names.join(","),
                    alive.to_string(),
                ]);
            }
            println!("{}", table(shards));
            Ok(0)
        }
    }
}

/// `Kind env/namespace/name` of a change or object.
fn object(c: &Value) -> String {
    format!(
        "{} {}/{}/{}",
        text(&c["kind"]),
        text(&c["environment"]),
        text(&c["namespace"]),
        text(&c["name"])
    )
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Borderless, two spaces between columns, no wrapping (like `tributary status`).
fn table(rows: Vec<Vec<String>>) -> String {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    let mut rows = rows.into_iter();
    t.set_header(rows.next().unwrap_or_default());
    t.add_rows(rows);
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t.trim_fmt()
}

/// A line diff (longest common subsequence; config documents are small): lines only
/// in `a` start with `-`, only in `b` with `+`, common ones with a space.
pub fn line_diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!(" {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_recognized_loosely_and_rejected_by_name() {
        assert_eq!(canonical_kind("services").unwrap(), "Service");
        assert_eq!(canonical_kind("Route").unwrap(), "Route");
        assert_eq!(canonical_kind("endpoint").unwrap(), "Endpoints");
        assert_eq!(canonical_kind("environments").unwrap(), "Environment");
        let e = canonical_kind("pods").unwrap_err().to_string();
        assert!(
            e.contains("\"pods\" is not a kind, expected one of Service"),
            "{e}"
        );
    }

    #[test]
    fn line_diff_marks_changed_lines() {
        let d = line_diff("a\nb\nc\n", "a\nx\nc\nd\n");
        assert_eq!(d, " a\n+x\n-b\n c\n+d\n");
    }
}
