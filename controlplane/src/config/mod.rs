//! The file config source: Kubernetes-style YAML documents → a validated [`Mesh`].
//!
//! Parsing is a pure function of file names and contents ([`parse_files`]), so it is
//! tested without touching the disk; [`watch`] reads the files and feeds the index.
//! Every error names the file, the document, the field and what was expected, and a
//! file set with any error is rejected whole (the last good config stays in force).

pub mod redact;
pub mod security;
pub mod store;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::Deserialize;

use crate::model::normalize_host;
use crate::model::{
    Dependency, Destination, Endpoint, Gateway, GatewayListener, HeaderMatch, HeaderValueMatch,
    Health, InboundPort, Locality, Mesh, ObjectKey, PathMatch, Protocol, Route, RouteRule, Service,
    ServicePort, SidecarScope, Subset, ZoneLocality,
};

pub const API_VERSION: &str = "tributary.io/v1alpha1";
pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// One problem in one document. Not retryable: the input must change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {document}: {field}{sep}{message}", sep = if field.is_empty() { "" } else { ": " })]
pub struct ConfigError {
    pub file: String,
    /// `document N (Kind namespace/name)`, or `document N` before the name is known.
    pub document: String,
    /// Dotted path of the offending field, e.g. `spec.ports[0].port`; may be empty.
    pub field: String,
    pub message: String,
}

/// All the errors of one attempt to load a file set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} config error(s):\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

// ---- raw documents, as written --------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<RawMetadata>,
    spec: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    environment: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    subsets: Vec<RawSubset>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServicePort {
    name: Option<String>,
    port: i64,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    service: Option<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: String,
    port: Option<i64>,
    #[serde(default)]
    ports: BTreeMap<String, i64>,
    #[serde(default)]
    locality: RawLocality,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    weight: Option<i64>,
    health: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    cluster: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    hosts: Vec<String>,
    port: Option<i64>,
    #[serde(default)]
    http: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match", default)]
    matches: RawMatch,
    #[serde(default)]
    destinations: Vec<RawDestination>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    path: Option<RawStringMatch>,
    #[serde(default)]
    headers: Vec<RawHeaderMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStringMatch {
    prefix: Option<String>,
    exact: Option<String>,
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    service: String,
    port: Option<i64>,
    subset: Option<String>,
    weight: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    #[serde(default)]
    dependencies: Vec<RawDependency>,
    #[serde(default)]
    inbound: Vec<RawInbound>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    port: i64,
    #[serde(rename = "targetPort")]
    target_port: Option<i64>,
    #[serde(rename = "targetAddress")]
    target_address: Option<String>,
    bind: Option<String>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    namespace: Option<String>,
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default, rename = "eastWestGateways")]
    east_west_gateways: Vec<RawEastWestGateway>,
    locality: Option<RawZoneLocality>,
    mtls: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEastWestGateway {
    zone: String,
    address: String,
    port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZoneLocality {
    #[serde(rename = "localPercent")]
    local_percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default)]
    listeners: Vec<RawGatewayListener>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGatewayListener {
    name: String,
    address: Option<String>,
    port: i64,
    protocol: Option<String>,
    hosts: Option<Vec<String>>,
    tls: Option<RawListenerTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListenerTls {
    credential: String,
}

/// A certificate and key (never `Debug`-printed: the key is secret), or the
/// Kubernetes Secret that holds them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    certificate: Option<String>,
    #[serde(rename = "privateKey")]
    private_key: Option<String>,
    #[serde(rename = "kubernetesSecret")]
    kubernetes_secret: Option<RawSecretRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretRef {
    cluster: String,
    namespace: String,
    name: String,
}

// ---- parsing ----------------------------------------------------------------------

/// A parsed document waiting for cross-object validation.
struct Doc<T> {
    file: String,
    document: String,
    env: String,
    key: ObjectKey,
    spec: T,
}

impl<T> Doc<T> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            document: self.document.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Default)]
struct Parsed {
    services: Vec<Doc<RawService>>,
    endpoints: Vec<Doc<RawEndpoints>>,
    routes: Vec<Doc<RawRoute>>,
    gateways: Vec<Doc<RawGateway>>,
    sidecars: Vec<Doc<RawSidecar>>,
    environments: Vec<Doc<RawEnvironment>>,
    remote_clusters: Vec<Doc<security::RawRemoteCluster>>,
    operators: Vec<Doc<security::RawOperator>>,
    credentials: Vec<Doc<RawCredential>>,
}

/// The kinds a document may have.
pub const KINDS: &[&str] = &[
    "Service",
    "Endpoints",
    "Route",
    "Gateway",
    "Sidecar",
    "Environment",
    "RemoteCluster",
    "Operator",
    "Credential",
];

/// Parses and validates a file set: `(file name, contents)` pairs, in load order.
pub fn parse_files<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Mesh, ConfigErrors> {
    let mut errors = Vec::new();
    let mut parsed = Parsed::default();
    let mut seen: HashMap<(String, String, ObjectKey), String> = HashMap::new();
    for (file, text) in files {
        parse_file(file, text, &mut parsed, &mut seen, &mut errors);
    }
    let mesh = build_mesh(parsed, &mut errors);
    if errors.is_empty() {
        Ok(mesh)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// YAML nodes that alias expansion may add to a file beyond one per byte of it.
/// Without aliases a file never holds more nodes than bytes; anchors and aliases for
/// shared snippets stay far below this, while a "billion laughs" document (which
/// `serde_yaml`'s own repetition limit lets grow to gigabytes) is rejected after
/// counting, before anything is built.
pub const MAX_ALIAS_EXPANSION_NODES: u64 = 100_000;

/// Counts the nodes of YAML documents (aliases expanded), failing once `left` runs
/// out; allocates nothing.
struct NodeBudget<'a> {
    left: &'a std::cell::Cell<u64>,
}

impl NodeBudget<'_> {
    fn spend<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => Err(E::custom("too many YAML nodes after alias expansion")),
        }
    }
    fn again(&self) -> Self {
        Self { left: self.left }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NodeBudget<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NodeBudget<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.spend()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.spend()
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<(), E> {
        self.spend()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.spend()
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<(), E> {
        self.spend()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.spend()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.spend()
    }
    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<(), E> {
        self.spend()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend()
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend()
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.spend()?;
        d.deserialize_any(self)
    }
    fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.spend()?;
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.spend()?;
        while seq.next_element_seed(self.again())?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.spend()?;
        while map.next_key_seed(self.again())?.is_some() {
            map.next_value_seed(self.again())?;
        }
        Ok(())
    }
    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        use serde::de::VariantAccess;
        // A tagged node (`!tag value`): the tag, then the value.
        let ((), variant) = data.variant_seed(self.again())?;
        variant.newtype_variant_seed(self)
    }
}

