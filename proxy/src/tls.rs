//! TLS with certificates from SDS: downstream on listeners with a
//! `DownstreamTlsContext`, upstream on clusters with an `UpstreamTlsContext`.
//!
//! - **Translation** ([`downstream`], [`upstream`], [`secret`]): the contexts the hub
//!   generates (`controlplane/src/xds/generate/mtls.rs`): our certificate from an SDS
//!   `tls_certificate`, the peer's checked against an SDS `validation_context` (the
//!   trust bundle) and `match_typed_subject_alt_names` (URI/DNS SANs: exact, prefix,
//!   suffix, contains), `require_client_certificate`, `alpn_protocols`, `sni`. Every
//!   other field that would change the handshake is a reason to NACK, named by its
//!   field path (e.g. `common_tls_context.tls_params`).
//! - **Secrets** ([`SecretSet`]): what SDS delivered, parsed once (PEM → DER, the key
//!   checked against the certificate), published by the xDS client as one immutable
//!   set with a generation number.
//! - **Handshakes** ([`ServerTls`], [`ClientTls`]): a listener's or cluster's rustls
//!   config is built from the current secrets and cached per generation; a new secret
//!   version (rotation) makes the next handshake build a new config. Established
//!   connections keep the session they negotiated: rotation never drops them.
//!   A handshake whose secrets are missing is refused (and `/ready` is false).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::http::HeaderValue;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tributary_proto::envoy::envoy::config::core::v3::{
    ConfigSource, DataSource, TransportSocket, config_source::ConfigSourceSpecifier,
    data_source::Specifier, transport_socket::ConfigType,
};
use tributary_proto::envoy::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context::ValidationContextType, secret, subject_alt_name_matcher::SanType,
};
use tributary_proto::envoy::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use crate::xds::translate::{Reason, decode};

pub const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
pub const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// A downstream TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// ---- translated contexts -----------------------------------------------------------

/// A TLS context of a listener (server side) or a cluster (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsContext {
    /// The SDS secret with our certificate and key (required on a listener).
    pub certificate: Option<String>,
    /// How the peer is checked; `None`: it is not asked for (server) — a client
    /// context without one is NACKed, as it would not check the server at all.
    pub validation: Option<Validation>,
    pub alpn: Vec<String>,
    /// Server side: a client certificate is required (otherwise optional, checked
    /// when presented).
    pub require_client_certificate: bool,
    /// Client side: the SNI to send; `None` sends none (addresses are IPs).
    pub sni: Option<String>,
}

/// The peer's certificate must chain to the trust bundle of SDS secret `trust` and,
/// when matchers are given, carry a SAN that one of them accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub trust: String,
    pub san: Vec<SanMatcher>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
    pub uri: bool,
    pub pattern: Pattern,
    pub ignore_case: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
}

impl SanMatcher {
    fn matches(&self, value: &str) -> bool {
        let (v, p) = if self.ignore_case {
            (
                value.to_ascii_lowercase(),
                self.pattern.text().to_ascii_lowercase(),
            )
        } else {
            (value.to_string(), self.pattern.text().to_string())
        };
        match self.pattern {
            Pattern::Exact(_) => v == p,
            Pattern::Prefix(_) => v.starts_with(&p),
            Pattern::Suffix(_) => v.ends_with(&p),
            Pattern::Contains(_) => v.contains(&p),
        }
    }
}

impl Pattern {
    fn text(&self) -> &str {
        match self {
            Pattern::Exact(s) | Pattern::Prefix(s) | Pattern::Suffix(s) | Pattern::Contains(s) => s,
        }
    }
}

impl TlsContext {
    /// The SDS secrets this context needs.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.certificate
            .as_deref()
            .into_iter()
            .chain(self.validation.as_ref().map(|v| v.trust.as_str()))
    }
}

/// Collects the names of fields set that the proxy does not honour.
struct Unsupported(Vec<String>);

impl Unsupported {
    fn check(&mut self, set: bool, field: impl Into<String>) {
        if set {
            self.0.push(field.into());
        }
    }

    fn finish(self, what: &str) -> Result<(), Reason> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} not supported",
                if self.0.len() == 1 {
                    format!("field {} is", self.0[0])
                } else {
                    format!("fields {} are", self.0.join(", "))
                }
            ))
        }
    }
}

