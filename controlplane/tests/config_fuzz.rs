//! Property-based fuzzing of the YAML config parser (`config::parse_files`).
//!
//! - `fuzz_config_parser`: arbitrary text and bytes, and structured hostile documents
//!   (random kinds, fields, values, nesting, duplicate keys and objects, huge numbers,
//!   odd unicode, anchors and aliases): nothing panics, every error names its file and
//!   document, and an accepted file set always yields a model that keeps the
//!   validator's promises.
//! - `fuzz_config_parser_model`: a random valid mesh, rendered to YAML and split over
//!   files, parses to exactly the model that was generated; the same mesh with one
//!   random defect is rejected whole, with an error naming the defect's file and field.
//!
//! Cases: `TRIBUTARY_FUZZ_CASES` (default 2000 for `fuzz_config_parser`, 500 for the
//! costlier `fuzz_config_parser_model`: a few seconds each in a debug build). Each case
//! is a pure function call: no I/O, no runtime. Run a million per target with
//! `TRIBUTARY_FUZZ_CASES=1000000 cargo test --release -p tributary-controlplane --test config_fuzz`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tributary_controlplane::config::{ConfigErrors, parse_files};
use tributary_controlplane::model::{Dependency, HeaderValueMatch, Health, Mesh, PathMatch};

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("TRIBUTARY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// splitmix64: a cheap deterministic generator driven by one proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn word(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }
}

// ---- invariants of any accepted mesh ------------------------------------------------

/// What `parse_files` promises about a mesh it returns.
fn check_invariants(mesh: &Mesh) -> Result<(), String> {
    for (env, e) in &mesh.environments {
        let mut hosts = BTreeSet::new();
        for (key, s) in &e.services {
            if s.key != *key || s.hosts.is_empty() || s.ports.is_empty() {
                return Err(format!("{env}/{key}: key, hosts or ports"));
            }
            for h in &s.hosts {
                if !hosts.insert(h.clone()) {
                    return Err(format!("{env}: host {h} twice"));
                }
            }
            let names: BTreeSet<_> = s.ports.iter().map(|p| &p.name).collect();
            let numbers: BTreeSet<_> = s.ports.iter().map(|p| p.port).collect();
            if names.len() != s.ports.len()
                || numbers.len() != s.ports.len()
                || numbers.contains(&0)
            {
                return Err(format!("{env}/{key}: ports {:?}", s.ports));
            }
            for ep in &s.endpoints {
                if !(1..=1_000_000).contains(&ep.weight)
                    || ep.port == Some(0)
                    || ep.ports.iter().any(|(_, p)| *p == 0)
                    || ep.ports.iter().any(|(n, _)| !names.contains(n))
                {
                    return Err(format!("{env}/{key}: endpoint {ep:?}"));
                }
            }
        }
        for r in &e.routes {
            if r.port == 0 || r.hosts.is_empty() || r.rules.is_empty() {
                return Err(format!("{env}: route {:?}", r.key));
            }
            for rule in &r.rules {
                if rule.destinations.iter().all(|d| d.weight == 0) {
                    return Err(format!("{env}: route {:?}: zero weights", r.key));
                }
                for d in &rule.destinations {
                    let Some(s) = e.services.get(&d.service) else {
                        return Err(format!("{env}: route to missing {}", d.service));
                    };
                    if s.port(d.port).is_none()
                        || d.subset.as_ref().is_some_and(|n| s.subset(n).is_none())
                    {
                        return Err(format!("{env}: route destination {d:?}"));
                    }
                }
                if rule.timeout.is_some_and(|t| t.as_secs() > 315_576_000_000) {
                    return Err(format!("{env}: timeout {:?}", rule.timeout));
                }
            }
        }
        for g in e.gateways.values() {
            let mut seen = BTreeSet::new();
            for l in &g.listeners {
                if l.port == 0 || !seen.insert((l.address, l.port)) {
                    return Err(format!("{env}: gateway {} listeners", g.name));
                }
            }
        }
    }
    Ok(())
}