/// Checks that `text`'s documents stay within [`MAX_ALIAS_EXPANSION_NODES`]; on
/// failure, the number of the document where the budget ran out and the message. A
/// syntax error ends the count without failing it: parsing reports it, after the
/// documents before it.
pub(crate) fn check_yaml_size(text: &str) -> Result<(), (usize, String)> {
    let budget = (text.len() as u64).saturating_add(MAX_ALIAS_EXPANSION_NODES);
    let left = std::cell::Cell::new(budget);
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        if serde::de::DeserializeSeed::deserialize(NodeBudget { left: &left }, de).is_err() {
            if left.get() == 0 {
                return Err((
                    index + 1,
                    format!(
                        "the file expands to more than {budget} YAML nodes (its size in bytes plus {MAX_ALIAS_EXPANSION_NODES}): too many alias expansions"
                    ),
                ));
            }
            break;
        }
    }
    Ok(())
}

fn parse_file(
    file: &str,
    text: &str,
    parsed: &mut Parsed,
    seen: &mut HashMap<(String, String, ObjectKey), String>,
    errors: &mut Vec<ConfigError>,
) {
    if let Err((number, message)) = check_yaml_size(text) {
        errors.push(ConfigError {
            file: file.to_string(),
            document: format!("document {number}"),
            field: String::new(),
            message,
        });
        return;
    }
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        let doc_err = |document: String, field: &str, message: String| ConfigError {
            file: file.to_string(),
            document,
            field: field.to_string(),
            message,
        };
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                errors.push(doc_err(
                    format!("document {number}"),
                    "",
                    format!("invalid YAML: {e}"),
                ));
                // The rest of the stream cannot be trusted after a syntax error.
                return;
            }
        };
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let raw: RawDocument = match serde_yaml::from_value(value) {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(doc_err(format!("document {number}"), "", yaml_message(&e)));
                continue;
            }
        };
        let anon = format!("document {number}");
        match raw.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => {
                errors.push(doc_err(
                    anon,
                    "apiVersion",
                    format!("{other:?} is not supported, expected {API_VERSION:?}"),
                ));
                continue;
            }
            None => {
                errors.push(doc_err(
                    anon,
                    "apiVersion",
                    format!("missing, expected {API_VERSION:?}"),
                ));
                continue;
            }
        }
        let Some(kind) = raw.kind else {
            errors.push(doc_err(
                anon,
                "kind",
                format!("missing, expected one of {}", KINDS.join(", ")),
            ));
            continue;
        };
        let Some(meta) = raw.metadata else {
            errors.push(doc_err(
                format!("document {number} ({kind})"),
                "metadata",
                "missing, expected metadata.name".into(),
            ));
            continue;
        };
        let name = meta.name.unwrap_or_default();
        let mesh_kind = security::is_mesh_kind(&kind);
        if mesh_kind
            && let Some((field, _)) = [
                ("metadata.environment", &meta.environment),
                ("metadata.namespace", &meta.namespace),
            ]
            .into_iter()
            .find(|(_, v)| v.is_some())
        {
            errors.push(doc_err(
                format!("document {number} ({kind} {name})"),
                field,
                format!("must be omitted: a {kind} belongs to the whole mesh"),
            ));
            continue;
        }
        if kind == "Environment" {
            // An Environment defines the environment it names: it lives in itself.
            let ns_ok = meta
                .namespace
                .as_deref()
                .is_none_or(|n| n == DEFAULT_NAMESPACE);
            let env_ok = meta.environment.as_deref().is_none_or(|e| e == name);
            if !ns_ok || !env_ok {
                let document = format!("document {number} (Environment {name})");
                let (field, message) = if !env_ok {
                    (
                        "metadata.environment",
                        format!("must be omitted or equal metadata.name {name:?}"),
                    )
                } else {
                    (
                        "metadata.namespace",
                        "must be omitted: an Environment has no namespace".to_string(),
                    )
                };
                errors.push(doc_err(document, field, message));
                continue;
            }
        }
        let namespace = meta
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let env = if kind == "Environment" {
            name.clone()
        } else if mesh_kind {
            security::MESH_SCOPE.to_string()
        } else {
            meta.environment
                .unwrap_or_else(|| DEFAULT_ENVIRONMENT.to_string())
        };
        let document = format!("document {number} ({kind} {env}/{namespace}/{name})");
        let _ = meta.labels;
        let mut bad_name = false;
        for (field, value) in [
            ("metadata.name", &name),
            ("metadata.namespace", &namespace),
            ("metadata.environment", &env),
        ] {
            if mesh_kind && field != "metadata.name" {
                continue;
            }
            if let Err(message) = check_dns_name(value) {
                errors.push(doc_err(document.clone(), field, message));
                bad_name = true;
            }
        }
        if bad_name {
            continue;
        }
        let key = ObjectKey { namespace, name };
        if let Some(first) = seen.insert(
            (env.clone(), kind.clone(), key.clone()),
            format!("{file} {document}"),
        ) {
            errors.push(doc_err(
                document.clone(),
                "metadata.name",
                format!("duplicate {kind} {key} in environment {env:?} (first defined in {first})"),
            ));
            continue;
        }
        let spec = raw.spec.unwrap_or(serde_yaml::Value::Null);
        let spec = if spec.is_null() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            spec
        };
        macro_rules! push {
            ($list:ident, $ty:ty) => {
                match serde_path_to_error::deserialize::<_, $ty>(spec) {
                    Ok(spec) => parsed.$list.push(Doc {
                        file: file.to_string(),
                        document,
                        env,
                        key,
                        spec,
                    }),
                    Err(e) => {
                        let path = e.path().to_string();
                        let field = if path == "." {
                            "spec".to_string()
                        } else {
                            format!("spec.{path}")
                        };
                        errors.push(doc_err(document, &field, yaml_message(e.inner())))
                    }
                }
            };
        }
        match kind.as_str() {
            "Service" => push!(services, RawService),
            "Endpoints" => push!(endpoints, RawEndpoints),
            "Route" => push!(routes, RawRoute),
            "Gateway" => push!(gateways, RawGateway),
            "Sidecar" => push!(sidecars, RawSidecar),
            "Environment" => push!(environments, RawEnvironment),
            "RemoteCluster" => push!(remote_clusters, security::RawRemoteCluster),
            "Operator" => push!(operators, security::RawOperator),
            "Credential" => push!(credentials, RawCredential),
            other => errors.push(doc_err(
                document,
                "kind",
                format!(
                    "{other:?} is not a known kind, expected one of {}",
                    KINDS.join(", ")
                ),
            )),
        }
    }
}