/// The TLS context of a transport socket, decoded as `expected` (a down- or upstream
/// context type URL).
fn transport_socket_any<'a>(
    ts: &'a TransportSocket,
    expected: &str,
) -> Result<&'a tributary_proto::envoy::google::protobuf::Any, Reason> {
    match &ts.config_type {
        Some(ConfigType::TypedConfig(a)) if a.type_url == expected => Ok(a),
        Some(ConfigType::TypedConfig(a)) => Err(format!(
            "transport_socket {:?}: {} is not supported (only TLS, {expected})",
            ts.name, a.type_url
        )),
        None => Err(format!(
            "transport_socket {:?}: no typed_config (only TLS, {expected})",
            ts.name
        )),
    }
}

/// A listener filter chain's `transport_socket`: a `DownstreamTlsContext`.
pub fn downstream(ts: &TransportSocket) -> Result<TlsContext, Reason> {
    let any = transport_socket_any(ts, DOWNSTREAM_TLS)?;
    let d: DownstreamTlsContext = decode(any, DOWNSTREAM_TLS)?;
    let mut u = Unsupported(Vec::new());
    u.check(
        d.require_sni.as_ref().is_some_and(|b| b.value),
        "require_sni",
    );
    u.check(
        d.session_ticket_keys_type.is_some(),
        "session_ticket_keys / session_ticket_keys_sds_secret_config / disable_stateless_session_resumption",
    );
    u.check(d.session_timeout.is_some(), "session_timeout");
    u.check(d.ocsp_staple_policy != 0, "ocsp_staple_policy");
    u.check(
        d.full_scan_certs_on_sni_mismatch
            .as_ref()
            .is_some_and(|b| b.value),
        "full_scan_certs_on_sni_mismatch",
    );
    u.check(d.prefer_client_ciphers, "prefer_client_ciphers");
    u.finish("downstream TLS")?;
    let common = d
        .common_tls_context
        .as_ref()
        .ok_or("downstream TLS: common_tls_context is missing")?;
    let mut ctx = common_context(common, "downstream TLS")?;
    if ctx.certificate.is_none() {
        return Err(
            "downstream TLS: common_tls_context.tls_certificate_sds_secret_configs: a listener needs its certificate"
                .into(),
        );
    }
    ctx.require_client_certificate = d.require_client_certificate.is_some_and(|b| b.value);
    if ctx.require_client_certificate && ctx.validation.is_none() {
        return Err("downstream TLS: require_client_certificate needs a validation context (the trust bundle to check the client against)".into());
    }
    Ok(ctx)
}

/// A cluster's `transport_socket`: an `UpstreamTlsContext`.
#[allow(deprecated)]
pub fn upstream(ts: &TransportSocket) -> Result<TlsContext, Reason> {
    let any = transport_socket_any(ts, UPSTREAM_TLS)?;
    let c: UpstreamTlsContext = decode(any, UPSTREAM_TLS)?;
    let mut u = Unsupported(Vec::new());
    u.check(c.auto_host_sni, "auto_host_sni");
    u.check(c.auto_sni_san_validation, "auto_sni_san_validation");
    u.check(c.allow_renegotiation, "allow_renegotiation");
    u.check(c.max_session_keys.is_some(), "max_session_keys");
    u.check(c.enforce_rsa_key_usage.is_some(), "enforce_rsa_key_usage");
    u.finish("upstream TLS")?;
    let common = c
        .common_tls_context
        .as_ref()
        .ok_or("upstream TLS: common_tls_context is missing")?;
    let mut ctx = common_context(common, "upstream TLS")?;
    if ctx.validation.is_none() {
        return Err("upstream TLS: common_tls_context: a validation context is required (without one the server would not be checked)".into());
    }
    if !c.sni.is_empty() {
        ServerName::try_from(c.sni.clone())
            .map_err(|_| format!("upstream TLS: sni {:?} is not a valid server name", c.sni))?;
        ctx.sni = Some(c.sni.clone());
    }
    Ok(ctx)
}

fn sds_name(s: &SdsSecretConfig, field: &str) -> Result<String, Reason> {
    ads_source(s.sds_config.as_ref(), field)?;
    if s.name.is_empty() {
        return Err(format!("{field}.name is empty"));
    }
    Ok(s.name.clone())
}

fn ads_source(source: Option<&ConfigSource>, field: &str) -> Result<(), Reason> {
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(ConfigSourceSpecifier::Ads(_)) => Ok(()),
        _ => Err(format!(
            "{field}.sds_config: only SDS over ADS is supported"
        )),
    }
}

