//! mTLS with certificates from SDS against a real, in-process hub issuing them
//! (`--mesh-mtls`, as `controlplane/tests/sds.rs` starts it): two proxies talk mTLS
//! through the hub's own config; the server-side proxy refuses plaintext, another
//! CA and another environment; a rotated certificate applies to new handshakes while
//! an established connection keeps working; `/ready` waits for the certificates.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls::pki_types::CertificateDer;
use tributary_controlplane::app::MeshIdentity;
use tributary_controlplane::identity::test_issuer::TestIssuer;
use tributary_controlplane::identity::{CertificateIssuer, SpiffeId};
use tributary_proto::envoy::envoy::config::core::v3::{DataSource, data_source::Specifier};
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use tributary_proxy::Proxy;
use tributary_proxy::tls::{ClientTls, Pattern, SanMatcher, SecretSet, TlsContext, Validation};

const TD: &str = "td.test";
/// The inbound port of scope `back` (the proxy binds it on an ephemeral port).
const INBOUND: u16 = 15006;
const INBOUND_LISTENER: &str = "sidecar|back|inbound|15006";

async fn mesh_hub(issuer: Arc<TestIssuer>, files: &[(&str, String)]) -> TestHub {
    TestHub::start_with(files, move |cfg| {
        cfg.mesh_identity = Some(MeshIdentity {
            trust_domain: TD.into(),
            issuer,
        })
    })
    .await
}

fn back_scope(app_port: u16) -> String {
    format!(
        "apiVersion: tributary.io/v1alpha1\nkind: Sidecar\nmetadata: {{name: back, environment: prod}}\nspec:\n  dependencies: [{{namespace: default}}]\n  inbound: [{{port: {INBOUND}, targetPort: {app_port}, targetAddress: 127.0.0.1, bind: 127.0.0.1}}]\n"
    )
}

/// A workload proxy of namespace `default` with service account `sa` (its SDS
/// identity), in scope `scope` if given.
async fn workload(hub: &TestHub, sa: &str, scope: Option<&str>) -> Proxy {
    let mut meta = format!("tributary.io/namespace: default, tributary.io/service-account: {sa}");
    if let Some(s) = scope {
        meta.push_str(&format!(", tributary.io/sidecar: {s}"));
    }
    start_proxy(bootstrap(hub.hub.xds_addr, "delta", &meta)).await
}

/// Where listener `name` is bound, once the proxy holds and binds it.
async fn bound(p: &Proxy, name: &str) -> std::net::SocketAddr {
    tokio::time::timeout(TIMEOUT, p.listener_addr(name))
        .await
        .unwrap_or_else(|_| panic!("listener {name} is bound within the timeout"))
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

/// A test client's TLS, through the proxy's own upstream TLS: our certificate for
/// `id` from `cert_issuer`, the server checked against `trust` and the SAN prefix.
fn client_tls(
    cert_issuer: &TestIssuer,
    id: &str,
    trust: &TestIssuer,
    san_prefix: &str,
) -> ClientTls {
    let cert = cert_issuer.issue(&SpiffeId::parse(id).unwrap()).unwrap();
    let mut secrets = SecretSet {
        generation: 1,
        ..Default::default()
    };
    let mine = Secret {
        name: "me".into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&cert.chain_pem),
            private_key: inline(&cert.key_pem),
            ..Default::default()
        })),
    };
    let roots = Secret {
        name: "roots".into(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(&trust.trust_bundle_pem()),
                ..Default::default()
            },
        )),
    };
    for s in [mine, roots] {
        let v =
            tributary_proxy::tls::secret(&Secret::decode(s.encode_to_vec().as_slice()).unwrap())
                .unwrap();
        secrets.secrets.insert(s.name, v);
    }
    ClientTls::new(
        TlsContext {
            certificate: Some("me".into()),
            validation: Some(Validation {
                trust: "roots".into(),
                san: vec![SanMatcher {
                    uri: true,
                    pattern: Pattern::Prefix(san_prefix.into()),
                    ignore_case: false,
                }],
            }),
            alpn: vec!["http/1.1".into()],
            require_client_certificate: false,
            sni: None,
        },
        Arc::new(ArcSwap::from_pointee(secrets)),
    )
}

/// An HTTP/1.1 connection over TLS to `addr`: the request sender and the server's
/// leaf certificate.
async fn tls_connection(
    tls: &ClientTls,
    addr: std::net::SocketAddr,
) -> std::io::Result<(
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    CertificateDer<'static>,
)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let stream = tls.connect(tcp, addr.ip()).await?;
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok((sender, leaf))
}