/// Accepted: the invariants hold. Rejected: every error names one of the files and a
/// document.
fn check_outcome(files: &[(String, String)]) -> Result<Option<Mesh>, TestCaseError> {
    match parse_files(files.iter().map(|(f, t)| (f.as_str(), t.as_str()))) {
        Ok(mesh) => {
            check_invariants(&mesh).map_err(TestCaseError::fail)?;
            Ok(Some(mesh))
        }
        Err(ConfigErrors(errors)) => {
            prop_assert!(!errors.is_empty());
            for e in &errors {
                prop_assert!(
                    files.iter().any(|(f, _)| *f == e.file),
                    "error names no input file: {e}"
                );
                prop_assert!(
                    e.document.starts_with("document "),
                    "error names no document: {e}"
                );
                prop_assert!(!e.message.is_empty(), "empty message: {e}");
            }
            Ok(None)
        }
    }
}

// ---- hostile documents ----------------------------------------------------------------

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "environment",
    "labels",
    "spec",
    "hosts",
    "ports",
    "port",
    "protocol",
    "subsets",
    "service",
    "endpoints",
    "address",
    "locality",
    "region",
    "zone",
    "cluster",
    "weight",
    "health",
    "http",
    "match",
    "path",
    "prefix",
    "exact",
    "regex",
    "headers",
    "present",
    "destinations",
    "subset",
    "timeout",
    "listeners",
    "dependencies",
    "host",
    "version",
    "bogus",
    "\"ｋｉｎｄ\"",
    "\"\"",
    "? [complex, key]",
];

const SCALARS: &[&str] = &[
    "0",
    "1",
    "-1",
    "80",
    "9080",
    "65535",
    "65536",
    "1000000",
    "1000001",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1e400",
    "-1e400",
    "1.5",
    ".nan",
    ".inf",
    "-.inf",
    "0x1F",
    "0o17",
    "1_000",
    "true",
    "false",
    "yes",
    "null",
    "~",
    "''",
    "\"\"",
    "\"\\u202e\"",
    "\"ａｂｃ\"",
    "\"😀\"",
    "\"a\\u0000b\"",
    "\"\\t\"",
    "\"::1\"",
    "\"10.0.0.1\"",
    "\"fe80::1%eth0\"",
    "\"[::1]\"",
    "\"1.2.3.4.5\"",
    "250ms",
    "1.5s",
    "1e20s",
    "99999999999999999999999s",
    "-1s",
    "\"NaN s\"",
    "\"(a\"",
    "\"(?<=x)y\"",
    "\"\\\\1\"",
    "\"/nack[a-z]{500}\"",
    "\"/api/.*\"",
    "HTTP",
    "HTTP2",
    "GRPC",
    "TCP",
    "UDP",
    "HEALTHY",
    "DRAINING",
    "UNHEALTHY",
    "UNKNOWN",
    "Service",
    "Endpoints",
    "Route",
    "Gateway",
    "Sidecar",
    "reviews",
    "reviews.prod",
    "prod",
    "default",
    "v1",
    "http",
    "\"*\"",
    "\"/\"",
    "Reviews",
    "-bad-",
    "a..b",
    "!!binary aGVsbG8=",
    "!custom tagged",
    "!!str 5",
];