#[allow(deprecated)]
fn common_context(c: &CommonTlsContext, what: &str) -> Result<TlsContext, Reason> {
    let mut u = Unsupported(Vec::new());
    u.check(c.tls_params.is_some(), "common_tls_context.tls_params");
    u.check(
        !c.tls_certificates.is_empty(),
        "common_tls_context.tls_certificates (inline certificates; SDS is supported)",
    );
    u.check(
        c.tls_certificate_provider_instance.is_some()
            || c.tls_certificate_certificate_provider.is_some()
            || c.tls_certificate_certificate_provider_instance.is_some(),
        "common_tls_context.tls_certificate_provider_instance",
    );
    u.check(
        c.custom_tls_certificate_selector.is_some(),
        "common_tls_context.custom_tls_certificate_selector",
    );
    u.check(
        c.custom_handshaker.is_some(),
        "common_tls_context.custom_handshaker",
    );
    u.check(c.key_log.is_some(), "common_tls_context.key_log");
    u.check(
        c.tls_certificate_sds_secret_configs.len() > 1,
        "common_tls_context.tls_certificate_sds_secret_configs (more than one certificate)",
    );
    u.finish(what)?;
    let certificate = c
        .tls_certificate_sds_secret_configs
        .first()
        .map(|s| {
            sds_name(
                s,
                &format!("{what}: common_tls_context.tls_certificate_sds_secret_configs[0]"),
            )
        })
        .transpose()?;
    let validation = match &c.validation_context_type {
        None => None,
        Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => Some(Validation {
            trust: sds_name(
                s,
                &format!("{what}: common_tls_context.validation_context_sds_secret_config"),
            )?,
            san: Vec::new(),
        }),
        Some(ValidationContextType::CombinedValidationContext(cc)) => {
            let field = format!("{what}: common_tls_context.combined_validation_context");
            if cc.validation_context_certificate_provider.is_some()
                || cc
                    .validation_context_certificate_provider_instance
                    .is_some()
            {
                return Err(format!(
                    "{field}.validation_context_certificate_provider is not supported"
                ));
            }
            let sds = cc
                .validation_context_sds_secret_config
                .as_ref()
                .ok_or_else(|| {
                    format!("{field}.validation_context_sds_secret_config is missing")
                })?;
            let trust = sds_name(
                sds,
                &format!("{field}.validation_context_sds_secret_config"),
            )?;
            let san = match &cc.default_validation_context {
                Some(v) => {
                    validation_matchers(v, &format!("{field}.default_validation_context"), false)?
                }
                None => Vec::new(),
            };
            Some(Validation { trust, san })
        }
        Some(ValidationContextType::ValidationContext(_)) => {
            return Err(format!(
                "{what}: common_tls_context.validation_context: an inline trust bundle is not supported (the trust bundle comes from SDS)"
            ));
        }
        Some(_) => {
            return Err(format!(
                "{what}: common_tls_context: validation context certificate providers are not supported"
            ));
        }
    };
    Ok(TlsContext {
        certificate,
        validation,
        alpn: c.alpn_protocols.clone(),
        require_client_certificate: false,
        sni: None,
    })
}

/// The SAN matchers of a validation context; every other field that changes the
/// check is named. `trust_allowed`: whether `trusted_ca` may be set (a secret).
#[allow(deprecated)]
fn validation_matchers(
    v: &CertificateValidationContext,
    field: &str,
    trust_allowed: bool,
) -> Result<Vec<SanMatcher>, Reason> {
    let mut u = Unsupported(Vec::new());
    u.check(!trust_allowed && v.trusted_ca.is_some(), "trusted_ca");
    u.check(
        v.ca_certificate_provider_instance.is_some(),
        "ca_certificate_provider_instance",
    );
    u.check(v.system_root_certs.is_some(), "system_root_certs");
    u.check(v.watched_directory.is_some(), "watched_directory");
    u.check(
        !v.verify_certificate_spki.is_empty(),
        "verify_certificate_spki",
    );
    u.check(
        !v.verify_certificate_hash.is_empty(),
        "verify_certificate_hash",
    );
    u.check(
        !v.match_subject_alt_names.is_empty(),
        "match_subject_alt_names (match_typed_subject_alt_names is supported)",
    );
    u.check(
        v.require_signed_certificate_timestamp
            .as_ref()
            .is_some_and(|b| b.value),
        "require_signed_certificate_timestamp",
    );
    // CRLs: in a secret (the trust they belong to), checked as Envoy does.
    u.check(!trust_allowed && v.crl.is_some(), "crl");
    u.check(v.allow_expired_certificate, "allow_expired_certificate");
    u.check(v.trust_chain_verification != 0, "trust_chain_verification");
    u.check(
        v.custom_validator_config.is_some(),
        "custom_validator_config",
    );
    u.check(
        !trust_allowed && v.only_verify_leaf_cert_crl,
        "only_verify_leaf_cert_crl",
    );
    u.check(v.max_verify_depth.is_some(), "max_verify_depth");
    u.finish(field)?;
    v.match_typed_subject_alt_names
        .iter()
        .enumerate()
        .map(|(i, m)| san_matcher(m, &format!("{field}.match_typed_subject_alt_names[{i}]")))
        .collect()
}

