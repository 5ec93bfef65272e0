//! Route regexes (RE2 syntax) and durations: checked at load, never a panic.

use super::*;

const SERVICE: &str = r#"
apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: reviews, environment: prod}
spec:
  hosts: [reviews.prod]
  ports: [{name: http, port: 9080}]
"#;

fn route_with_match(matcher: &str) -> String {
    format!(
        r#"
apiVersion: tributary.io/v1alpha1
kind: Route
metadata: {{name: reviews, environment: prod}}
spec:
  hosts: [reviews.prod]
  http:
  - match: {matcher}
    destinations: [{{service: reviews}}]
"#
    )
}

fn route_errors(matcher: &str) -> Vec<String> {
    let route = route_with_match(matcher);
    match parse_files([("s.yaml", SERVICE), ("r.yaml", route.as_str())]) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(errs)) => errs.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn invalid_path_regexes_are_rejected_at_load() {
    for (regex, why) in [
        ("(a", "unclosed group"),
        ("(?<=x)y", "look-around"),
        (r"\1", "backreferences are not supported"),
    ] {
        let yaml_regex = regex.replace('\\', "\\\\");
        let errs = route_errors(&format!(r#"{{path: {{regex: "{yaml_regex}"}}}}"#));
        assert_eq!(errs.len(), 1, "{regex}: {errs:#?}");
        let e = &errs[0];
        for part in [
            "r.yaml",
            "document 1 (Route prod/default/reviews)",
            "spec.http[0].match.path.regex",
            "is not a valid RE2 regex",
            why,
        ] {
            assert!(e.contains(part), "{regex}: error {e:?} lacks {part:?}");
        }
    }
}

#[test]
fn invalid_header_regex_is_rejected_at_load() {
    let errs = route_errors(r#"{headers: [{name: x-user, regex: "a)"}]}"#);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("spec.http[0].match.headers[0].regex")
            && errs[0].contains("unopened group"),
        "{errs:#?}"
    );
}

#[test]
fn valid_re2_regexes_are_accepted() {
    // `[a-z]{500}` is valid RE2 syntax that Envoy rejects only for its compiled
    // program size: the loader accepts it so that the proxy's NACK path stays real.
    for regex in [
        "/nack[a-z]{500}",
        "^/api/v[0-9]+/.*$",
        "(?i)/users/(?P<id>\\\\d+)",
    ] {
        let errs = route_errors(&format!(r#"{{path: {{regex: "{regex}"}}}}"#));
        assert!(errs.is_empty(), "{regex}: {errs:#?}");
        let errs = route_errors(&format!(
            r#"{{headers: [{{name: x-user, regex: "{regex}"}}]}}"#
        ));
        assert!(errs.is_empty(), "{regex}: {errs:#?}");
    }
}

#[test]
fn durations_never_panic_and_name_the_value() {
    use std::time::Duration;
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(
        parse_duration(" 250ms ").unwrap(),
        Duration::from_millis(250)
    );
    assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    assert_eq!(parse_duration("315576000000s").unwrap(), MAX_DURATION);
    for bad in [
        "1e20s",
        "-1s",
        "NaN s",
        "inf s",
        "",
        "99999999999999999999999s",
        "18446744073709551615s",
        "315576000001s",
        "20000y",
    ] {
        let e = parse_duration(bad).expect_err(bad);
        assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
    }
    assert!(
        parse_duration("5x")
            .unwrap_err()
            .contains("unknown unit \"x\"")
    );
}

#[test]
fn a_route_timeout_out_of_range_is_a_config_error() {
    let route = route_with_match("{}").replace(
        "destinations: [{service: reviews}]",
        "destinations: [{service: reviews}]\n    timeout: 99999999999999999999999s",
    );
    let errs = match parse_files([("s.yaml", SERVICE), ("r.yaml", route.as_str())]) {
        Ok(_) => panic!("a timeout of 1e23 s accepted"),
        Err(ConfigErrors(errs)) => errs,
    };
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].field, "spec.http[0].timeout");
    assert!(
        errs[0].message.contains("\"99999999999999999999999s\""),
        "{errs:#?}"
    );
}

fn fuzz_cases() -> u32 {
    std::env::var("TRIBUTARY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Any text: a duration within bounds, or an error naming the value; never a panic.
    #[test]
    fn fuzz_parse_duration(
        text in proptest::prop_oneof![
            proptest::prelude::any::<String>(),
            "[-+ ]?[0-9.eEnNaIif]{0,30} ?(ns|us|ms|s|m|h|d|w|y|M|e|x)?( [0-9]{1,25}[a-z]{0,2}){0,3}",
        ]
    ) {
        match parse_duration(&text) {
            Ok(d) => proptest::prop_assert!(d <= MAX_DURATION),
            Err(e) => proptest::prop_assert!(e.contains(&format!("{text:?}")), "{}", e),
        }
    }
}

/// A "billion laughs" file: nine levels of nine aliases. serde_yaml's own repetition
/// limit (100 alias jumps per event) still lets a 40 KB file of this shape build
/// gigabytes of values; the node budget rejects it after counting.
#[test]
fn a_yaml_bomb_is_rejected_before_it_is_built() {
    let mut text = String::from(
        "apiVersion: tributary.io/v1alpha1\nkind: Service\nmetadata: {name: x}\nspec:\n",
    );
    text += &format!("  pad: [{}]\n", vec!["1"; 20_000].join(","));
    text += "  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n";
    for i in 1..10 {
        text += &format!(
            "  a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 9].join(", ")
        );
    }
    let started = std::time::Instant::now();
    let errs = match parse_files([("bomb.yaml", text.as_str())]) {
        Ok(_) => panic!("a YAML bomb accepted"),
        Err(ConfigErrors(errs)) => errs,
    };
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(
        (errs[0].file.as_str(), errs[0].document.as_str()),
        ("bomb.yaml", "document 1")
    );
    assert!(
        errs[0].message.contains("too many alias expansions"),
        "{errs:#?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn anchors_and_aliases_for_shared_snippets_are_fine() {
    let text = r#"
apiVersion: tributary.io/v1alpha1
kind: Service
metadata: {name: reviews, environment: prod}
spec:
  hosts: [reviews.prod]
  ports: [{name: http, port: 9080}]
---
apiVersion: tributary.io/v1alpha1
kind: Endpoints
metadata: {name: reviews, environment: prod}
spec:
  endpoints:
  - {address: 10.0.0.1, port: 9080, labels: &v1 {version: v1, team: books}, locality: &az1 {zone: az1}}
  - {address: 10.0.0.2, port: 9080, labels: *v1, locality: *az1}
"#;
    let mesh = parse_files([("a.yaml", text)]).unwrap();
    let s = mesh.environments["prod"].services.values().next().unwrap();
    assert_eq!(s.endpoints.len(), 2);
    assert_eq!(s.endpoints[1].labels["team"], "books");
    assert_eq!(s.endpoints[1].locality.zone, "az1");
}

/// The node count stops at a syntax error without hiding the errors of the documents
/// before it: both are reported, as without the count.
#[test]
fn a_syntax_error_still_reports_the_documents_before_it() {
    let text = format!("{SERVICE}  subsets: [{{name: Bad_Subset}}]\n---\nkey: [unclosed\n");
    let errs = match parse_files([("s.yaml", text.as_str())]) {
        Ok(_) => panic!("accepted"),
        Err(ConfigErrors(errs)) => errs,
    };
    let mut fields: Vec<_> = errs
        .iter()
        .map(|e| {
            (
                e.document.as_str(),
                e.field.as_str(),
                e.message.split(':').next(),
            )
        })
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            (
                "document 1 (Service prod/default/reviews)",
                "spec.subsets[0].name",
                Some(
                    "\"Bad_Subset\" is not a valid name, expected lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
                )
            ),
            ("document 2", "", Some("invalid YAML")),
        ],
        "{errs:#?}"
    );
}

fn credential_errors(spec: &str) -> Vec<String> {
    let doc = format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: wild, environment: prod}}\nspec: {spec}\n"
    );
    match parse_files([("c.yaml", doc.as_str())]) {
        Ok(_) => Vec::new(),
        Err(ConfigErrors(errs)) => errs.iter().map(ToString::to_string).collect(),
    }
}

