//! Property tests of the xDS translation (`scripts/fuzz` runs each `fuzz_` test a
//! million times; `TRIBUTARY_FUZZ_CASES` sets the count, default small for CI).

use proptest::prelude::*;
use prost::Message;
use tributary_proto::envoy::envoy::config::cluster::v3::Cluster;
use tributary_proto::envoy::envoy::config::endpoint::v3::ClusterLoadAssignment;
use tributary_proto::envoy::envoy::config::listener::v3::Listener;
use tributary_proto::envoy::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use tributary_proxy::xds::translate;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("TRIBUTARY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Envoy's virtual host choice, written the obvious way: an exact domain, else the
/// longest matching `*suffix`, else the longest matching `prefix*`, else `*`; each
/// wildcard matching at least one character; case-insensitive.
fn reference(vhosts: &[Vec<String>], host: &str) -> Option<usize> {
    let host = host.to_ascii_lowercase();
    let all = || {
        vhosts
            .iter()
            .enumerate()
            .flat_map(|(i, ds)| ds.iter().map(move |d| (i, d.to_ascii_lowercase())))
    };
    if let Some((i, _)) = all().find(|(_, d)| *d == host) {
        return Some(i);
    }
    let best = |f: &dyn Fn(&str) -> Option<usize>| {
        all()
            .filter_map(|(i, d)| f(&d).map(|len| (len, i)))
            .max_by_key(|(len, _)| *len)
            .map(|(_, i)| i)
    };
    best(&|d| {
        let s = d.strip_prefix('*').filter(|_| d != "*")?;
        (host.len() > s.len() && host.ends_with(s)).then_some(s.len())
    })
    .or_else(|| {
        best(&|d| {
            let p = d.strip_suffix('*').filter(|_| d != "*")?;
            (host.len() > p.len() && host.starts_with(p)).then_some(p.len())
        })
    })
    .or_else(|| all().find(|(_, d)| d == "*").map(|(i, _)| i))
}

fn domain() -> impl Strategy<Value = String> {
    prop_oneof![
        "[aB.]{1,4}",
        "\\*[ab.]{1,3}",
        "[ab.]{1,3}\\*",
        Just("*".to_string()),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_virtual_host_choice(
        vhosts in prop::collection::vec(prop::collection::vec(domain(), 1..4), 1..5),
        host in "[aAb.]{0,5}",
    ) {
        let rc = RouteConfiguration {
            name: "r".into(),
            virtual_hosts: vhosts
                .iter()
                .enumerate()
                .map(|(i, d)| VirtualHost { name: format!("v{i}"), domains: d.clone(), ..Default::default() })
                .collect(),
            ..Default::default()
        };
        let lower: Vec<String> = vhosts.iter().flatten().map(|d| d.to_ascii_lowercase()).collect();
        let unique = lower.iter().collect::<std::collections::BTreeSet<_>>().len() == lower.len();
        match translate::route_table(&rc) {
            Ok(table) => {
                prop_assert!(unique, "a domain claimed twice was accepted");
                let ours = table.virtual_host(&host).map(|v| v.name.clone());
                let want = reference(&vhosts, &host).map(|i| format!("v{i}"));
                prop_assert_eq!(ours, want);
            }
            Err(e) => {
                prop_assert!(!unique, "rejected without a duplicate domain: {}", e);
                prop_assert!(e.contains("claimed twice"), "{}", e);
            }
        }
    }

    /// Whatever bytes arrive, translation answers (a resource or a reason) and never panics.
    #[test]
    fn fuzz_translate_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(l) = Listener::decode(bytes.as_slice()) {
            let _ = translate::listener(&l);
        }
        if let Ok(r) = RouteConfiguration::decode(bytes.as_slice()) {
            let _ = translate::route_table(&r);
        }
        if let Ok(c) = Cluster::decode(bytes.as_slice()) {
            let _ = translate::cluster(&c);
        }
        if let Ok(c) = ClusterLoadAssignment::decode(bytes.as_slice()) {
            let _ = translate::assignment(&c);
        }
    }

    /// TLS contexts and SDS secrets from arbitrary bytes: an answer, never a panic;
    /// and a secret's unusable key is never quoted in the NACK.
    #[test]
    fn fuzz_tls_contexts_and_secrets(
        bytes in prop::collection::vec(any::<u8>(), 0..256),
        key in "[A-Za-z0-9+/]{16,96}",
    ) {
        use tributary_proto::envoy::envoy::config::core::v3::{
            DataSource, TransportSocket, data_source::Specifier, transport_socket::ConfigType,
        };
        use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
            Secret, TlsCertificate, secret,
        };
        use tributary_proxy::tls;
        if let Ok(s) = Secret::decode(bytes.as_slice()) {
            let _ = tls::secret(&s);
        }
        for url in [tls::DOWNSTREAM_TLS, tls::UPSTREAM_TLS] {
            let ts = TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(ConfigType::TypedConfig(tributary_proto::envoy::google::protobuf::Any {
                    type_url: url.into(),
                    value: bytes.clone(),
                })),
            };
            let _ = tls::downstream(&ts);
            let _ = tls::upstream(&ts);
        }
        let inline = |s: String| Some(DataSource {
            specifier: Some(Specifier::InlineString(s)),
            ..Default::default()
        });
        let s = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(certificate_pem().to_string()),
                private_key: inline(format!("-----BEGIN PRIVATE KEY-----\n{key}\n-----END PRIVATE KEY-----\n")),
                ..Default::default()
            })),
        };
        match tls::secret(&s) {
            Ok(_) => prop_assert!(false, "a random key fits the certificate"),
            Err(e) => prop_assert!(!e.contains(&key), "{}", e),
        }
    }
}

/// One real certificate (its key is not used), made once for every case.
fn certificate_pem() -> &'static str {
    static PEM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        use tributary_controlplane::identity::{
            CertificateIssuer, SpiffeId, test_issuer::TestIssuer,
        };
        let issuer = TestIssuer::new("fuzz root", std::time::Duration::from_secs(3600)).unwrap();
        issuer
            .issue(&SpiffeId::parse("spiffe://td.test/env/prod/ns/default/sa/fuzz").unwrap())
            .unwrap()
            .chain_pem
    })
}