fn san_matcher(m: &SubjectAltNameMatcher, field: &str) -> Result<SanMatcher, Reason> {
    let uri = match SanType::try_from(m.san_type) {
        Ok(SanType::Uri) => true,
        Ok(SanType::Dns) => false,
        Ok(other) => {
            return Err(format!(
                "{field}.san_type {} is not supported (URI and DNS are)",
                other.as_str_name()
            ));
        }
        Err(_) => return Err(format!("{field}.san_type {} is unknown", m.san_type)),
    };
    if !m.oid.is_empty() {
        return Err(format!("{field}.oid is not supported"));
    }
    let StringMatcher {
        match_pattern,
        ignore_case,
    } = m
        .matcher
        .as_ref()
        .ok_or_else(|| format!("{field}.matcher is missing"))?;
    let pattern = match match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => Pattern::Exact(s.clone()),
        Some(string_matcher::MatchPattern::Prefix(s)) => Pattern::Prefix(s.clone()),
        Some(string_matcher::MatchPattern::Suffix(s)) => Pattern::Suffix(s.clone()),
        Some(string_matcher::MatchPattern::Contains(s)) => Pattern::Contains(s.clone()),
        _ => {
            return Err(format!(
                "{field}.matcher: only exact, prefix, suffix and contains are supported"
            ));
        }
    };
    Ok(SanMatcher {
        uri,
        pattern,
        ignore_case: *ignore_case,
    })
}

// ---- secrets -----------------------------------------------------------------------

/// A secret from SDS, parsed. Its `Debug` never shows key material.
#[derive(Clone)]
pub enum SecretValue {
    /// A `tls_certificate`: chain (leaf first) and its key.
    Certificate {
        chain: Vec<CertificateDer<'static>>,
        key: Arc<PrivateKeyDer<'static>>,
    },
    /// A `validation_context`: the trust bundle and its CRLs.
    Trust(Arc<Trust>),
}

/// A `validation_context` secret: roots, and CRLs checked as Envoy checks them: once
/// any is given, every certificate of a chain (not the root) must be covered by a CRL
/// of its issuer, and one listed is refused; with `only_verify_leaf_cert_crl` only
/// the leaf is checked.
#[derive(Debug)]
pub struct Trust {
    pub roots: Arc<RootCertStore>,
    pub crls: Vec<rustls::pki_types::CertificateRevocationListDer<'static>>,
    pub only_leaf: bool,
}

impl Trust {
    /// A client-certificate verifier builder on these roots and CRLs.
    fn client_verifier(&self) -> rustls::server::ClientCertVerifierBuilder {
        let mut b = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.iter().cloned());
        if self.only_leaf {
            b = b.only_check_end_entity_revocation();
        }
        b
    }

    /// A server-certificate verifier builder on these roots and CRLs.
    fn server_verifier(&self) -> rustls::client::ServerCertVerifierBuilder {
        let mut b = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .with_crls(self.crls.iter().cloned());
        if self.only_leaf {
            b = b.only_check_end_entity_revocation();
        }
        b
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretValue::Certificate { chain, .. } => f
                .debug_struct("Certificate")
                .field("chain_len", &chain.len())
                .finish_non_exhaustive(),
            SecretValue::Trust(t) => f
                .debug_struct("Trust")
                .field("roots", &t.roots.len())
                .field("crls", &t.crls.len())
                .finish(),
        }
    }
}

impl SecretValue {
    pub fn kind(&self) -> &'static str {
        match self {
            SecretValue::Certificate { .. } => "tls_certificate",
            SecretValue::Trust(_) => "validation_context",
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The bytes of an inline data source (files are not read: secrets come over SDS).
fn inline(d: Option<&DataSource>, field: &str) -> Result<Vec<u8>, Reason> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(_) => Err(format!(
            "{field}: only inline_string and inline_bytes are supported (not files or environment variables)"
        )),
        None => Err(format!("{field} is missing")),
    }
}

