use super::*;

const SERVICE: &str = r#"
apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: reviews, environment: prod}
spec:
  hosts: [reviews.prod, reviews]
  ports: [{name: http, port: 9080, protocol: HTTP}]
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn parse(files: &[(&str, &str)]) -> Result<Mesh, ConfigErrors> {
    parse_files(files.iter().copied())
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    parse(files)
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn assert_one_error(files: &[(&str, &str)], expected: &[&str]) {
    let errs = errors(files);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    for part in expected {
        assert!(errs[0].contains(part), "error {:?} lacks {part:?}", errs[0]);
    }
}

#[test]
fn parses_the_bundled_example() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let (_, mesh) = watch::load(&[dir]).expect("examples/mesh is valid");
    let prod = &mesh.environments["prod"];
    let reviews = &prod.services[&ObjectKey {
        namespace: "default".into(),
        name: "reviews".into(),
    }];
    assert_eq!(reviews.hosts, vec!["reviews.prod", "reviews"]);
    assert_eq!(reviews.endpoints.len(), 2);
    assert_eq!(
        reviews.endpoints[1].address,
        "::1".parse::<IpAddr>().unwrap()
    );
    assert_eq!(prod.routes[0].port, 9080);
    assert_eq!(
        prod.routes[0].rules[1]
            .destinations
            .iter()
            .map(|d| d.weight)
            .collect::<Vec<_>>(),
        vec![80, 20]
    );
    assert_eq!(prod.gateways["edge"].listeners[0].port, 18080);
}

#[test]
fn endpoints_merge_across_documents_and_keep_locality() {
    let eps = r#"
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: reviews-c1, environment: prod}
spec:
  service: reviews
  endpoints:
  - {address: 10.0.0.1, port: 9080, locality: {region: r1, zone: z1, cluster: c1}, labels: {version: v1}, weight: 3, health: DRAINING}
---
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: reviews-c2, environment: prod}
spec:
  service: reviews
  endpoints:
  - {address: "fd00::2", ports: {http: 19080}, locality: {zone: z2}}
"#;
    let mesh = parse(&[("s.yaml", SERVICE), ("e.yaml", eps)]).unwrap();
    let svc = mesh.environments["prod"].services.values().next().unwrap();
    assert_eq!(svc.endpoints.len(), 2);
    assert_eq!(svc.endpoints[0].weight, 3);
    assert_eq!(svc.endpoints[0].health, Health::Draining);
    assert_eq!(svc.endpoints[0].locality.cluster, "c1");
    assert_eq!(svc.endpoints[1].port_for(&svc.ports[0]), Some(19080));
}

#[test]
fn invalid_yaml_names_the_file_and_document() {
    assert_one_error(
        &[("bad.yaml", "apiVersion: [unclosed\n")],
        &["bad.yaml", "document 1", "invalid YAML"],
    );
}

#[test]
fn unknown_field_is_rejected_with_its_path() {
    let text = SERVICE.replace("protocol: HTTP", "protocl: HTTP");
    assert_one_error(
        &[("s.yaml", &text)],
        &[
            "s.yaml",
            "Service prod/default/reviews",
            "spec.ports[0]",
            "unknown field `protocl`",
        ],
    );
    let text = SERVICE.replace("spec:", "colour: blue\nspec:");
    assert_one_error(&[("s.yaml", &text)], &["unknown field `colour`"]);
}

#[test]
fn duplicate_names_are_rejected() {
    assert_one_error(
        &[("a.yaml", SERVICE), ("b.yaml", SERVICE)],
        &[
            "b.yaml",
            "metadata.name",
            "duplicate Service default/reviews",
            "first defined in a.yaml",
        ],
    );
}

#[test]
fn the_same_name_in_two_environments_is_fine() {
    let staging = SERVICE.replace("environment: prod", "environment: staging");
    let mesh = parse(&[("a.yaml", SERVICE), ("b.yaml", &staging)]).unwrap();
    assert_eq!(mesh.environments.len(), 2);
}