/// A credential from a Kubernetes Secret: exactly one source, valid names, each
/// error naming the file, the document and the field.
#[test]
fn kubernetes_secret_credentials_are_validated() {
    let ok = "{kubernetesSecret: {cluster: east-1, namespace: shop, name: wild-tls}}";
    assert_eq!(credential_errors(ok), Vec::<String>::new());
    let mesh = parse_files([(
        "c.yaml",
        format!(
            "apiVersion: tributary.io/v1alpha1\nkind: Credential\nmetadata: {{name: wild, environment: prod}}\nspec: {ok}\n"
        )
        .as_str(),
    )])
    .unwrap();
    let env = &mesh.environments["prod"];
    assert!(env.credentials.is_empty());
    assert_eq!(
        env.secret_credentials.values().next(),
        Some(&crate::model::SecretRef {
            cluster: "east-1".into(),
            namespace: "shop".into(),
            name: "wild-tls".into(),
        })
    );
    for (spec, field, why) in [
        (
            "{kubernetesSecret: {cluster: east-1, namespace: Shop, name: wild-tls}}",
            "spec.kubernetesSecret.namespace",
            "\"Shop\" is not a valid name",
        ),
        (
            "{kubernetesSecret: {cluster: 'east/1', namespace: shop, name: wild-tls}}",
            "spec.kubernetesSecret.cluster",
            "\"east/1\" is not a valid cluster id",
        ),
        (
            "{kubernetesSecret: {cluster: east-1, namespace: shop, name: wild-tls}, certificate: x, privateKey: y}",
            "spec.kubernetesSecret",
            "not both",
        ),
        ("{}", "spec.certificate", "or spec.kubernetesSecret"),
        (
            "{kubernetesSecret: {cluster: east-1, namespace: shop}}",
            "spec",
            "missing field `name`",
        ),
    ] {
        let errs = credential_errors(spec);
        assert_eq!(errs.len(), 1, "{spec}: {errs:#?}");
        for part in ["c.yaml", "Credential prod/default/wild", field, why] {
            assert!(
                errs[0].contains(part),
                "{spec}: {:?} lacks {part:?}",
                errs[0]
            );
        }
    }
}
