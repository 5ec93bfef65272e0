use super::*;

fn res(name: &str) -> EncodedResource {
    EncodedResource::from_body(
        XdsType::Cluster.type_url(),
        name,
        "0000000000000001",
        name.as_bytes(),
    )
}

fn named(message: &str, sent: &[&str]) -> Option<Vec<String>> {
    let sent: Vec<EncodedResource> = sent.iter().map(|n| res(n)).collect();
    rejected_by_message(message, &sent).map(|set| {
        let mut v: Vec<String> = set.iter().map(|n| n.to_string()).collect();
        v.sort();
        v
    })
}

#[test]
fn envoy_lds_and_cds_messages_name_the_rejected_resources() {
    // Envoy: "Error adding/updating listener(s) NAME: why, NAME: why".
    let msg = "Error adding/updating listener(s) gateway|edge|bad: cannot bind '127.0.0.1:8080': Address already in use";
    assert_eq!(
        named(
            msg,
            &["gateway|edge|bad", "gateway|edge|x1", "gateway|edge|x2"]
        ),
        Some(vec!["gateway|edge|bad".to_string()])
    );
    let msg = "Error adding/updating cluster(s) outbound|8080||c.prod: Proto constraint validation failed (ClusterValidationError.ConnectTimeout: value must be greater than 0s), outbound|8080|v1|c.prod: same";
    assert_eq!(
        named(
            msg,
            &[
                "outbound|8080||c.prod",
                "outbound|8080|v1|c.prod",
                "outbound|8080||d.prod"
            ]
        ),
        Some(vec![
            "outbound|8080|v1|c.prod".to_string(),
            "outbound|8080||c.prod".to_string(),
        ])
    );
}

#[test]
fn a_name_inside_a_longer_name_is_not_a_match() {
    // `reviews.prod` is a prefix of `reviews.prod:9080`; `x` of `x2`; `8080` sits in
    // a cluster name.
    assert_eq!(
        named(
            "Error adding/updating listener(s) reviews.prod:9080: bad",
            &["reviews.prod", "reviews.prod:9080"]
        ),
        Some(vec!["reviews.prod:9080".to_string()])
    );
    assert_eq!(
        named("listener x2: bad", &["x", "x2", "y"]),
        Some(vec!["x2".to_string()])
    );
    assert_eq!(
        named(
            "cluster outbound|8080||a.prod: bad",
            &["8080", "outbound|8080||a.prod"]
        ),
        Some(vec!["outbound|8080||a.prod".to_string()])
    );
    // Quoted, listed, and at the end of a sentence.
    assert_eq!(
        named(
            "resource \"a.prod\" invalid; rejected b.prod.",
            &["a.prod", "b.prod", "c.prod"]
        ),
        Some(vec!["a.prod".to_string(), "b.prod".to_string()])
    );
}

#[test]
fn a_message_naming_nothing_rejects_the_whole_response() {
    assert_eq!(named("failed to decode the response", &["a", "b"]), None);
    // A response of one resource: that one.
    assert_eq!(
        named("failed to decode", &["a"]),
        Some(vec!["a".to_string()])
    );
    assert_eq!(named("", &[]), None);
}

#[test]
fn hostile_messages_cost_bounded_work_and_never_panic() {
    let huge = "é".repeat(400_000);
    assert_eq!(named(&huge, &["a", "b"]), None);
    let names: Vec<String> = (0..2000)
        .map(|i| format!("outbound|{i}||svc.prod"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let msg = names[..1000].join(": bad, ");
    let got = named(&msg, &refs).unwrap();
    assert_eq!(got.len(), 1000);
}