/// One random YAML node in flow style, at most `depth` levels deep.
fn node(rng: &mut Rng, depth: u32, anchors: &mut u32, out: &mut String) {
    if rng.chance(8) && *anchors > 0 {
        // An alias: usually to an anchor defined earlier, sometimes to none.
        out.push_str(&format!("*a{}", rng.below(*anchors as usize + 1)));
        return;
    }
    if rng.chance(8) {
        out.push_str(&format!("&a{} ", *anchors));
        *anchors += 1;
    }
    match if depth == 0 { 0 } else { rng.below(4) } {
        0 | 1 => {
            if rng.chance(3) {
                out.push_str(&format!("\"{}\"", "x".repeat(rng.below(400))));
            } else {
                out.push_str(rng.word(SCALARS));
            }
        }
        2 => {
            out.push('[');
            for i in 0..rng.below(5) {
                if i > 0 {
                    out.push_str(", ");
                }
                node(rng, depth - 1, anchors, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            for i in 0..rng.below(5) {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(rng.word(KEYS));
                out.push_str(": ");
                node(rng, depth - 1, anchors, out);
            }
            out.push('}');
        }
    }
}

/// A stream of Kubernetes-looking documents with random headers and specs.
fn hostile_file(rng: &mut Rng) -> String {
    let mut out = String::new();
    let mut anchors = 0;
    for d in 0..1 + rng.below(4) {
        if d > 0 || rng.chance(10) {
            out.push_str(if rng.chance(90) {
                "---\n"
            } else {
                "--- !tag\n"
            });
        }
        if rng.chance(90) {
            out.push_str("apiVersion: ");
            out.push_str(if rng.chance(85) {
                "tributary.io/v1alpha1"
            } else {
                rng.word(SCALARS)
            });
            out.push('\n');
        }
        if rng.chance(90) {
            out.push_str("kind: ");
            out.push_str(rng.word(&[
                "Service",
                "Endpoints",
                "Route",
                "Gateway",
                "Sidecar",
                "Bogus",
                "\"\"",
                "[Service]",
            ]));
            out.push('\n');
        }
        if rng.chance(90) {
            let names = ["reviews", "ratings", "a", "Bad_Name", "\"ｒｅｖ\"", "x"];
            out.push_str(&format!(
                "metadata: {{name: {}, environment: {}",
                rng.pick(&names),
                rng.pick(&["prod", "staging", "default", "\"\""])
            ));
            if rng.chance(30) {
                out.push_str(", namespace: ");
                node(rng, 1, &mut anchors, &mut out);
            }
            if rng.chance(10) {
                out.push_str(", labels: ");
                node(rng, 2, &mut anchors, &mut out);
            }
            out.push_str("}\n");
        }
        if rng.chance(90) {
            out.push_str("spec: ");
            node(rng, 4, &mut anchors, &mut out);
            out.push('\n');
        }
        if rng.chance(10) {
            let junk = [
                "\t- x\n",
                ":::\n",
                "- - -\n",
                "key: [unclosed\n",
                "%YAML 1.1\n",
                "? complex\n: key\n",
                "\"unterminated\n",
                "a: b: c\n",
                "spec: *undefined\n",
                "bogus: 1\n",
                "spec: {}\nspec: {}\n",
            ];
            out.push_str(rng.word(&junk));
        }
    }
    out
}

// ---- valid meshes ---------------------------------------------------------------------

/// What the generator intends, in a form compared field by field with the parsed mesh
/// (so that a field added to the model elsewhere does not break this test).
#[derive(Debug, Default, PartialEq)]
struct Expected {
    /// (env, name) -> (hosts, ports (name, number, protocol), subsets (name, labels)).
    services: BTreeMap<(String, String), ServiceView>,
    /// (env, name) -> (hosts, port, rules).
    routes: BTreeMap<(String, String), RouteView>,
    /// (env, name) -> listeners (name, address, port, hosts).
    gateways: BTreeMap<(String, String), Vec<ListenerView>>,
    /// (env, name) -> dependencies.
    sidecars: BTreeMap<(String, String), Vec<String>>,
}

/// name, address, port, hosts.
type ListenerView = (String, IpAddr, u16, Option<Vec<String>>);
/// A generated service: name, ports (name, number), subsets.
type Generated = (String, Vec<(String, u16)>, Vec<String>);
type ServiceView = (
    Vec<String>,
    Vec<(String, u16, String)>,
    Vec<(String, BTreeMap<String, String>)>,
    Vec<EndpointView>,
);
/// address, port, labels, weight, health, zone.
type EndpointView = (IpAddr, u16, BTreeMap<String, String>, u32, String, String);
type RouteView = (Vec<String>, u16, Vec<RuleView>);
/// path, headers, destinations (service, port, subset, weight), timeout.
type RuleView = (
    String,
    Vec<(String, String)>,
    Vec<(String, u16, Option<String>, u32)>,
    Option<Duration>,
);

fn view(mesh: &Mesh) -> Expected {
    let mut x = Expected::default();
    for (env, e) in &mesh.environments {
        for (key, s) in &e.services {
            let endpoints = s
                .endpoints
                .iter()
                .map(|ep| {
                    (
                        ep.address,
                        ep.port.unwrap_or(0),
                        ep.labels.clone(),
                        ep.weight,
                        format!("{:?}", ep.health),
                        ep.locality.zone.clone(),
                    )
                })
                .collect();
            x.services.insert(
                (env.clone(), key.name.clone()),
                (
                    s.hosts.clone(),
                    s.ports
                        .iter()
                        .map(|p| (p.name.clone(), p.port, format!("{:?}", p.protocol)))
                        .collect(),
                    s.subsets
                        .iter()
                        .map(|s| (s.name.clone(), s.labels.clone()))
                        .collect(),
                    endpoints,
                ),
            );
        }
        for r in &e.routes {
            let rules = r
                .rules
                .iter()
                .map(|rule| {
                    let path = match &rule.path {
                        PathMatch::Prefix(p) => format!("prefix {p}"),
                        PathMatch::Exact(p) => format!("exact {p}"),
                        PathMatch::Regex(p) => format!("regex {p}"),
                    };
                    let headers = rule
                        .headers
                        .iter()
                        .map(|h| {
                            let v = match &h.value {
                                HeaderValueMatch::Exact(v) => format!("exact {v}"),
                                HeaderValueMatch::Prefix(v) => format!("prefix {v}"),
                                HeaderValueMatch::Regex(v) => format!("regex {v}"),
                                HeaderValueMatch::Present => "present".into(),
                            };
                            (h.name.clone(), v)
                        })
                        .collect();
                    let dests = rule
                        .destinations
                        .iter()
                        .map(|d| (d.service.name.clone(), d.port, d.subset.clone(), d.weight))
                        .collect();
                    (path, headers, dests, rule.timeout)
                })
                .collect();
            x.routes.insert(
                (env.clone(), r.key.name.clone()),
                (r.hosts.clone(), r.port, rules),
            );
        }
        for g in e.gateways.values() {
            x.gateways.insert(
                (env.clone(), g.name.clone()),
                g.listeners
                    .iter()
                    .map(|l| (l.name.clone(), l.address, l.port, l.hosts.clone()))
                    .collect(),
            );
        }
        for s in e.sidecars.values() {
            x.sidecars.insert(
                (env.clone(), s.name.clone()),
                s.dependencies
                    .iter()
                    .map(|d| match d {
                        Dependency::Namespace(n) => format!("namespace {n}"),
                        Dependency::Host(h) => format!("host {h}"),
                    })
                    .collect(),
            );
        }
    }
    x
}

fn address(rng: &mut Rng) -> IpAddr {
    if rng.chance(50) {
        IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            (u128::from(rng.next()) << 64) | u128::from(rng.next()),
        ))
    }
}