fn yaml_message(e: &serde_yaml::Error) -> String {
    let text = e.to_string();
    match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => rest.to_string(),
        _ => text,
    }
}

fn check_dns_name(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid name, expected lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
        ))
    }
}

fn check_port(value: i64) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is out of range, expected 1..=65535"))
}

fn parse_address(value: &str) -> Result<IpAddr, String> {
    let trimmed = value.trim_start_matches('[').trim_end_matches(']');
    trimmed
        .parse()
        .map_err(|_| format!("{value:?} is not an IPv4 or IPv6 address"))
}

/// Checks `value` as an RE2 regex, the dialect Envoy and gRPC match with. The
/// `regex-syntax` parser accepts RE2's syntax and, like RE2, rejects backreferences
/// and look-around, so a pattern that passes here reaches proxies that can compile
/// it. (Envoy's own program-size limit is not checked: a proxy NACKs that, and the
/// NACK path reports it.)
fn check_regex(value: &str) -> Result<(), String> {
    regex_syntax::ParserBuilder::new()
        .build()
        .parse(value)
        .map(drop)
        .map_err(|e| {
            let (kind, offset) = match &e {
                regex_syntax::Error::Parse(e) => (e.kind().to_string(), e.span().start.offset),
                regex_syntax::Error::Translate(e) => (e.kind().to_string(), e.span().start.offset),
                other => (other.to_string(), 0),
            };
            format!("{value:?} is not a valid RE2 regex: {kind} (at offset {offset})")
        })
}

/// The longest duration accepted anywhere (config fields and flags): the range of
/// protobuf's `google.protobuf.Duration`, 315,576,000,000 s (about 10,000 years).
/// Anything longer would overflow the xDS field it is sent in, or a timer.
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000_000);

/// [`parse_duration`] for a flag that must be above zero (an interval, a timeout).
pub fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    let d = parse_duration(value)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Logs to stderr, filtered by `RUST_LOG`, else at `default` (e.g. `info`): the setup of
/// every binary of the workspace.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Parses a duration with `humantime`: numbers with units, e.g. `250ms`, `1.5s`,
/// `5s`, `1m`, `2h`, `1d`, or a sum such as `1h 30m`. Never panics: an overflow, a
/// sign, an exponent or a missing unit is an error that names the value.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    const EXPECTED: &str = "expected a number and a unit, e.g. 250ms, 1.5s, 5s, 1m, 1h 30m";
    let d = humantime::parse_duration(value.trim()).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("{value:?} has no unit, {EXPECTED}")
        }
        humantime::DurationError::UnknownUnit { unit, .. } => {
            format!("{value:?} has unknown unit {unit:?}, expected ms, s, m, h or d (or us, ns, w)")
        }
        other => format!("{value:?} is not a duration ({other}), {EXPECTED}"),
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "{value:?} is too long, expected at most {}s",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(d)
}

fn parse_protocol(value: Option<&str>) -> Result<Protocol, String> {
    match value.unwrap_or("HTTP") {
        "HTTP" => Ok(Protocol::Http),
        "HTTP2" => Ok(Protocol::Http2),
        "GRPC" => Ok(Protocol::Grpc),
        "TCP" => Ok(Protocol::Tcp),
        other => Err(format!(
            "{other:?} is not a protocol, expected HTTP, HTTP2, GRPC or TCP"
        )),
    }
}

fn parse_health(value: Option<&str>) -> Result<Health, String> {
    match value.unwrap_or("HEALTHY") {
        "HEALTHY" => Ok(Health::Healthy),
        "UNHEALTHY" => Ok(Health::Unhealthy),
        "DRAINING" => Ok(Health::Draining),
        "UNKNOWN" => Ok(Health::Unknown),
        other => Err(format!(
            "{other:?} is not a health status, expected HEALTHY, UNHEALTHY, DRAINING or UNKNOWN"
        )),
    }
}

// ---- cross-object validation ----------------------------------------------------