#[test]
fn port_out_of_range_is_rejected() {
    let text = SERVICE.replace("port: 9080", "port: 70000");
    assert_one_error(
        &[("s.yaml", &text)],
        &[
            "spec.ports[0].port",
            "70000 is out of range, expected 1..=65535",
        ],
    );
    let text = SERVICE.replace("port: 9080", "port: 0");
    assert_one_error(
        &[("s.yaml", &text)],
        &["spec.ports[0].port", "0 is out of range"],
    );
}

#[test]
fn bad_endpoint_address_is_rejected() {
    let eps = r#"
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: reviews, environment: prod}
spec:
  endpoints: [{address: 300.1.1.1, port: 80}]
"#;
    assert_one_error(
        &[("s.yaml", SERVICE), ("e.yaml", eps)],
        &[
            "e.yaml",
            "spec.endpoints[0].address",
            "not an IPv4 or IPv6 address",
        ],
    );
}

#[test]
fn endpoints_for_a_missing_service_are_rejected() {
    let eps = r#"
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: ghost, environment: prod}
spec:
  endpoints: [{address: 10.0.0.1, port: 80}]
"#;
    assert_one_error(
        &[("s.yaml", SERVICE), ("e.yaml", eps)],
        &[
            "spec.service",
            "default/ghost is not a Service in environment \"prod\"",
        ],
    );
}

const ROUTE: &str = r#"
apiVersion: tributary.io/v1alpha1
kind: Route
metadata: {name: reviews, environment: prod}
spec:
  hosts: [reviews.prod]
  http:
  - destinations:
    - {service: reviews, subset: v1, weight: 80}
    - {service: reviews, subset: v2, weight: 20}
"#;

#[test]
fn route_to_a_missing_service_is_rejected() {
    let text = ROUTE.replace(
        "{service: reviews, subset: v2",
        "{service: ratings, subset: v2",
    );
    assert_one_error(
        &[("s.yaml", SERVICE), ("r.yaml", &text)],
        &[
            "r.yaml",
            "Route prod/default/reviews",
            "spec.http[0].destinations[1].service",
            "default/ratings is not a Service",
        ],
    );
}

#[test]
fn route_to_a_missing_subset_is_rejected() {
    let text = ROUTE.replace("subset: v2", "subset: v9");
    assert_one_error(
        &[("s.yaml", SERVICE), ("r.yaml", &text)],
        &["destinations[1].subset", "\"v9\" is not a subset"],
    );
}

#[test]
fn weights_summing_to_zero_are_rejected() {
    let text = ROUTE
        .replace("weight: 80", "weight: 0")
        .replace("weight: 20", "weight: 0");
    assert_one_error(
        &[("s.yaml", SERVICE), ("r.yaml", &text)],
        &["spec.http[0].destinations", "weights sum to zero"],
    );
}

#[test]
fn route_for_an_unknown_host_is_rejected() {
    let text = ROUTE.replace("hosts: [reviews.prod]", "hosts: [nope.prod]");
    let errs = errors(&[("s.yaml", SERVICE), ("r.yaml", &text)]);
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.hosts[0]") && e.contains("\"nope.prod\" is not a host")),
        "{errs:#?}"
    );
}

#[test]
fn every_error_of_a_file_set_is_reported() {
    let svc = SERVICE.replace("port: 9080", "port: 99999");
    let eps = "apiVersion: tributary.io/v1alpha1\nkind: Endpoints\nmetadata: {name: x}\nspec: {endpoints: [{address: nope, port: 1}]}\n";
    let errs = errors(&[
        ("s.yaml", &svc),
        ("e.yaml", eps),
        (
            "k.yaml",
            "apiVersion: tributary.io/v1alpha1\nkind: Mystery\nmetadata: {name: m}\n",
        ),
    ]);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("s.yaml") && e.contains("99999")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("e.yaml") && e.contains("spec.service")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("k.yaml") && e.contains("\"Mystery\" is not a known kind")),
        "{errs:#?}"
    );
}