const DURATIONS: &[(&str, Duration)] = &[
    ("250ms", Duration::from_millis(250)),
    ("1.5s", Duration::from_millis(1500)),
    ("5s", Duration::from_secs(5)),
    ("2m", Duration::from_secs(120)),
    ("1h 30m", Duration::from_secs(5400)),
    ("0s", Duration::ZERO),
];

const REGEXES: &[&str] = &[
    "/api/v[0-9]+/.*",
    "^/users/\\d+$",
    "(?i)/ab+c",
    "/nack[a-z]{500}",
];

/// A random valid mesh: its documents (as YAML values, in load order) and the model
/// they must parse to.
fn valid_mesh(rng: &mut Rng) -> (Vec<Value>, Expected) {
    let mut docs = Vec::new();
    let mut x = Expected::default();
    let envs = ["prod", "staging"];
    // env -> services: (name, ports (name, number), subsets)
    let mut catalog: BTreeMap<&str, Vec<Generated>> = BTreeMap::new();
    for env in envs.iter().take(1 + rng.below(2)) {
        for i in 0..1 + rng.below(4) {
            let name = format!("svc-{i}");
            let mut hosts = vec![format!("{name}.{env}")];
            if rng.chance(50) {
                hosts.push(format!("{name}.{env}.svc.cluster.local"));
            }
            let mut ports = Vec::new();
            let mut port_views = Vec::new();
            let mut numbers = BTreeSet::new();
            for p in 0..1 + rng.below(3) {
                let number = 1 + rng.below(65535) as u16;
                if !numbers.insert(number) {
                    continue;
                }
                let (proto, view) = *rng.pick(&[
                    ("HTTP", "Http"),
                    ("HTTP2", "Http2"),
                    ("GRPC", "Grpc"),
                    ("TCP", "Tcp"),
                ]);
                let pname = format!("p{p}");
                port_views.push((pname.clone(), number, view.to_string()));
                ports.push(json!({"name": pname, "port": number, "protocol": proto}));
            }
            let subsets: Vec<String> = (0..rng.below(3)).map(|s| format!("v{s}")).collect();
            docs.push(json!({
                "apiVersion": "tributary.io/v1alpha1",
                "kind": "Service",
                "metadata": {"name": name, "environment": env},
                "spec": {
                    "hosts": hosts,
                    "ports": ports,
                    "subsets": subsets.iter().map(|s| json!({"name": s, "labels": {"version": s}})).collect::<Vec<_>>(),
                },
            }));
            let mut endpoints = Vec::new();
            let mut endpoint_views = Vec::new();
            for _ in 0..rng.below(4) {
                let a = address(rng);
                let port = 1 + rng.below(65535) as u16;
                let version = format!("v{}", rng.below(3));
                let weight = 1 + rng.below(1_000_000) as u32;
                let (health, hview) = *rng.pick(&[
                    ("HEALTHY", "Healthy"),
                    ("UNHEALTHY", "Unhealthy"),
                    ("DRAINING", "Draining"),
                    ("UNKNOWN", "Unknown"),
                ]);
                let zone = rng.pick(&["", "az1", "az2"]).to_string();
                endpoints.push(json!({
                    "address": a.to_string(), "port": port, "labels": {"version": version},
                    "weight": weight, "health": health, "locality": {"zone": zone},
                }));
                endpoint_views.push((
                    a,
                    port,
                    BTreeMap::from([("version".to_string(), version)]),
                    weight,
                    hview.to_string(),
                    zone,
                ));
            }
            if !endpoints.is_empty() || rng.chance(20) {
                docs.push(json!({
                    "apiVersion": "tributary.io/v1alpha1",
                    "kind": "Endpoints",
                    "metadata": {"name": format!("{name}-eps"), "environment": env},
                    "spec": {"service": name, "endpoints": endpoints},
                }));
            }
            x.services.insert(
                (env.to_string(), name.clone()),
                (
                    hosts,
                    port_views,
                    subsets
                        .iter()
                        .map(|s| (s.clone(), BTreeMap::from([("version".into(), s.clone())])))
                        .collect(),
                    endpoint_views,
                ),
            );
            let port_list = x.services[&(env.to_string(), name.clone())]
                .1
                .iter()
                .map(|(n, p, _)| (n.clone(), *p))
                .collect();
            catalog
                .entry(env)
                .or_default()
                .push((name, port_list, subsets));
        }
    }
    for (env, services) in &catalog {
        for r in 0..rng.below(3) {
            let (owner, owner_ports, _) = rng.pick(services);
            let port = rng.pick(owner_ports).1;
            let host = format!("{owner}.{env}");
            let mut rules = Vec::new();
            let mut rule_views = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let (kind, value) = match rng.below(3) {
                    0 => ("prefix", format!("/p{}", rng.below(10))),
                    1 => ("exact", format!("/e{}", rng.below(10))),
                    _ => ("regex", rng.pick(REGEXES).to_string()),
                };
                let mut m = json!({"path": {kind: value}});
                let mut headers = Vec::new();
                if rng.chance(40) {
                    let (hk, hv) = *rng.pick(&[
                        ("exact", "true"),
                        ("prefix", "canary"),
                        ("regex", "^v[0-9]$"),
                    ]);
                    m["headers"] = json!([{"name": "X-Canary", hk: hv}]);
                    headers.push(("x-canary".to_string(), format!("{hk} {hv}")));
                }
                let mut dests = Vec::new();
                let mut dest_views = Vec::new();
                for d in 0..1 + rng.below(3) {
                    let (svc, ports, subsets) = rng.pick(services);
                    let dport = rng.pick(ports).1;
                    let subset =
                        (!subsets.is_empty() && rng.chance(50)).then(|| rng.pick(subsets).clone());
                    // The first weight is positive: the weights never sum to zero.
                    let weight = if d == 0 {
                        1 + rng.below(100)
                    } else {
                        rng.below(100)
                    } as u32;
                    let mut dj = json!({"service": svc, "port": dport, "weight": weight});
                    if let Some(s) = &subset {
                        dj["subset"] = json!(s);
                    }
                    dests.push(dj);
                    dest_views.push((svc.clone(), dport, subset, weight));
                }
                let mut rule = json!({"match": m, "destinations": dests});
                let timeout = rng.chance(50).then(|| *rng.pick(DURATIONS));
                if let Some((text, _)) = timeout {
                    rule["timeout"] = json!(text);
                }
                rules.push(rule);
                rule_views.push((
                    format!("{kind} {value}"),
                    headers,
                    dest_views,
                    timeout.map(|t| t.1),
                ));
            }
            let name = format!("route-{r}");
            docs.push(json!({
                "apiVersion": "tributary.io/v1alpha1",
                "kind": "Route",
                "metadata": {"name": name, "environment": env},
                "spec": {"hosts": [host], "port": port, "http": rules},
            }));
            x.routes.insert(
                (env.to_string(), name),
                (vec![host.clone()], port, rule_views),
            );
        }
        if rng.chance(50) {
            let mut listeners = Vec::new();
            let mut views = Vec::new();
            let mut used = BTreeSet::new();
            for l in 0..1 + rng.below(2) {
                let a = address(rng);
                let port = 1 + rng.below(65535) as u16;
                if !used.insert((a, port)) {
                    continue;
                }
                let hosts = rng
                    .chance(50)
                    .then(|| vec![format!("{}.{env}", rng.pick(services).0)]);
                let mut lj =
                    json!({"name": format!("l{l}"), "address": a.to_string(), "port": port});
                if let Some(h) = &hosts {
                    lj["hosts"] = json!(h);
                }
                listeners.push(lj);
                views.push((format!("l{l}"), a, port, hosts));
            }
            docs.push(json!({
                "apiVersion": "tributary.io/v1alpha1",
                "kind": "Gateway",
                "metadata": {"name": "edge", "environment": env},
                "spec": {"listeners": listeners},
            }));
            x.gateways.insert((env.to_string(), "edge".into()), views);
        }
        if rng.chance(30) {
            let host = format!("{}.{env}", rng.pick(services).0);
            docs.push(json!({
                "apiVersion": "tributary.io/v1alpha1",
                "kind": "Sidecar",
                "metadata": {"name": "scope", "environment": env},
                "spec": {"dependencies": [{"namespace": "default"}, {"host": host}]},
            }));
            x.sidecars.insert(
                (env.to_string(), "scope".into()),
                vec!["namespace default".into(), format!("host {host}")],
            );
        }
    }
    (docs, x)
}