fn build_mesh(parsed: Parsed, errors: &mut Vec<ConfigError>) -> Mesh {
    let mut mesh = Mesh::default();
    // Hosts are unique per environment: host -> owning service.
    let mut hosts: HashMap<(String, String), ObjectKey> = HashMap::new();

    for doc in &parsed.services {
        if let Some(service) = build_service(doc, &mut hosts, errors) {
            mesh.environments
                .entry(doc.env.clone())
                .or_default()
                .services
                .insert(doc.key.clone(), service);
        }
    }
    for doc in &parsed.endpoints {
        build_endpoints(doc, &mut mesh, errors);
    }
    for doc in &parsed.routes {
        if let Some(route) = build_route(doc, &mesh, &hosts, errors) {
            mesh.environments
                .entry(doc.env.clone())
                .or_default()
                .routes
                .push(route);
        }
    }
    for doc in &parsed.sidecars {
        if let Some(scope) = build_sidecar(doc, errors) {
            mesh.environments
                .entry(doc.env.clone())
                .or_default()
                .sidecars
                .insert(scope.name.clone(), scope);
        }
    }
    for doc in &parsed.environments {
        if let Some((zones, locality)) = build_environment(doc, errors) {
            let env = mesh.environments.entry(doc.env.clone()).or_default();
            env.zones = zones;
            env.locality = locality;
            env.mtls = doc.spec.mtls;
        }
    }
    for doc in &parsed.credentials {
        let Some(source) = build_credential(doc, errors) else {
            continue;
        };
        let env = mesh.environments.entry(doc.env.clone()).or_default();
        match source {
            CredentialSource::Inline(credential) => {
                env.credentials.insert(doc.key.clone(), credential);
            }
            CredentialSource::Secret(secret) => {
                env.secret_credentials.insert(doc.key.clone(), secret);
            }
        }
    }
    for doc in &parsed.gateways {
        if let Some(gateway) = build_gateway(doc, errors) {
            let env = mesh.environments.get(&doc.env);
            for (i, l) in gateway.listeners.iter().enumerate() {
                if let Some(key) = &l.tls
                    && !env.is_some_and(|e| {
                        e.credentials.contains_key(key) || e.secret_credentials.contains_key(key)
                    })
                {
                    errors.push(doc.err(
                        format!("spec.listeners[{i}].tls.credential"),
                        format!(
                            "{:?} is not a Credential of namespace {:?} in environment {:?}",
                            key.name, key.namespace, doc.env
                        ),
                    ));
                }
            }
            mesh.environments
                .entry(doc.env.clone())
                .or_default()
                .gateways
                .insert(gateway.name.clone(), gateway);
        }
    }
    for doc in &parsed.remote_clusters {
        security::build_remote_cluster(doc, &mut mesh, errors);
    }
    for doc in &parsed.operators {
        security::build_operator(doc, &mut mesh, errors);
    }
    mesh
}

fn build_service(
    doc: &Doc<RawService>,
    hosts: &mut HashMap<(String, String), ObjectKey>,
    errors: &mut Vec<ConfigError>,
) -> Option<Service> {
    let before = errors.len();
    let spec = &doc.spec;
    if spec.hosts.is_empty() {
        errors.push(doc.err("spec.hosts", "must list at least one host"));
    }
    let mut service_hosts: Vec<String> = Vec::with_capacity(spec.hosts.len());
    for (i, raw) in spec.hosts.iter().enumerate() {
        let field = format!("spec.hosts[{i}]");
        match normalize_host(raw) {
            Err(message) => errors.push(doc.err(field, message)),
            Ok(host) if service_hosts.contains(&host) => {
                errors.push(doc.err(field, format!("duplicate host {host:?}")))
            }
            Ok(host) => {
                if let Some(owner) = hosts.get(&(doc.env.clone(), host.clone())) {
                    errors.push(doc.err(
                        field,
                        format!(
                            "host {host:?} is already used by Service {owner} in environment {:?}",
                            doc.env
                        ),
                    ));
                } else {
                    hosts.insert((doc.env.clone(), host.clone()), doc.key.clone());
                }
                service_hosts.push(host);
            }
        }
    }
    if spec.ports.is_empty() {
        errors.push(doc.err("spec.ports", "must list at least one port"));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = check_port(p.port)
            .map_err(|m| errors.push(doc.err(format!("{field}.port"), m)))
            .ok();
        let protocol = parse_protocol(p.protocol.as_deref())
            .map_err(|m| errors.push(doc.err(format!("{field}.protocol"), m)))
            .ok();
        let name = match &p.name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => {
                errors.push(doc.err(
                    format!("{field}.name"),
                    "missing, every port needs a name (endpoints map ports by name)",
                ));
                continue;
            }
        };
        if ports.iter().any(|q: &ServicePort| q.name == name) {
            errors.push(doc.err(
                format!("{field}.name"),
                format!("duplicate port name {name:?}"),
            ));
        }
        if let (Some(port), Some(protocol)) = (port, protocol) {
            if ports.iter().any(|q: &ServicePort| q.port == port) {
                errors.push(doc.err(format!("{field}.port"), format!("duplicate port {port}")));
            }
            ports.push(ServicePort {
                name,
                port,
                protocol,
            });
        }
    }
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        if let Err(message) = check_dns_name(&s.name) {
            errors.push(doc.err(format!("spec.subsets[{i}].name"), message));
        } else if subsets.iter().any(|q| q.name == s.name) {
            errors.push(doc.err(
                format!("spec.subsets[{i}].name"),
                format!("duplicate subset {:?}", s.name),
            ));
        } else {
            subsets.push(Subset {
                name: s.name.clone(),
                labels: s.labels.clone(),
            });
        }
    }
    (errors.len() == before).then(|| Service {
        key: doc.key.clone(),
        hosts: service_hosts,
        ports,
        subsets,
        endpoints: Vec::new(),
    })
}