#[test]
fn wrong_api_version_and_bad_names_are_rejected() {
    let text = SERVICE.replace("tributary.io/v1alpha1", "v1");
    assert_one_error(
        &[("s.yaml", &text)],
        &["apiVersion", "\"v1\" is not supported"],
    );
    let text = SERVICE.replace("name: reviews,", "name: Reviews_1,");
    assert_one_error(
        &[("s.yaml", &text)],
        &["metadata.name", "\"Reviews_1\" is not a valid name"],
    );
}

#[test]
fn gateway_listeners_are_validated() {
    let gw = r#"
apiVersion: tributary.io/v1alpha1
kind: Gateway
metadata: {name: edge, environment: prod}
spec:
  listeners:
  - {name: a, address: "::1", port: 8080}
  - {name: b, address: "::1", port: 8080}
"#;
    assert_one_error(
        &[("g.yaml", gw)],
        &["spec.listeners[1].port", "already used by listener \"a\""],
    );
    let ok = gw.replace(
        "port: 8080}\n  - {name: b, address: \"::1\", port: 8080}",
        "port: 8080}",
    );
    let mesh = parse(&[("g.yaml", &ok)]).unwrap();
    let l = &mesh.environments["prod"].gateways["edge"].listeners[0];
    assert_eq!(l.address, "::1".parse::<IpAddr>().unwrap());
    assert!(l.hosts.is_none());
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert!(parse_duration("5").unwrap_err().contains("no unit"));
    // humantime's units: days are a unit; an unknown one is still an error.
    assert_eq!(
        parse_duration("5d").unwrap(),
        Duration::from_secs(5 * 86400)
    );
    assert!(parse_duration("5q").unwrap_err().contains("unknown unit"));
}

#[test]
fn hosts_are_unique_within_an_environment() {
    let other = SERVICE
        .replace("name: reviews,", "name: reviews2,")
        .replace("hosts: [reviews.prod, reviews]", "hosts: [reviews]");
    assert_one_error(
        &[("a.yaml", SERVICE), ("b.yaml", &other)],
        &[
            "b.yaml",
            "spec.hosts[0]",
            "\"reviews\" is already used by Service default/reviews",
        ],
    );
    let twice = SERVICE.replace(
        "hosts: [reviews.prod, reviews]",
        "hosts: [reviews, reviews]",
    );
    assert_one_error(&[("a.yaml", &twice)], &["spec.hosts[1]", "duplicate host"]);
}

#[test]
fn environment_definitions_name_their_zones() {
    let mesh = parse_files([(
        "env.yaml",
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1, az2]}\n",
    )])
    .unwrap();
    assert_eq!(mesh.environments["prod"].zones, ["az1", "az2"]);
    for (doc, want) in [
        (
            "kind: Environment\nmetadata: {name: prod}\nspec: {zones: []}\n",
            "e.yaml: document 1 (Environment prod/default/prod): spec.zones: must list at least one zone",
        ),
        (
            "kind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1, az1]}\n",
            "e.yaml: document 1 (Environment prod/default/prod): spec.zones[1]: duplicate zone \"az1\"",
        ),
        (
            "kind: Environment\nmetadata: {name: prod}\nspec: {zones: [AZ_1]}\n",
            "e.yaml: document 1 (Environment prod/default/prod): spec.zones[0]: \"AZ_1\" is not a valid name",
        ),
        (
            "kind: Environment\nmetadata: {name: prod, environment: staging}\nspec: {zones: [a]}\n",
            "e.yaml: document 1 (Environment prod): metadata.environment: must be omitted or equal metadata.name \"prod\"",
        ),
        (
            "kind: Environment\nmetadata: {name: prod}\nspec: {zones: [a], regions: [b]}\n",
            "e.yaml: document 1 (Environment prod/default/prod): spec.regions: unknown field `regions`, expected one of `zones`, `eastWestGateways`, `locality`",
        ),
    ] {
        let text = format!("apiVersion: tributary.io/v1alpha1\n{doc}");
        let errs = parse_files([("e.yaml", text.as_str())]).unwrap_err();
        let got: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
        assert!(got.iter().any(|e| e.starts_with(want)), "{want}\n{got:#?}");
    }
}