/// Splits documents over 1..=3 files (contiguous, in order), rendered as YAML.
fn render(rng: &mut Rng, docs: &[Value]) -> Vec<(String, String)> {
    let n = 1 + rng.below(3);
    let mut files: Vec<(String, String)> = (0..n)
        .map(|i| (format!("f{i}.yaml"), String::new()))
        .collect();
    let mut file = 0;
    for (i, d) in docs.iter().enumerate() {
        if i > 0 && file + 1 < n && rng.chance(40) {
            file += 1;
        }
        let text = &mut files[file].1;
        if !text.is_empty() {
            text.push_str("---\n");
        }
        text.push_str(&serde_yaml::to_string(d).unwrap());
    }
    files
}

/// One defect in a valid document set: (document index, what to break, field the
/// error must name).
fn break_one(rng: &mut Rng, docs: &mut Vec<Value>) -> (usize, String) {
    loop {
        let i = rng.below(docs.len());
        let kind = docs[i]["kind"].as_str().unwrap().to_string();
        match (rng.below(8), kind.as_str()) {
            (0, "Service") => {
                docs[i]["spec"]["ports"][0]["port"] = json!(*rng.pick(&[0i64, 65536, -1, 1 << 40]));
                return (i, "spec.ports[0].port".into());
            }
            (1, "Endpoints") if !docs[i]["spec"]["endpoints"].as_array().unwrap().is_empty() => {
                docs[i]["spec"]["endpoints"][0]["address"] =
                    json!(*rng.pick(&["10.0.0.256", "host.example", "::g", ""]));
                return (i, "spec.endpoints[0].address".into());
            }
            (2, "Route") => {
                docs[i]["spec"]["http"][0]["destinations"][0]["service"] = json!("missing");
                return (i, "spec.http[0].destinations[0].service".into());
            }
            (3, "Route") => {
                docs[i]["spec"]["http"][0]["match"]["path"] =
                    json!({"regex": *rng.pick(&["(a", "(?<=x)y", "\\1", "a{2,1}"])});
                return (i, "spec.http[0].match.path.regex".into());
            }
            (4, "Route") => {
                docs[i]["spec"]["http"][0]["timeout"] =
                    json!(*rng.pick(&["1e20s", "99999999999999999999999s", "-1s", "5"]));
                return (i, "spec.http[0].timeout".into());
            }
            (5, _) => {
                docs[i]["spec"]["bogus"] = json!(1);
                return (i, "spec".into());
            }
            (6, _) => {
                let copy = docs[i].clone();
                docs.insert(i + 1, copy);
                return (i + 1, "metadata.name".into());
            }
            (7, _) => {
                docs[i]["metadata"]["name"] = json!(*rng.pick(&["Bad_Name", "-x", "", "ｒｅｖ"]));
                return (i, "metadata.name".into());
            }
            _ => continue,
        }
    }
}