fn build_endpoints(doc: &Doc<RawEndpoints>, mesh: &mut Mesh, errors: &mut Vec<ConfigError>) {
    let service_name = doc
        .spec
        .service
        .clone()
        .unwrap_or_else(|| doc.key.name.clone());
    let service_key = ObjectKey {
        namespace: doc.key.namespace.clone(),
        name: service_name,
    };
    let Some(service) = mesh
        .environments
        .get_mut(&doc.env)
        .and_then(|env| env.services.get_mut(&service_key))
    else {
        errors.push(doc.err(
            "spec.service",
            format!(
                "{service_key} is not a Service in environment {:?}",
                doc.env
            ),
        ));
        return;
    };
    let before = errors.len();
    let mut endpoints = Vec::with_capacity(doc.spec.endpoints.len());
    for (i, e) in doc.spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        let address = parse_address(&e.address)
            .map_err(|m| errors.push(doc.err(format!("{field}.address"), m)))
            .ok();
        let port = e
            .port
            .map(check_port)
            .transpose()
            .map_err(|m| errors.push(doc.err(format!("{field}.port"), m)))
            .ok()
            .flatten();
        let mut ports = BTreeMap::new();
        for (name, value) in &e.ports {
            if service.ports.iter().all(|p| &p.name != name) {
                let known: Vec<_> = service.ports.iter().map(|p| p.name.as_str()).collect();
                errors.push(doc.err(
                    format!("{field}.ports.{name}"),
                    format!(
                        "{name:?} is not a port of Service {service_key}, expected one of {known:?}"
                    ),
                ));
            }
            match check_port(*value) {
                Ok(p) => {
                    ports.insert(name.clone(), p);
                }
                Err(m) => errors.push(doc.err(format!("{field}.ports.{name}"), m)),
            }
        }
        if e.port.is_none() && e.ports.is_empty() {
            errors.push(doc.err(
                format!("{field}.port"),
                "missing, expected `port` or `ports`",
            ));
        }
        let weight = match e.weight.unwrap_or(1) {
            w @ 1..=1_000_000 => w as u32,
            w => {
                errors.push(doc.err(
                    format!("{field}.weight"),
                    format!("{w} is out of range, expected 1..=1000000"),
                ));
                1
            }
        };
        let health = parse_health(e.health.as_deref())
            .map_err(|m| errors.push(doc.err(format!("{field}.health"), m)))
            .ok();
        if let (Some(address), Some(health)) = (address, health) {
            endpoints.push(Endpoint {
                address,
                port,
                ports: ports.into(),
                locality: Locality {
                    region: e.locality.region.clone(),
                    zone: e.locality.zone.clone(),
                    cluster: e.locality.cluster.clone(),
                },
                labels: e.labels.clone(),
                weight,
                health,
            });
        }
    }
    if errors.len() == before {
        service.endpoints.extend(endpoints);
    }
}