#[test]
fn environments_name_their_zones_east_west_gateways_and_local_share() {
    let mesh = parse_files([(
        "env.yaml",
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec:\n  zones: [az1, az2]\n  eastWestGateways:\n  - {zone: az1, address: 10.0.1.10, port: 15443}\n  - {zone: az2, address: \"fd00::2\", port: 15443}\n  locality: {localPercent: 98}\n",
    )])
    .unwrap();
    let l = &mesh.environments["prod"].locality;
    assert_eq!(l.local_percent, 98);
    assert_eq!(l.gateways["az1"].to_string(), "10.0.1.10:15443");
    assert_eq!(l.gateways["az2"].to_string(), "[fd00::2]:15443");
    assert!(mesh.environments["prod"].zone_views());
    // Without the fields: no gateways, everything local.
    let plain = parse_files([(
        "env.yaml",
        "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {name: prod}\nspec: {zones: [az1, az2]}\n",
    )])
    .unwrap();
    assert_eq!(
        plain.environments["prod"].locality,
        crate::model::ZoneLocality::default()
    );
    assert_eq!(plain.environments["prod"].locality.local_percent, 100);
    assert!(!plain.environments["prod"].zone_views());
    let p = "e.yaml: document 1 (Environment prod/default/prod): ";
    for (spec, want) in [
        (
            "{zones: [az1, az2], eastWestGateways: [{zone: az3, address: 10.0.0.1, port: 1}]}",
            "spec.eastWestGateways[0].zone: \"az3\" is not a zone of this environment, expected one of spec.zones [\"az1\", \"az2\"]",
        ),
        (
            "{zones: [az1, az2], eastWestGateways: [{zone: az1, address: 10.0.0.1, port: 1}, {zone: az1, address: 10.0.0.2, port: 1}]}",
            "spec.eastWestGateways[1].zone: zone \"az1\" already has an east-west gateway",
        ),
        (
            "{zones: [az1, az2], eastWestGateways: [{zone: az1, address: gw.example, port: 1}]}",
            "spec.eastWestGateways[0].address: \"gw.example\" is not an IPv4 or IPv6 address",
        ),
        (
            "{zones: [az1, az2], eastWestGateways: [{zone: az1, address: \"::\", port: 1}]}",
            "spec.eastWestGateways[0].address: \"::\" is not an address other zones' proxies can connect to",
        ),
        (
            "{zones: [az1, az2], eastWestGateways: [{zone: az1, address: 10.0.0.1, port: 0}]}",
            "spec.eastWestGateways[0].port: 0 is out of range, expected 1..=65535",
        ),
        (
            "{zones: [az1, az2], locality: {localPercent: 0}}",
            "spec.locality.localPercent: 0 is out of range, expected 1..=100",
        ),
        (
            "{zones: [az1, az2], locality: {localPercent: 101}}",
            "spec.locality.localPercent: 101 is out of range, expected 1..=100",
        ),
    ] {
        let text = format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Environment\nmetadata: {{name: prod}}\nspec: {spec}\n"
        );
        let errs = parse_files([("e.yaml", text.as_str())]).unwrap_err();
        let got: Vec<String> = errs.0.iter().map(ToString::to_string).collect();
        let want = format!("{p}{want}");
        assert!(got.iter().any(|e| e.starts_with(&want)), "{want}\n{got:#?}");
    }
}