/// An SDS `Secret`, parsed and checked (the key matches the certificate; the trust
/// bundle has at least one usable root). Errors never quote the key.
pub fn secret(s: &Secret) -> Result<SecretValue, Reason> {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => certificate(t),
        Some(secret::Type::ValidationContext(v)) => {
            validation_matchers(v, "validation_context", true).and_then(|san| {
                if san.is_empty() {
                    Ok(())
                } else {
                    Err("validation_context.match_typed_subject_alt_names in a secret is not supported (they belong in the listener's or cluster's default_validation_context)".into())
                }
            })?;
            let pem = inline(v.trusted_ca.as_ref(), "validation_context.trusted_ca")?;
            let mut roots = RootCertStore::empty();
            for (i, c) in CertificateDer::pem_slice_iter(&pem).enumerate() {
                let c = c.map_err(|e| {
                    format!("validation_context.trusted_ca: certificate {i}: not PEM: {e}")
                })?;
                roots.add(c).map_err(|e| {
                    format!("validation_context.trusted_ca: certificate {i}: not a usable trust anchor: {e}")
                })?;
            }
            if roots.is_empty() {
                return Err("validation_context.trusted_ca: no certificate in it".into());
            }
            let crls = match &v.crl {
                None => Vec::new(),
                Some(d) => {
                    let pem = inline(Some(d), "validation_context.crl")?;
                    let crls =
                        rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
                            .enumerate()
                            .map(|(i, c)| {
                                c.map_err(|e| {
                                    format!("validation_context.crl: CRL {i}: not PEM: {e}")
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                    if crls.is_empty() {
                        return Err("validation_context.crl: no X509 CRL in it".into());
                    }
                    crls
                }
            };
            let trust = Trust {
                roots: Arc::new(roots),
                crls,
                only_leaf: v.only_verify_leaf_cert_crl,
            };
            // A CRL that does not parse is refused here, not at the first handshake.
            trust
                .client_verifier()
                .build()
                .map_err(|e| format!("validation_context.crl: {e}"))?;
            Ok(SecretValue::Trust(Arc::new(trust)))
        }
        Some(secret::Type::SessionTicketKeys(_)) => {
            Err("session_ticket_keys secrets are not supported".into())
        }
        Some(secret::Type::GenericSecret(_)) => Err("generic secrets are not supported".into()),
        None => Err("the secret has no type".into()),
    }
}

fn certificate(t: &TlsCertificate) -> Result<SecretValue, Reason> {
    let mut u = Unsupported(Vec::new());
    u.check(t.watched_directory.is_some(), "watched_directory");
    u.check(t.private_key_provider.is_some(), "private_key_provider");
    u.check(t.password.is_some(), "password");
    u.check(t.ocsp_staple.is_some(), "ocsp_staple");
    u.check(
        !t.signed_certificate_timestamp.is_empty(),
        "signed_certificate_timestamp",
    );
    u.check(t.tls_params.is_some(), "tls_params");
    u.finish("tls_certificate")?;
    let chain_pem = inline(
        t.certificate_chain.as_ref(),
        "tls_certificate.certificate_chain",
    )?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_certificate.certificate_chain: not PEM: {e}"))?;
    if chain.is_empty() {
        return Err("tls_certificate.certificate_chain: no certificate in it".into());
    }
    let key_pem = inline(t.private_key.as_ref(), "tls_certificate.private_key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| "tls_certificate.private_key: no PEM private key in it".to_string())?;
    let certified =
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| format!("tls_certificate: the key does not fit the certificate: {e}"))?;
    drop(certified);
    Ok(SecretValue::Certificate {
        chain,
        key: Arc::new(key),
    })
}

/// The secrets the proxy holds, as the xDS client last published them. A new
/// generation means at least one secret changed.
#[derive(Debug, Default)]
pub struct SecretSet {
    pub generation: u64,
    pub secrets: HashMap<String, SecretValue>,
}

impl SecretSet {
    fn certificate(
        &self,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        match self.secrets.get(name) {
            Some(SecretValue::Certificate { chain, key }) => Ok((chain.clone(), key.clone_key())),
            Some(other) => Err(format!(
                "secret {name:?} is a {}, not a tls_certificate",
                other.kind()
            )),
            None => Err(format!("secret {name:?} is not loaded")),
        }
    }

    fn trust(&self, name: &str) -> Result<Arc<Trust>, String> {
        match self.secrets.get(name) {
            Some(SecretValue::Trust(r)) => Ok(r.clone()),
            Some(other) => Err(format!(
                "secret {name:?} is a {}, not a validation_context",
                other.kind()
            )),
            None => Err(format!("secret {name:?} is not loaded")),
        }
    }
}

// ---- peer checks -------------------------------------------------------------------

/// The URI and DNS SANs of a DER certificate.
pub fn sans(der: &[u8]) -> (Vec<String>, Vec<String>) {
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der)
        && let Ok(Some(san)) = cert.subject_alternative_name()
    {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::URI(u) => uris.push(u.to_string()),
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    (uris, dns)
}

fn check_sans(matchers: &[SanMatcher], der: &[u8]) -> Result<(), rustls::Error> {
    if matchers.is_empty() {
        return Ok(());
    }
    let (uris, dns) = sans(der);
    let hit = matchers.iter().any(|m| {
        let values = if m.uri { &uris } else { &dns };
        values.iter().any(|v| m.matches(v))
    });
    if hit {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// webpki's client check, then the SAN matchers.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    san: Vec<SanMatcher>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_sans(&self.san, end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What a server's certificate must show once webpki has accepted its chain: the SAN
/// matchers of a cluster's validation context, or the SPIFFE id the xDS client expects.
pub(crate) trait PeerCheck: std::fmt::Debug + Send + Sync {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error>;
}

/// A cluster's `match_typed_subject_alt_names`: any one matching SAN admits the peer.
#[derive(Debug)]
struct SanCheck(Vec<SanMatcher>);

impl PeerCheck for SanCheck {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        check_sans(&self.0, end_entity)
    }
}

/// webpki's server check of the chain and validity, but not of the name dialled (as
/// Envoy does not without SAN matchers: endpoints are IPs), then `C`'s check of the
/// identity. Signatures are webpki's.
#[derive(Debug)]
pub(crate) struct ServerVerifier<C> {
    pub(crate) inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(crate) check: C,
}

impl<C: PeerCheck> ServerCertVerifier for ServerVerifier<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        self.check.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---- handshakes --------------------------------------------------------------------

/// A config built for one secrets generation (or why it cannot be).
type Cached<T> = Mutex<Option<(u64, Result<Arc<T>, String>)>>;

fn cached<T>(
    cache: &Cached<T>,
    secrets: &SecretSet,
    build: impl FnOnce() -> Result<T, String>,
) -> Result<Arc<T>, String> {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((generation, built)) = &*c
        && *generation == secrets.generation
    {
        return built.clone();
    }
    let built = build().map(Arc::new);
    *c = Some((secrets.generation, built.clone()));
    built
}

/// A listener's server config, and its certificate's URI SAN (`By` in XFCC).
type ServerBuilt = (Arc<ServerConfig>, Option<String>);

/// A listener's TLS: its server config, rebuilt when the secrets change.
#[derive(Debug)]
pub struct ServerTls {
    pub context: TlsContext,
    cache: Cached<ServerBuilt>,
}

/// A downstream connection after its handshake: the stream, and what the HTTP
/// connection manager needs to know about the peer.
#[derive(Debug)]
pub struct Accepted {
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// `x-forwarded-client-cert` describing the client, when it presented a
    /// certificate: `By=<our URI SAN>;Hash=<SHA-256 of its certificate>;URI=<its URI SAN>`.
    pub client_cert: Option<HeaderValue>,
}

impl ServerTls {
    pub fn new(context: TlsContext) -> ServerTls {
        ServerTls {
            context,
            cache: Mutex::new(None),
        }
    }

    /// The server config for the current secrets, and our URI SAN.
    fn config(&self, secrets: &SecretSet) -> Result<Arc<ServerBuilt>, String> {
        cached(&self.cache, secrets, || {
            let name = self
                .context
                .certificate
                .as_deref()
                .ok_or("no certificate")?;
            let (chain, key) = secrets.certificate(name)?;
            let ours = sans(&chain[0]).0.into_iter().next();
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let builder = match &self.context.validation {
                Some(v) => {
                    let mut b = secrets.trust(&v.trust)?.client_verifier();
                    if !self.context.require_client_certificate {
                        b = b.allow_unauthenticated();
                    }
                    let inner = b
                        .build()
                        .map_err(|e| format!("secret {:?}: {e}", v.trust))?;
                    builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                        inner,
                        san: v.san.clone(),
                    }))
                }
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain, key)
                .map_err(|e| format!("secret {name:?}: {e}"))?;
            config.alpn_protocols = self
                .context
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect();
            Ok((Arc::new(config), ours))
        })
    }

    /// Runs the server handshake on `tcp` with the current secrets.
    pub async fn accept(&self, secrets: &SecretSet, tcp: TcpStream) -> std::io::Result<Accepted> {
        let built = self.config(secrets).map_err(std::io::Error::other)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(built.0.clone());
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        let (_, conn) = stream.get_ref();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        let client_cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| xfcc(built.1.as_deref(), leaf));
        Ok(Accepted {
            stream,
            alpn,
            client_cert,
        })
    }
}