fn build_route(
    doc: &Doc<RawRoute>,
    mesh: &Mesh,
    hosts: &HashMap<(String, String), ObjectKey>,
    errors: &mut Vec<ConfigError>,
) -> Option<Route> {
    let before = errors.len();
    let spec = &doc.spec;
    let services = mesh.environments.get(&doc.env).map(|e| &e.services);
    let lookup = |key: &ObjectKey| services.and_then(|s| s.get(key));
    if spec.hosts.is_empty() {
        errors.push(doc.err("spec.hosts", "must list at least one host"));
    }
    let mut host_services = BTreeSet::new();
    let mut route_hosts = Vec::with_capacity(spec.hosts.len());
    for (i, raw) in spec.hosts.iter().enumerate() {
        let host = match normalize_host(raw) {
            Ok(h) => h,
            Err(message) => {
                errors.push(doc.err(format!("spec.hosts[{i}]"), message));
                continue;
            }
        };
        match hosts.get(&(doc.env.clone(), host.clone())) {
            Some(owner) => {
                host_services.insert(owner.clone());
                route_hosts.push(host);
            }
            None => errors.push(doc.err(
                format!("spec.hosts[{i}]"),
                format!(
                    "{host:?} is not a host of any Service in environment {:?}",
                    doc.env
                ),
            )),
        }
    }
    let port = match spec.port {
        Some(p) => check_port(p)
            .map_err(|m| errors.push(doc.err("spec.port", m)))
            .ok(),
        None => {
            let mut numbers = BTreeSet::new();
            for key in &host_services {
                if let Some(s) = lookup(key) {
                    numbers.extend(s.ports.iter().map(|p| p.port));
                }
            }
            if numbers.len() == 1 {
                numbers.into_iter().next()
            } else {
                if !host_services.is_empty() {
                    errors.push(doc.err("spec.port", format!("missing: the hosts' services have ports {numbers:?}, name the one this route applies to")));
                }
                None
            }
        }
    };
    if let Some(port) = port {
        for key in &host_services {
            if lookup(key).is_some_and(|s| s.port(port).is_none()) {
                errors.push(doc.err(
                    "spec.port",
                    format!("{port} is not a port of Service {key}"),
                ));
            }
        }
    }
    if spec.http.is_empty() {
        errors.push(doc.err("spec.http", "must list at least one rule"));
    }
    let mut rules = Vec::new();
    for (i, rule) in spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        let path = match &rule.matches.path {
            None => PathMatch::Prefix("/".into()),
            Some(m) => match (&m.prefix, &m.exact, &m.regex) {
                (Some(p), None, None) => PathMatch::Prefix(p.clone()),
                (None, Some(p), None) => PathMatch::Exact(p.clone()),
                (None, None, Some(p)) => {
                    if let Err(m) = check_regex(p) {
                        errors.push(doc.err(format!("{field}.match.path.regex"), m));
                    }
                    PathMatch::Regex(p.clone())
                }
                _ => {
                    errors.push(doc.err(
                        format!("{field}.match.path"),
                        "expected exactly one of prefix, exact, regex",
                    ));
                    PathMatch::Prefix("/".into())
                }
            },
        };
        let mut headers = Vec::new();
        for (j, h) in rule.matches.headers.iter().enumerate() {
            let value = match (&h.exact, &h.prefix, &h.regex, h.present) {
                (Some(v), None, None, None) => HeaderValueMatch::Exact(v.clone()),
                (None, Some(v), None, None) => HeaderValueMatch::Prefix(v.clone()),
                (None, None, Some(v), None) => HeaderValueMatch::Regex(v.clone()),
                (None, None, None, Some(true)) => HeaderValueMatch::Present,
                _ => {
                    errors.push(doc.err(
                        format!("{field}.match.headers[{j}]"),
                        "expected exactly one of exact, prefix, regex, present: true",
                    ));
                    continue;
                }
            };
            if let HeaderValueMatch::Regex(r) = &value
                && let Err(m) = check_regex(r)
            {
                errors.push(doc.err(format!("{field}.match.headers[{j}].regex"), m));
            }
            if h.name.is_empty() {
                errors.push(doc.err(
                    format!("{field}.match.headers[{j}].name"),
                    "must not be empty",
                ));
            }
            headers.push(HeaderMatch {
                name: h.name.to_ascii_lowercase(),
                value,
            });
        }
        if rule.destinations.is_empty() {
            errors.push(doc.err(
                format!("{field}.destinations"),
                "must list at least one destination",
            ));
        }
        let mut destinations = Vec::new();
        let mut total: u64 = 0;
        for (j, d) in rule.destinations.iter().enumerate() {
            let dfield = format!("{field}.destinations[{j}]");
            let key = match d.service.split_once('/') {
                Some((ns, name)) => ObjectKey {
                    namespace: ns.into(),
                    name: name.into(),
                },
                None => ObjectKey {
                    namespace: doc.key.namespace.clone(),
                    name: d.service.clone(),
                },
            };
            let Some(service) = lookup(&key) else {
                errors.push(doc.err(
                    format!("{dfield}.service"),
                    format!("{key} is not a Service in environment {:?}", doc.env),
                ));
                continue;
            };
            let dport = match d.port {
                Some(p) => match check_port(p) {
                    Ok(p) => Some(p),
                    Err(m) => {
                        errors.push(doc.err(format!("{dfield}.port"), m));
                        None
                    }
                },
                None if service.ports.len() == 1 => Some(service.ports[0].port),
                None => port,
            };
            let Some(dport) = dport else {
                if d.port.is_none() {
                    errors.push(doc.err(
                        format!("{dfield}.port"),
                        format!("missing: Service {key} has several ports"),
                    ));
                }
                continue;
            };
            if service.port(dport).is_none() {
                errors.push(doc.err(
                    format!("{dfield}.port"),
                    format!("{dport} is not a port of Service {key}"),
                ));
            }
            if let Some(subset) = &d.subset
                && service.subset(subset).is_none()
            {
                errors.push(doc.err(
                    format!("{dfield}.subset"),
                    format!("{subset:?} is not a subset of Service {key}"),
                ));
            }
            let weight = match d.weight.unwrap_or(1) {
                w @ 0..=1_000_000 => w as u32,
                w => {
                    errors.push(doc.err(
                        format!("{dfield}.weight"),
                        format!("{w} is out of range, expected 0..=1000000"),
                    ));
                    0
                }
            };
            total += u64::from(weight);
            destinations.push(Destination {
                service: key,
                port: dport,
                subset: d.subset.clone(),
                weight,
            });
        }
        if !rule.destinations.is_empty() && total == 0 {
            errors.push(doc.err(
                format!("{field}.destinations"),
                "weights sum to zero, expected at least one positive weight",
            ));
        }
        let timeout = rule
            .timeout
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|m| errors.push(doc.err(format!("{field}.timeout"), m)))
            .ok()
            .flatten();
        rules.push(RouteRule {
            path,
            headers,
            destinations,
            timeout,
        });
    }
    let port = port?;
    (errors.len() == before).then(|| Route {
        key: doc.key.clone(),
        hosts: route_hosts,
        port,
        rules,
    })
}

fn build_sidecar(doc: &Doc<RawSidecar>, errors: &mut Vec<ConfigError>) -> Option<SidecarScope> {
    let before = errors.len();
    if doc.spec.dependencies.is_empty() {
        errors.push(doc.err(
            "spec.dependencies",
            "must list at least one dependency (namespace or host)",
        ));
    }
    let mut dependencies = Vec::new();
    for (i, d) in doc.spec.dependencies.iter().enumerate() {
        let field = format!("spec.dependencies[{i}]");
        match (&d.namespace, &d.host) {
            (Some(ns), None) => match check_dns_name(ns) {
                Ok(()) => dependencies.push(Dependency::Namespace(ns.clone())),
                Err(m) => errors.push(doc.err(format!("{field}.namespace"), m)),
            },
            (None, Some(h)) => match normalize_host(h) {
                Ok(h) => dependencies.push(Dependency::Host(h)),
                Err(m) => errors.push(doc.err(format!("{field}.host"), m)),
            },
            _ => errors.push(doc.err(field, "expected exactly one of namespace, host")),
        }
    }
    let inbound = build_inbound(doc, errors);
    (errors.len() == before).then(|| SidecarScope {
        name: doc.key.name.clone(),
        dependencies,
        inbound,
    })
}