/// GET / on an established connection: (status, x-backend, the XFCC the app saw).
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<(u16, String, String), hyper::Error> {
    let req = Request::get("/")
        .header("host", "back")
        .header("x-forwarded-client-cert", "By=forged")
        .body(Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(TIMEOUT, sender.send_request(req))
        .await
        .expect("an answer within the timeout")?;
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let out = (
        resp.status().as_u16(),
        header("x-backend"),
        header("x-echo-xfcc"),
    );
    let _ = resp.into_body().collect().await;
    Ok(out)
}

fn secret_version(dump: &serde_json::Value, name: &str) -> Option<String> {
    dump["secrets"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .map(|s| s["version"].as_str().unwrap().to_string())
}

async fn config_dump(p: &Proxy) -> serde_json::Value {
    serde_json::from_str(&admin(p, "/config_dump").await.1).unwrap()
}

#[tokio::test]
async fn two_proxies_talk_mtls_through_the_hubs_config_and_the_server_side_refuses_others() {
    let issuer = Arc::new(TestIssuer::new("mesh root", Duration::from_secs(3600)).unwrap());
    let app = Backend::start("app", Mode::Ok).await;
    let hub = mesh_hub(
        issuer.clone(),
        &[
            ("services.yaml", service("back", 8080, "HTTP")),
            ("sidecar.yaml", back_scope(app.addr.port())),
        ],
    )
    .await;
    // The server side: scope `back`, its inbound listener terminating mTLS.
    let back = workload(&hub, "back", Some("back")).await;
    ready(&back).await;
    let inbound = bound(&back, INBOUND_LISTENER).await;
    hub.write(
        "endpoints.yaml",
        &endpoints("back", &[(inbound, "v1", "z1")]),
    );
    // The client side: its outbound cluster to `back` originates mTLS.
    let front = workload(&hub, "front", None).await;
    ready(&front).await;
    let outbound = bound(&front, "0.0.0.0_8080").await;
    let c = client();
    until("a request goes front → back over mTLS", || async {
        get(&c, outbound, "back.prod", "/", &[]).await == (200, "app".into())
    })
    .await;
    let dump = config_dump(&front).await;
    assert_eq!(dump["certificates_loaded"], true, "{dump}");

    // The app is told who called, by the caller's SPIFFE id (a forged header is
    // replaced): a direct mTLS client of the mesh, identity `tester`.
    let tester = format!("spiffe://{TD}/env/prod/ns/default/sa/tester");
    let tls = client_tls(
        &issuer,
        &tester,
        &issuer,
        &format!("spiffe://{TD}/env/prod/ns/default/"),
    );
    let (mut sender, _) = tls_connection(&tls, inbound)
        .await
        .expect("a mesh client is accepted");
    let (status, backend, xfcc) = get_on(&mut sender).await.unwrap();
    assert_eq!((status, backend.as_str()), (200, "app"));
    assert!(
        xfcc.starts_with(&format!(
            "By=spiffe://{TD}/env/prod/ns/default/sa/back;Hash="
        )),
        "{xfcc}"
    );
    assert!(xfcc.ends_with(&format!(";URI={tester}")), "{xfcc}");
    assert!(!xfcc.contains("forged"), "{xfcc}");

    // Plaintext is refused: no HTTP answer, the connection is closed.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: back\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, tcp.read_to_end(&mut buf))
            .await
            .expect("the proxy closes a plaintext connection");
        assert!(
            !buf.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&buf)
        );
    }
    // A certificate of another CA is refused (the client trusts the server: the
    // refusal is the server's).
    let other = TestIssuer::new("another root", Duration::from_secs(3600)).unwrap();
    let stranger = client_tls(&other, &tester, &issuer, &format!("spiffe://{TD}/"));
    refused(&stranger, inbound).await;
    // So is a certificate of the mesh's CA for another environment (SAN check).
    let staging = client_tls(
        &issuer,
        &format!("spiffe://{TD}/env/staging/ns/default/sa/tester"),
        &issuer,
        &format!("spiffe://{TD}/"),
    );
    refused(&staging, inbound).await;
    assert!(app.hits.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

/// The server refuses `tls`'s client: no response on the connection.
async fn refused(tls: &ClientTls, addr: std::net::SocketAddr) {
    // With TLS 1.3 the client finishes its handshake before the server has checked
    // its certificate: the refusal shows on the first request.
    match tls_connection(tls, addr).await {
        Err(_) => {}
        Ok((mut sender, _)) => {
            let r = get_on(&mut sender).await;
            assert!(r.is_err(), "the server answered a refused client: {r:?}");
        }
    }
}

#[tokio::test]
async fn a_rotated_certificate_applies_to_new_handshakes_and_keeps_established_connections() {
    // Leaves live 8 s: the hub re-issues each identity's at half-life.
    let issuer = Arc::new(TestIssuer::new("mesh root", Duration::from_secs(8)).unwrap());
    let app = Backend::start("app", Mode::Ok).await;
    let hub = mesh_hub(
        issuer.clone(),
        &[
            ("services.yaml", service("back", 8080, "HTTP")),
            ("sidecar.yaml", back_scope(app.addr.port())),
        ],
    )
    .await;
    let back = workload(&hub, "back", Some("back")).await;
    ready(&back).await;
    let inbound = bound(&back, INBOUND_LISTENER).await;
    let first = secret_version(&config_dump(&back).await, "default").expect("a certificate");

    let tester = format!("spiffe://{TD}/env/prod/ns/default/sa/tester");
    let prefix = format!("spiffe://{TD}/env/prod/ns/default/sa/back");
    let tls = client_tls(&issuer, &tester, &issuer, &prefix);
    let (mut held, old_leaf) = tls_connection(&tls, inbound).await.unwrap();
    assert_eq!(get_on(&mut held).await.unwrap().0, 200);

    until("the hub rotates the proxy's certificate", || async {
        secret_version(&config_dump(&back).await, "default").is_some_and(|v| v != first)
    })
    .await;
    // The established connection keeps working.
    assert_eq!(get_on(&mut held).await.unwrap().0, 200);
    // A new handshake gets the new certificate (still the proxy's identity: the SAN
    // prefix is checked by the client).
    let (mut fresh, new_leaf) = tls_connection(&tls, inbound).await.unwrap();
    assert_ne!(
        old_leaf, new_leaf,
        "a new handshake presents the rotated certificate"
    );
    assert_eq!(get_on(&mut fresh).await.unwrap().0, 200);
    assert_eq!(get_on(&mut held).await.unwrap().0, 200);
    assert!(back.is_ready());
}

#[tokio::test]
async fn not_ready_while_certificates_are_missing() {
    let issuer = Arc::new(TestIssuer::new("mesh root", Duration::from_secs(3600)).unwrap());
    let app = Backend::start("app", Mode::Ok).await;
    let hub = mesh_hub(
        issuer,
        &[
            ("services.yaml", service("back", 8080, "HTTP")),
            (
                "endpoints.yaml",
                endpoints("back", &[(app.addr, "v1", "z1")]),
            ),
        ],
    )
    .await;
    // No namespace or service account: the hub has no identity to issue for, so
    // the certificates its mTLS clusters name never come.
    let proxy = start_proxy(bootstrap(hub.hub.xds_addr, "delta", "")).await;
    until("the config is complete and SDS answered", || async {
        let dump = config_dump(&proxy).await;
        let stats = admin(&proxy, "/stats").await.1;
        dump["complete"] == true
            && stats.contains("tributary_proxy_xds_responses_total{type=\"SDS\"} ")
    })
    .await;
    let dump = config_dump(&proxy).await;
    assert_eq!(dump["certificates_loaded"], false, "{dump}");
    assert_eq!(
        dump["subscriptions"]["SDS"],
        serde_json::json!(["ROOTCA", "default"]),
        "{dump}"
    );
    assert!(!proxy.is_ready());
    assert_eq!(admin(&proxy, "/ready").await.0, 503);
}

// ---- the state machine fed by hand: secret removal, NACKs by field ----------------

mod fed {
    use super::*;
    use tributary_proto::envoy::envoy::config::cluster::v3::{
        Cluster, cluster::ClusterDiscoveryType, cluster::DiscoveryType,
    };
    use tributary_proto::envoy::envoy::config::core::v3::{
        Address, AggregatedConfigSource, ConfigSource, SocketAddress, TransportSocket, address,
        config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
        transport_socket::ConfigType as TsConfig,
    };
    use tributary_proto::envoy::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
        lb_endpoint::HostIdentifier,
    };
    use tributary_proto::envoy::envoy::config::listener::v3::{
        Filter, FilterChain, Listener, filter::ConfigType,
    };
    use tributary_proto::envoy::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy::ClusterSpecifier,
    };
    use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, TlsParameters,
        common_tls_context::ValidationContextType,
    };
    use tributary_proto::envoy::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use tributary_proto::envoy::google::protobuf::{Any, BoolValue};
    use tributary_proto::type_url;
    use tributary_proxy::xds::XdsState;

    fn any<M: Message>(url: &str, m: &M) -> Any {
        Any {
            type_url: url.into(),
            value: m.encode_to_vec(),
        }
    }

    fn response(
        url: &str,
        resources: Vec<(&str, Any)>,
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: url.into(),
            nonce: "n".into(),
            resources: resources
                .into_iter()
                .map(|(name, a)| Resource {
                    name: name.into(),
                    version: "1".into(),
                    resource: Some(a),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn sds(name: &str) -> SdsSecretConfig {
        SdsSecretConfig {
            name: name.into(),
            sds_config: Some(ConfigSource {
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
        }
    }

    /// A TLS-terminating TCP proxy listener on 127.0.0.1 (port from the bootstrap's
    /// override), certificate `cert`, clients checked against `roots`.
    fn tls_listener(name: &str, context: DownstreamTlsContext) -> Listener {
        let tcp = TcpProxy {
            stat_prefix: name.into(),
            cluster_specifier: Some(ClusterSpecifier::Cluster("app".into())),
            ..Default::default()
        };
        Listener {
            name: name.into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(PortSpecifier::PortValue(1)),
                    ..Default::default()
                })),
            }),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(ConfigType::TypedConfig(any(
                        tributary_proxy::xds::translate::TCP_PROXY,
                        &tcp,
                    ))),
                }],
                transport_socket: Some(TransportSocket {
                    name: "envoy.transport_sockets.tls".into(),
                    config_type: Some(TsConfig::TypedConfig(any(
                        tributary_proxy::tls::DOWNSTREAM_TLS,
                        &context,
                    ))),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn mtls_context() -> DownstreamTlsContext {
        DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: vec![sds("cert")],
                validation_context_type: Some(
                    ValidationContextType::ValidationContextSdsSecretConfig(sds("roots")),
                ),
                ..Default::default()
            }),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        }
    }

    fn secrets(issuer: &TestIssuer, id: &str) -> Vec<(&'static str, Any)> {
        let cert = issuer.issue(&SpiffeId::parse(id).unwrap()).unwrap();
        let c = Secret {
            name: "cert".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&cert.chain_pem),
                private_key: inline(&cert.key_pem),
                ..Default::default()
            })),
        };
        let r = Secret {
            name: "roots".into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&issuer.trust_bundle_pem()),
                    ..Default::default()
                },
            )),
        };
        vec![
            ("cert", any(type_url::SECRET, &c)),
            ("roots", any(type_url::SECRET, &r)),
        ]
    }

    /// A static cluster `app` to `addr`.
    fn app_cluster(addr: std::net::SocketAddr) -> Cluster {
        Cluster {
            name: "app".into(),
            cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
            load_assignment: Some(ClusterLoadAssignment {
                cluster_name: "app".into(),
                endpoints: vec![LocalityLbEndpoints {
                    lb_endpoints: vec![LbEndpoint {
                        host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                            address: Some(Address {
                                address: Some(address::Address::SocketAddress(SocketAddress {
                                    address: addr.ip().to_string(),
                                    port_specifier: Some(PortSpecifier::PortValue(u32::from(
                                        addr.port(),
                                    ))),
                                    ..Default::default()
                                })),
                            }),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A request through the TLS-terminating TCP proxy to the app: the handshake is
    /// accepted when the app's answer comes back.
    async fn handshake(tls: &ClientTls, addr: std::net::SocketAddr) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut s = tls.connect(tcp, addr.ip()).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
            .await?;
        // TLS 1.3: a refused client certificate shows as an alert on the first read.
        let mut buf = Vec::new();
        let read = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf)).await;
        match read {
            Err(_) => Err(std::io::Error::other("no answer within the timeout")),
            Ok(_) if buf.starts_with(b"HTTP/1.1 200") => Ok(()),
            Ok(r) => Err(std::io::Error::other(format!(
                "no answer from the app: {r:?} {:?}",
                String::from_utf8_lossy(&buf)
            ))),
        }
    }

    #[tokio::test]
    async fn a_removed_secret_makes_the_proxy_not_ready_and_refuses_handshakes_until_it_is_back() {
        let issuer = TestIssuer::new("root", Duration::from_secs(3600)).unwrap();
        let b = bootstrap("127.0.0.1:1".parse().unwrap(), "delta", "");
        let proxy = Proxy::serve(&b).await.unwrap();
        let sh = &proxy.shared;
        let mut state = XdsState::new(tributary_proxy::xds::node(&b.node), true);
        let app = Backend::start("app", Mode::Ok).await;
        let out = state.on_delta(
            &response(
                type_url::CLUSTER,
                vec![("app", any(type_url::CLUSTER, &app_cluster(app.addr)))],
                &[],
            ),
            sh,
        );
        assert!(out[0].error_detail.is_none());
        let out = state.on_delta(
            &response(
                type_url::LISTENER,
                vec![(
                    "l",
                    any(type_url::LISTENER, &tls_listener("l", mtls_context())),
                )],
                &[],
            ),
            sh,
        );
        assert!(out[0].error_detail.is_none(), "{:?}", out[0].error_detail);
        // The listener names its secrets: SDS is subscribed by name.
        let sub = out
            .iter()
            .find(|r| r.type_url == type_url::SECRET)
            .expect("an SDS subscription");
        assert_eq!(sub.resource_names_subscribe, vec!["cert", "roots"]);
        assert!(state.complete());
        assert!(
            !proxy.is_ready(),
            "the config is complete but its certificates are missing"
        );
        let addr = bound(&proxy, "l").await;
        let client = client_tls(
            &issuer,
            &format!("spiffe://{TD}/env/prod/ns/default/sa/c"),
            &issuer,
            "spiffe://",
        );
        assert!(
            handshake(&client, addr).await.is_err(),
            "no certificate yet"
        );

        let out = state.on_delta(
            &response(
                type_url::SECRET,
                secrets(&issuer, &format!("spiffe://{TD}/env/prod/ns/default/sa/s")),
                &[],
            ),
            sh,
        );
        assert!(out[0].error_detail.is_none(), "{:?}", out[0].error_detail);
        assert!(proxy.is_ready());
        handshake(&client, addr)
            .await
            .expect("accepted once the certificate is loaded");

        // Removed by the server: not ready, new handshakes refused.
        state.on_delta(&response(type_url::SECRET, vec![], &["cert"]), sh);
        assert!(!proxy.is_ready());
        assert_eq!(admin(&proxy, "/ready").await.0, 503);
        assert!(handshake(&client, addr).await.is_err());
        // Back: ready again.
        state.on_delta(
            &response(
                type_url::SECRET,
                secrets(&issuer, &format!("spiffe://{TD}/env/prod/ns/default/sa/s")),
                &[],
            ),
            sh,
        );
        assert!(proxy.is_ready());
        handshake(&client, addr).await.expect("accepted again");
    }

    #[tokio::test]
    async fn tls_fields_it_does_not_honour_are_nacked_by_resource_and_field() {
        let b = bootstrap("127.0.0.1:1".parse().unwrap(), "delta", "");
        let proxy = Proxy::serve(&b).await.unwrap();
        let mut state = XdsState::new(tributary_proxy::xds::node(&b.node), true);
        let mut params = mtls_context();
        params.common_tls_context.as_mut().unwrap().tls_params = Some(TlsParameters::default());
        let mut sni = mtls_context();
        sni.require_sni = Some(BoolValue { value: true });
        let mut no_roots = mtls_context();
        no_roots
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type = None;
        let out = state.on_delta(
            &response(
                type_url::LISTENER,
                vec![
                    (
                        "good",
                        any(type_url::LISTENER, &tls_listener("good", mtls_context())),
                    ),
                    (
                        "params",
                        any(type_url::LISTENER, &tls_listener("params", params)),
                    ),
                    ("sni", any(type_url::LISTENER, &tls_listener("sni", sni))),
                    (
                        "no_roots",
                        any(type_url::LISTENER, &tls_listener("no_roots", no_roots)),
                    ),
                ],
                &[],
            ),
            &proxy.shared,
        );
        let nack = &out[0].error_detail.as_ref().expect("a NACK").message;
        assert!(
            nack.contains(
                "params: downstream TLS: field common_tls_context.tls_params is not supported"
            ),
            "{nack}"
        );
        assert!(
            nack.contains("sni: downstream TLS: field require_sni is not supported"),
            "{nack}"
        );
        assert!(
            nack.contains(
                "no_roots: downstream TLS: require_client_certificate needs a validation context"
            ),
            "{nack}"
        );
        assert!(!nack.contains("good"), "{nack}");

        // A secret that cannot be used is NACKed by name, without quoting the key.
        let bad = Secret {
            name: "cert".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline("not a certificate"),
                private_key: inline(
                    "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
                ),
                ..Default::default()
            })),
        };
        let out = state.on_delta(
            &response(
                type_url::SECRET,
                vec![("cert", any(type_url::SECRET, &bad))],
                &[],
            ),
            &proxy.shared,
        );
        let nack = &out[0].error_detail.as_ref().expect("a NACK").message;
        assert!(
            nack.contains("Error adding/updating secret(s) cert: tls_certificate.certificate_chain: no certificate in it"),
            "{nack}"
        );
        assert!(!nack.contains("c2VjcmV0"), "{nack}");
        assert!(!proxy.is_ready());
    }
}