/// The file holding document `index` after [`render`].
fn file_of(files: &[(String, String)], index: usize) -> String {
    let mut seen = 0;
    for (name, text) in files {
        let n = serde_yaml::Deserializer::from_str(text).count();
        if index < seen + n {
            return name.clone();
        }
        seen += n;
    }
    unreachable!("document {index} is in no file")
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn fuzz_config_parser(
        seed in any::<u64>(),
        text in any::<String>(),
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        mode in 0u8..4,
    ) {
        let mut rng = Rng(seed);
        let files: Vec<(String, String)> = match mode {
            0 => vec![("any.yaml".into(), text)],
            1 => vec![("bytes.yaml".into(), String::from_utf8_lossy(&bytes).into_owned())],
            // A hostile file next to a valid one: the whole set is judged.
            2 => {
                let (docs, _) = valid_mesh(&mut rng);
                let mut files = render(&mut rng, &docs);
                files.push(("hostile.yaml".into(), hostile_file(&mut rng)));
                files
            }
            _ => (0..1 + rng.below(3))
                .map(|i| (format!("h{i}.yaml"), hostile_file(&mut rng)))
                .collect(),
        };
        check_outcome(&files)?;
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn fuzz_config_parser_model(seed in any::<u64>()) {
        let mut rng = Rng(seed);
        let (mut docs, expected) = valid_mesh(&mut rng);
        let files = render(&mut rng, &docs);
        let mesh = check_outcome(&files)?;
        let Some(mesh) = mesh else {
            let errors = parse_files(files.iter().map(|(f, t)| (f.as_str(), t.as_str())));
            return Err(TestCaseError::fail(format!("a valid mesh was rejected: {errors:?}\n{files:#?}")));
        };
        prop_assert_eq!(view(&mesh), expected);
        for env in mesh.environments.values() {
            for s in env.services.values() {
                for ep in &s.endpoints {
                    prop_assert!(matches!(ep.health, Health::Healthy | Health::Unhealthy | Health::Draining | Health::Unknown));
                }
            }
        }

        // One defect: the whole set is rejected, naming the defect's file and field.
        let (index, field) = break_one(&mut rng, &mut docs);
        let files = render(&mut rng, &docs);
        let file = file_of(&files, index);
        match parse_files(files.iter().map(|(f, t)| (f.as_str(), t.as_str()))) {
            Ok(_) => return Err(TestCaseError::fail(format!("defect in {field} accepted:\n{files:#?}"))),
            Err(ConfigErrors(errors)) => {
                prop_assert!(
                    errors.iter().any(|e| e.file == file && e.field.starts_with(&field)),
                    "no error names {} {}: {:#?}", file, field, errors
                );
            }
        }
    }
}