/// Envoy's `x-forwarded-client-cert` element for a client certificate, with `By`
/// (our URI SAN), `Hash` and `URI` (`set_current_client_cert_details.uri`).
fn xfcc(ours: Option<&str>, leaf: &CertificateDer<'_>) -> Option<HeaderValue> {
    let hash = ring::digest::digest(&ring::digest::SHA256, leaf);
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut v = String::new();
    if let Some(by) = ours {
        v.push_str(&format!("By={by};"));
    }
    v.push_str(&format!("Hash={hex}"));
    if let Some(uri) = sans(leaf).0.first() {
        v.push_str(&format!(";URI={uri}"));
    }
    HeaderValue::from_str(&v).ok()
}

/// A cluster's TLS: its client config, rebuilt when the secrets change.
#[derive(Debug)]
pub struct ClientTls {
    pub context: TlsContext,
    secrets: Arc<arc_swap::ArcSwap<SecretSet>>,
    cache: Cached<ClientConfig>,
}

impl ClientTls {
    pub fn new(context: TlsContext, secrets: Arc<arc_swap::ArcSwap<SecretSet>>) -> ClientTls {
        ClientTls {
            context,
            secrets,
            cache: Mutex::new(None),
        }
    }

    fn config(&self) -> Result<Arc<ClientConfig>, String> {
        let secrets = self.secrets.load();
        cached(&self.cache, &secrets, || {
            let v = self
                .context
                .validation
                .as_ref()
                .ok_or("no validation context")?;
            let inner = secrets
                .trust(&v.trust)?
                .server_verifier()
                .build()
                .map_err(|e| format!("secret {:?}: {e}", v.trust))?;
            let builder = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                    inner,
                    check: SanCheck(v.san.clone()),
                }));
            let mut config = match &self.context.certificate {
                Some(name) => {
                    let (chain, key) = secrets.certificate(name)?;
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| format!("secret {name:?}: {e}"))?
                }
                None => builder.with_no_client_auth(),
            };
            config.alpn_protocols = self
                .context
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect();
            config.enable_sni = self.context.sni.is_some();
            Ok(config)
        })
    }

    /// Runs the client handshake on `tcp` (connected to `ip`) with the current secrets.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        ip: std::net::IpAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.config().map_err(std::io::Error::other)?;
        let name = match &self.context.sni {
            Some(s) => ServerName::try_from(s.clone()).map_err(std::io::Error::other)?,
            None => ServerName::IpAddress(ip.into()),
        };
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }
}