/// A sidecar scope's inbound ports (`spec.inbound`): distinct listen ports, each
/// forwarding to the local app.
fn build_inbound(doc: &Doc<RawSidecar>, errors: &mut Vec<ConfigError>) -> Vec<InboundPort> {
    let mut out: Vec<InboundPort> = Vec::new();
    for (i, raw) in doc.spec.inbound.iter().enumerate() {
        let field = format!("spec.inbound[{i}]");
        let before = errors.len();
        let port = check_port(raw.port)
            .map_err(|m| errors.push(doc.err(format!("{field}.port"), m)))
            .ok();
        let target_port = match raw.target_port {
            None => port,
            Some(p) => check_port(p)
                .map_err(|m| errors.push(doc.err(format!("{field}.targetPort"), m)))
                .ok(),
        };
        let mut address = |value: &Option<String>, default: IpAddr, name: &str| match value {
            None => Some(default),
            Some(a) => parse_address(a)
                .map_err(|m| errors.push(doc.err(format!("{field}.{name}"), m)))
                .ok(),
        };
        let bind = address(&raw.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED), "bind");
        let target = address(
            &raw.target_address,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "targetAddress",
        );
        let protocol = parse_protocol(raw.protocol.as_deref())
            .map_err(|m| errors.push(doc.err(format!("{field}.protocol"), m)))
            .ok();
        if port == Some(crate::xds::generate::VIRTUAL_OUTBOUND_PORT) {
            errors.push(doc.err(
                format!("{field}.port"),
                format!(
                    "{} is the sidecar's outbound capture port (virtualOutbound), expected another port",
                    crate::xds::generate::VIRTUAL_OUTBOUND_PORT
                ),
            ));
        }
        if let Some(p) = port
            && out.iter().any(|o| o.port == p)
        {
            errors.push(doc.err(
                format!("{field}.port"),
                format!("port {p} is listed twice, expected each inbound port once"),
            ));
        }
        if let (true, Some(port), Some(target_port), Some(bind), Some(target), Some(protocol)) = (
            errors.len() == before,
            port,
            target_port,
            bind,
            target,
            protocol,
        ) {
            out.push(InboundPort {
                bind,
                port,
                target,
                target_port,
                protocol,
            });
        }
    }
    out
}

/// An environment definition: its zones (each one shard with the environment), their
/// east-west gateways and the local share of traffic.
fn build_environment(
    doc: &Doc<RawEnvironment>,
    errors: &mut Vec<ConfigError>,
) -> Option<(Vec<String>, ZoneLocality)> {
    let before = errors.len();
    if doc.spec.zones.is_empty() {
        errors.push(doc.err("spec.zones", "must list at least one zone"));
    }
    let mut zones: Vec<String> = Vec::new();
    for (i, z) in doc.spec.zones.iter().enumerate() {
        let field = format!("spec.zones[{i}]");
        if let Err(m) = check_dns_name(z) {
            errors.push(doc.err(field, m));
        } else if zones.contains(z) {
            errors.push(doc.err(field, format!("duplicate zone {z:?}")));
        } else {
            zones.push(z.clone());
        }
    }
    let mut locality = ZoneLocality::default();
    for (i, g) in doc.spec.east_west_gateways.iter().enumerate() {
        let field = format!("spec.eastWestGateways[{i}]");
        if !doc.spec.zones.contains(&g.zone) {
            errors.push(doc.err(
                format!("{field}.zone"),
                format!(
                    "{:?} is not a zone of this environment, expected one of spec.zones {:?}",
                    g.zone, doc.spec.zones
                ),
            ));
        } else if locality.gateways.contains_key(&g.zone) {
            errors.push(doc.err(
                format!("{field}.zone"),
                format!("zone {:?} already has an east-west gateway", g.zone),
            ));
        }
        let address = parse_address(&g.address)
            .map_err(|m| errors.push(doc.err(format!("{field}.address"), m)))
            .ok();
        if address.is_some_and(|a| a.is_unspecified() || a.is_multicast()) {
            errors.push(doc.err(
                format!("{field}.address"),
                format!(
                    "{:?} is not an address other zones' proxies can connect to, expected a unicast IPv4 or IPv6 address",
                    g.address
                ),
            ));
        }
        let port = check_port(g.port)
            .map_err(|m| errors.push(doc.err(format!("{field}.port"), m)))
            .ok();
        if let (Some(address), Some(port)) = (address, port) {
            locality
                .gateways
                .entry(g.zone.clone())
                .or_insert(std::net::SocketAddr::new(address, port));
        }
    }
    if let Some(p) = doc.spec.locality.as_ref().and_then(|l| l.local_percent) {
        match u32::try_from(p).ok().filter(|p| (1..=100).contains(p)) {
            Some(p) => locality.local_percent = p,
            None => errors.push(doc.err(
                "spec.locality.localPercent",
                format!("{p} is out of range, expected 1..=100 (percent of traffic kept in the local zone while its endpoints are healthy)"),
            )),
        }
    }
    (errors.len() == before).then_some((zones, locality))
}

/// Where a credential's certificate and key come from.
enum CredentialSource {
    Inline(crate::model::Credential),
    Secret(crate::model::SecretRef),
}

/// A credential: a PEM certificate chain (the leaf first) and a PEM private key, or
/// a remote cluster's Kubernetes Secret holding them (exactly one of the two).
/// Errors never quote the key.
fn build_credential(
    doc: &Doc<RawCredential>,
    errors: &mut Vec<ConfigError>,
) -> Option<CredentialSource> {
    let spec = &doc.spec;
    match (
        &spec.certificate,
        &spec.private_key,
        &spec.kubernetes_secret,
    ) {
        (Some(certificate), Some(private_key), None) => {
            build_inline_credential(doc, certificate, private_key, errors)
                .map(CredentialSource::Inline)
        }
        (None, None, Some(secret)) => {
            build_secret_ref(doc, secret, errors).map(CredentialSource::Secret)
        }
        (_, _, Some(_)) => {
            errors.push(doc.err(
                "spec.kubernetesSecret",
                "expected either spec.kubernetesSecret or spec.certificate and spec.privateKey, not both",
            ));
            None
        }
        (None, _, None) => {
            errors.push(doc.err(
                "spec.certificate",
                "missing: expected spec.certificate and spec.privateKey (PEM), or spec.kubernetesSecret",
            ));
            None
        }
        (Some(_), None, None) => {
            errors.push(doc.err(
                "spec.privateKey",
                "missing: a credential with spec.certificate needs its spec.privateKey",
            ));
            None
        }
    }
}

