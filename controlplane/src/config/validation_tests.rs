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