/// An upstream TCP connection, with TLS on top when the cluster has it (the handshake
/// bounded by `timeout`, the cluster's connect timeout).
pub async fn upgrade(
    tcp: TcpStream,
    tls: Option<&ClientTls>,
    timeout: Duration,
) -> std::io::Result<Stream> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(tcp));
    };
    let ip = tcp.peer_addr()?.ip();
    match tokio::time::timeout(timeout, tls.connect(tcp, ip)).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "upstream TLS handshake timed out",
        )),
    }
}

/// An upstream connection: plaintext or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether ALPN chose HTTP/2.
    pub fn negotiated_h2(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: Pattern, ignore_case: bool) -> SanMatcher {
        SanMatcher {
            uri: true,
            pattern,
            ignore_case,
        }
    }

    #[test]
    fn san_matchers_match_as_envoys_string_matchers() {
        let id = "spiffe://td/env/prod/ns/shop/sa/cart";
        assert!(m(Pattern::Exact(id.into()), false).matches(id));
        assert!(!m(Pattern::Exact("spiffe://td/env/prod/".into()), false).matches(id));
        assert!(m(Pattern::Prefix("spiffe://td/env/prod/".into()), false).matches(id));
        assert!(!m(Pattern::Prefix("spiffe://td/env/staging/".into()), false).matches(id));
        assert!(m(Pattern::Suffix("/sa/cart".into()), false).matches(id));
        assert!(m(Pattern::Contains("/ns/shop/".into()), false).matches(id));
        assert!(!m(Pattern::Prefix("SPIFFE://TD/".into()), false).matches(id));
        assert!(m(Pattern::Prefix("SPIFFE://TD/".into()), true).matches(id));
    }

    #[test]
    fn a_secret_debug_never_shows_key_material() {
        let v = SecretValue::Certificate {
            chain: vec![CertificateDer::from(vec![1, 2, 3])],
            key: Arc::new(PrivateKeyDer::Pkcs8(vec![42u8; 8].into())),
        };
        let d = format!("{v:?}");
        assert_eq!(d, "Certificate { chain_len: 1, .. }");
    }

    /// The `ROOTCA` secret the hub serves: the CA's roots and every CA's CRL.
    fn rootca(bundle: &str, crl: &str) -> Secret {
        let inline = |v: &str| DataSource {
            specifier: Some(Specifier::InlineString(v.to_string())),
            ..Default::default()
        };
        Secret {
            name: "ROOTCA".into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(inline(bundle)),
                    crl: (!crl.is_empty()).then(|| inline(crl)),
                    ..Default::default()
                },
            )),
        }
    }

    fn verify(secret: &Secret, chain_pem: &str) -> Result<(), rustls::Error> {
        let SecretValue::Trust(trust) = super::secret(secret).unwrap() else {
            panic!("not a validation context")
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        trust
            .client_verifier()
            .build()
            .unwrap()
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    /// CRLs in a `validation_context` secret are checked as Envoy checks them: a
    /// chain whose intermediate a CRL lists is refused (`Revoked`), one whose every
    /// CA has a CRL is served, and one whose intermediate has no CRL is refused too
    /// (every CA of a chain needs one once CRLs are given).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secrets_crls_are_checked_as_envoy_checks_them() {
        use tributary_controlplane::identity::ca::{Ca, CaConfig, Signer};
        use tributary_controlplane::identity::{CertificateIssuer, SpiffeId};
        let store = std::sync::Arc::new(
            tributary_store::embedded::Embedded::in_memory(Default::default()).unwrap(),
        );
        let ca = Ca::open(store, CaConfig::new("mesh.local")).await.unwrap();
        let id = SpiffeId::parse("spiffe://mesh.local/env/prod/ns/shop/sa/web").unwrap();
        let old = ca.issue(&id).unwrap();
        let before = rootca(&ca.trust_bundle_pem(), &ca.crl_pem());
        verify(&before, &old.chain_pem).expect("every CA has an empty CRL");

        ca.rotate_intermediate(&Signer::Mesh, std::time::Duration::from_secs(3600))
            .await
            .unwrap();
        let new = ca.issue(&id).unwrap();
        let overlap = rootca(&ca.trust_bundle_pem(), &ca.crl_pem());
        verify(&overlap, &old.chain_pem).expect("the old intermediate during the overlap");
        verify(&overlap, &new.chain_pem).expect("the new intermediate");
        // The old secret has no CRL of the new intermediate: its chains are refused
        // (why the hub pushes the new CRLs before certificates of the new chain).
        let err = verify(&before, &new.chain_pem).unwrap_err();
        assert!(
            format!("{err:?}").contains("UnknownRevocationStatus"),
            "{err:?}"
        );

        ca.finish_intermediate_rotation(&Signer::Mesh)
            .await
            .unwrap();
        let after = rootca(&ca.trust_bundle_pem(), &ca.crl_pem());
        let err = verify(&after, &old.chain_pem).unwrap_err();
        assert!(format!("{err:?}").contains("Revoked"), "{err:?}");
        verify(&after, &new.chain_pem).expect("the new intermediate after the finish");
        // Without CRLs nothing is checked: the revoked chain would pass.
        verify(&rootca(&ca.trust_bundle_pem(), ""), &old.chain_pem).unwrap();
        // A CRL that is not one is refused when the secret is read (a NACK).
        let bad = rootca(
            &ca.trust_bundle_pem(),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        );
        let err = super::secret(&bad).unwrap_err();
        assert!(err.contains("validation_context.crl"), "{err}");
    }
}