/// `spec.kubernetesSecret`: a remote cluster id, a namespace and a Secret name, each
/// a valid Kubernetes name.
fn build_secret_ref(
    doc: &Doc<RawCredential>,
    raw: &RawSecretRef,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::model::SecretRef> {
    let before = errors.len();
    if !crate::identity::spiffe::valid_segment(&raw.cluster) {
        errors.push(doc.err(
            "spec.kubernetesSecret.cluster",
            format!(
                "{:?} is not a valid cluster id: expected [A-Za-z0-9._-] (a RemoteCluster's name)",
                raw.cluster
            ),
        ));
    }
    for (field, value) in [("namespace", &raw.namespace), ("name", &raw.name)] {
        if let Err(m) = check_dns_name(value) {
            errors.push(doc.err(format!("spec.kubernetesSecret.{field}"), m));
        }
    }
    (errors.len() == before).then(|| crate::model::SecretRef {
        cluster: raw.cluster.clone(),
        namespace: raw.namespace.clone(),
        name: raw.name.clone(),
    })
}

fn build_inline_credential(
    doc: &Doc<RawCredential>,
    certificate: &str,
    private_key: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::model::Credential> {
    let before = errors.len();
    match x509_parser::pem::parse_x509_pem(certificate.as_bytes()) {
        Ok((_, pem)) if pem.label == "CERTIFICATE" => {
            if let Err(e) = pem.parse_x509() {
                errors.push(doc.err(
                    "spec.certificate",
                    format!("the first certificate does not parse as X.509: {e}"),
                ));
            }
        }
        Ok((_, pem)) => errors.push(doc.err(
            "spec.certificate",
            format!(
                "the first PEM block is {:?}, expected CERTIFICATE",
                pem.label
            ),
        )),
        Err(e) => errors.push(doc.err(
            "spec.certificate",
            format!("not PEM ({e}), expected -----BEGIN CERTIFICATE-----"),
        )),
    }
    match x509_parser::pem::parse_x509_pem(private_key.as_bytes()) {
        Ok((_, pem)) if pem.label.ends_with("PRIVATE KEY") => {}
        Ok((_, pem)) => errors.push(doc.err(
            "spec.privateKey",
            format!(
                "the PEM block is {:?}, expected PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY",
                pem.label
            ),
        )),
        Err(_) => errors.push(doc.err(
            "spec.privateKey",
            "not PEM, expected -----BEGIN PRIVATE KEY-----",
        )),
    }
    (errors.len() == before).then(|| crate::model::Credential {
        certificate_pem: certificate.to_string(),
        private_key_pem: private_key.to_string(),
    })
}

fn build_gateway(doc: &Doc<RawGateway>, errors: &mut Vec<ConfigError>) -> Option<Gateway> {
    let before = errors.len();
    let mut listeners: Vec<GatewayListener> = Vec::new();
    if doc.spec.listeners.is_empty() {
        errors.push(doc.err("spec.listeners", "must list at least one listener"));
    }
    for (i, l) in doc.spec.listeners.iter().enumerate() {
        let field = format!("spec.listeners[{i}]");
        if let Err(m) = check_dns_name(&l.name) {
            errors.push(doc.err(format!("{field}.name"), m));
        }
        if listeners.iter().any(|q| q.name == l.name) {
            errors.push(doc.err(
                format!("{field}.name"),
                format!("duplicate listener {:?}", l.name),
            ));
        }
        let address = parse_address(l.address.as_deref().unwrap_or("0.0.0.0"))
            .map_err(|m| errors.push(doc.err(format!("{field}.address"), m)))
            .ok();
        let port = check_port(l.port)
            .map_err(|m| errors.push(doc.err(format!("{field}.port"), m)))
            .ok();
        match l.protocol.as_deref().unwrap_or("HTTP") {
            "HTTP" => {}
            other => errors.push(doc.err(
                format!("{field}.protocol"),
                format!("{other:?} is not supported, expected HTTP"),
            )),
        }
        let hosts = match &l.hosts {
            None => None,
            Some(h) if h.iter().any(|h| h == "*") => None,
            Some(h) => Some(
                h.iter()
                    .enumerate()
                    .filter_map(|(j, raw)| match normalize_host(raw) {
                        Ok(host) => Some(host),
                        Err(m) => {
                            errors.push(doc.err(format!("{field}.hosts[{j}]"), m));
                            None
                        }
                    })
                    .collect(),
            ),
        };
        if let (Some(address), Some(port)) = (address, port) {
            if let Some(other) = listeners
                .iter()
                .find(|q| q.address == address && q.port == port)
            {
                errors.push(doc.err(
                    format!("{field}.port"),
                    format!(
                        "{address} port {port} is already used by listener {:?}",
                        other.name
                    ),
                ));
            }
            let tls = l.tls.as_ref().map(|t| ObjectKey {
                namespace: doc.key.namespace.clone(),
                name: t.credential.clone(),
            });
            listeners.push(GatewayListener {
                name: l.name.clone(),
                address,
                port,
                hosts,
                tls,
            });
        }
    }
    (errors.len() == before).then(|| Gateway {
        name: doc.key.name.clone(),
        listeners,
    })
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod validation_tests;
