//! The ADS server's HTTP side, without a per-stream encoder buffer.
//!
//! tonic's generated server encodes every response into a `BytesMut` owned by the
//! stream; that buffer keeps its largest allocation for the life of the stream, so
//! each stream would retain as much memory as its largest response. [`AdsService`]
//! replaces the generated server for the two ADS methods: requests are decoded by
//! tonic (`tonic::codec::Streaming`, with the same message-size limit and
//! `grpc-encoding` check), and responses are written by [`AdsBody`], which sends each
//! response as a sequence of `Bytes`: the 5-byte gRPC message header and the small
//! fields (encoded by prost), then every resource's pre-encoded bytes. A resource of
//! at least [`ZERO_COPY_MIN`] bytes is sent as-is (`Bytes::clone`, a reference count);
//! smaller pieces are gathered into short-lived chunks of about [`CHUNK`] bytes, so
//! that a response of many small resources is not sent as thousands of tiny HTTP/2
//! DATA frames. A chunk is built only when the previous one was taken (HTTP/2 flow
//! control), and dropped once written: a stream holds no buffer between responses,
//! and its memory does not depend on the size of its responses.
//!
//! Responses are never compressed: the response carries no `grpc-encoding`, which
//! is the correct answer to any `grpc-accept-encoding`; a compressed request is
//! refused with UNIMPLEMENTED and `grpc-accept-encoding: identity`, as tonic does.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{Status, Streaming};

use super::ads_server::AggregatedDiscoveryService;
use super::{DeltaDiscoveryResponseWire, DiscoveryResponseWire};

/// Resources of at least this many bytes are sent as their own `Bytes`, uncopied.
pub const ZERO_COPY_MIN: usize = 4096;
/// Smaller pieces are gathered into chunks of about this many bytes (HTTP/2's
/// default largest frame), so a chunk is one DATA frame.
pub const CHUNK: usize = 16 * 1024;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// A response whose `repeated bytes resources = 2` field is sent from its own
/// buffers: the fields before it (tag 1) and after it (tags 4 and up) are encoded
/// by prost, so the concatenation is exactly prost's encoding of the whole message.
pub trait ResourceResponse: Message + Default + Send + 'static {
    /// Moves the resources out.
    fn take_resources(&mut self) -> Vec<Bytes>;
    /// Moves field 1 (the version) out into an otherwise empty message.
    fn take_head(&mut self) -> Self;
}

impl ResourceResponse for DiscoveryResponseWire {
    fn take_resources(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.resources)
    }

    fn take_head(&mut self) -> Self {
        Self {
            version_info: std::mem::take(&mut self.version_info),
            ..Self::default()
        }
    }
}

impl ResourceResponse for DeltaDiscoveryResponseWire {
    fn take_resources(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.resources)
    }

    fn take_head(&mut self) -> Self {
        Self {
            system_version_info: std::mem::take(&mut self.system_version_info),
            ..Self::default()
        }
    }
}

/// One response on its way out: what is left of it, in wire order.
#[derive(Debug)]
struct Outgoing<M> {
    /// The 5-byte gRPC header is still to be sent, with this length.
    header: Option<u32>,
    head: Option<M>,
    resources: VecDeque<Bytes>,
    tail: Option<M>,
    /// A resource to send as-is once the chunk before it is taken.
    large: Option<Bytes>,
    /// Bytes of this response not yet handed out.
    remaining: usize,
}

impl<M: ResourceResponse> Outgoing<M> {
    fn new(mut message: M) -> Result<Self, Status> {
        let len = message.encoded_len();
        let header = u32::try_from(len).map_err(|_| {
            Status::resource_exhausted(format!(
                "Cannot return body with more than 4GB of data but got {len} bytes"
            ))
        })?;
        let resources = message.take_resources().into();
        let head = message.take_head();
        Ok(Self {
            header: Some(header),
            head: Some(head),
            resources,
            tail: Some(message),
            large: None,
            remaining: 5 + len,
        })
    }

    /// The next piece of the response, or `None` when all of it was handed out.
    fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(large) = self.large.take() {
            self.remaining -= large.len();
            return Some(large);
        }
        if self.remaining == 0 {
            return None;
        }
        let mut chunk = BytesMut::with_capacity(self.remaining.min(CHUNK + ZERO_COPY_MIN + 16));
        if let Some(len) = self.header.take() {
            chunk.put_u8(0); // not compressed
            chunk.put_u32(len);
        }
        if let Some(head) = self.head.take() {
            head.encode_raw(&mut chunk);
        }
        while chunk.len() < CHUNK {
            let Some(resource) = self.resources.pop_front() else {
                if let Some(tail) = self.tail.take() {
                    tail.encode_raw(&mut chunk);
                }
                break;
            };
            encode_key(2, WireType::LengthDelimited, &mut chunk);
            encode_varint(resource.len() as u64, &mut chunk);
            if resource.len() >= ZERO_COPY_MIN {
                self.large = Some(resource);
                break;
            }
            chunk.put_slice(&resource);
        }
        self.remaining -= chunk.len();
        Some(chunk.freeze())
    }
}

/// The HTTP body of an ADS stream: its responses, then the gRPC status in trailers
/// (`grpc-status: 0` when the response stream ends, the error's status otherwise).
pub struct AdsBody<S, M> {
    responses: Pin<Box<S>>,
    current: Option<Outgoing<M>>,
    done: bool,
}

impl<S, M> std::fmt::Debug for AdsBody<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdsBody")
            .field("sending", &self.current.as_ref().map(|c| c.remaining))
            .field("done", &self.done)
            .finish()
    }
}

impl<S, M> AdsBody<S, M>
where
    S: Stream<Item = Result<M, Status>>,
    M: ResourceResponse,
{
    pub fn new(responses: S) -> Self {
        Self {
            responses: Box::pin(responses),
            current: None,
            done: false,
        }
    }

    fn trailers(&mut self, status: &Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        let mut trailers = http::HeaderMap::with_capacity(2);
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| Frame::trailers(trailers)),
        ))
    }
}

impl<S, M> http_body::Body for AdsBody<S, M>
where
    S: Stream<Item = Result<M, Status>>,
    M: ResourceResponse + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(current) = &mut this.current {
                if let Some(chunk) = current.next_chunk() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                this.current = None;
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.responses.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(message))) => match Outgoing::new(message) {
                    Ok(outgoing) => this.current = Some(outgoing),
                    Err(status) => return this.trailers(&status),
                },
                Poll::Ready(Some(Err(status))) => return this.trailers(&status),
                Poll::Ready(None) => return this.trailers(&Status::ok("")),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.current.is_none()
    }
}

/// The ADS gRPC service over an [`AggregatedDiscoveryService`], serving both methods
/// with [`AdsBody`] responses. Mount it with `tonic::transport::Server::add_service`.
#[derive(Debug)]
pub struct AdsService<T> {
    inner: Arc<T>,
    max_decoding_message_size: Option<usize>,
}

impl<T> Clone for AdsService<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
        }
    }
}

impl<T> AdsService<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner: Arc::new(inner),
            max_decoding_message_size: None,
        }
    }

    /// The largest request accepted (tonic's default, 4 MiB, when not set).
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl<T> NamedService for AdsService<T> {
    const NAME: &'static str = SERVICE;
}

impl<T, B> Service<http::Request<B>> for AdsService<T>
where
    T: AggregatedDiscoveryService,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let max = self.max_decoding_message_size;
        match request.uri().path() {
            SOTW_PATH => Box::pin(async move {
                Ok(serve(request, max, |r| async move {
                    inner.stream_aggregated_resources(r).await
                })
                .await)
            }),
            DELTA_PATH => Box::pin(async move {
                Ok(serve(request, max, |r| async move {
                    inner.delta_aggregated_resources(r).await
                })
                .await)
            }),
            _ => Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
                );
                Ok(response)
            }),
        }
    }
}

/// Refuses a compressed request the way tonic does when no compression is enabled.
fn check_request_encoding(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(other)
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                MetadataValue::from_static("identity"),
            );
            Err(status)
        }
    }
}

async fn serve<B, Req, M, S, F, Fut>(
    request: http::Request<B>,
    max_decoding_message_size: Option<usize>,
    call: F,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: Message + Default + Send + 'static,
    M: ResourceResponse + Unpin,
    S: Stream<Item = Result<M, Status>> + Send + 'static,
    F: FnOnce(tonic::Request<Streaming<Req>>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<S>, Status>>,
{
    if let Err(status) = check_request_encoding(request.headers()) {
        return status.into_http();
    }
    let request = request.map(|body| {
        Streaming::new_request(
            tonic_prost::ProstDecoder::<Req>::default(),
            body,
            None,
            max_decoding_message_size,
        )
    });
    let response = match call(tonic::Request::from_http(request)).await {
        Ok(response) => response,
        Err(status) => return status.into_http(),
    };
    let (metadata, responses, extensions) = response.into_parts();
    let mut response = http::Response::new(tonic::body::Body::new(AdsBody::new(responses)));
    *response.version_mut() = http::Version::HTTP_2;
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(GRPC_CONTENT_TYPE),
    );
    *response.extensions_mut() = extensions;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use proptest::prelude::*;
    use tonic::codegen::tokio_stream;

    /// Polls `body` to its end (its stream never pends) and returns the data frames
    /// and the trailers.
    fn drain<S, M>(mut body: AdsBody<S, M>) -> (Vec<Bytes>, http::HeaderMap)
    where
        S: Stream<Item = Result<M, Status>>,
        M: ResourceResponse + Unpin,
    {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut frames = Vec::new();
        let mut trailers = None;
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        assert!(trailers.is_none(), "data after trailers");
                        frames.push(data);
                    }
                    Err(frame) => {
                        assert!(trailers.is_none(), "trailers twice");
                        trailers = Some(frame.into_trailers().unwrap());
                    }
                },
                Poll::Ready(Some(Err(status))) => panic!("body error {status:?}"),
                Poll::Ready(None) => break,
                Poll::Pending => panic!("a ready stream pended"),
            }
        }
        assert!(body.is_end_stream());
        (frames, trailers.expect("trailers"))
    }

    fn grpc_framed(message: &impl Message) -> Vec<u8> {
        let encoded = message.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out
    }

    fn resource(len: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    fn check<M: ResourceResponse + Clone + Unpin>(messages: Vec<M>) {
        let expected: Vec<u8> = messages.iter().flat_map(grpc_framed).collect();
        let large: Vec<Bytes> = messages
            .iter()
            .flat_map(|m| m.clone().take_resources())
            .filter(|r| r.len() >= ZERO_COPY_MIN)
            .collect();
        let stream = tokio_stream::iter(messages.into_iter().map(Ok));
        let (frames, trailers) = drain(AdsBody::new(stream));
        let sent: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(sent, expected, "frames concatenate to prost's encoding");
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert!(trailers.get("grpc-message").is_none());
        // Every large resource went out as its own buffer, not a copy.
        for r in &large {
            assert!(
                frames
                    .iter()
                    .any(|f| f.as_ptr() == r.as_ptr() && f.len() == r.len()),
                "a {}-byte resource was copied",
                r.len()
            );
        }
        // Copies are bounded whatever the response size.
        let mut copied = frames
            .iter()
            .filter(|f| !large.iter().any(|r| r.as_ptr() == f.as_ptr()));
        assert!(copied.all(|f| f.len() < CHUNK + ZERO_COPY_MIN + 16));
    }

    fn delta(
        resources: Vec<Bytes>,
        removed: Vec<String>,
        version: &str,
    ) -> DeltaDiscoveryResponseWire {
        DeltaDiscoveryResponseWire {
            system_version_info: version.into(),
            resources,
            type_url: crate::type_url::ENDPOINT.into(),
            nonce: "17".into(),
            removed_resources: removed,
            control_plane: Some(super::super::ControlPlaneWire {
                identifier: "tributary".into(),
            }),
        }
    }

    #[test]
    fn a_multi_mib_delta_response_is_prost_encoding_with_resources_uncopied() {
        let resources: Vec<Bytes> = (0..1200)
            .map(|i| resource(if i % 3 == 0 { 9000 } else { 300 + i % 500 }, i as u8))
            .collect();
        let total: usize = resources.iter().map(Bytes::len).sum();
        assert!(total > 2 << 20);
        check(vec![
            delta(resources, vec!["gone".into()], "v1"),
            delta(Vec::new(), Vec::new(), ""),
        ]);
    }

    #[test]
    fn sotw_responses_and_empty_fields() {
        check(vec![
            DiscoveryResponseWire {
                version_info: "3".into(),
                resources: vec![resource(0, 0), resource(5000, 1), resource(10, 2)],
                type_url: crate::type_url::CLUSTER.into(),
                nonce: "1".into(),
                control_plane: None,
            },
            DiscoveryResponseWire::default(),
        ]);
    }

    #[test]
    fn an_error_ends_the_body_with_its_status_in_trailers() {
        let stream = tokio_stream::iter(vec![
            Ok(delta(vec![resource(10, 1)], Vec::new(), "1")),
            Err(Status::resource_exhausted("too many streams, try later")),
            Ok(delta(Vec::new(), Vec::new(), "never sent")),
        ]);
        let (frames, trailers) = drain(AdsBody::new(stream));
        let sent: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(
            sent,
            grpc_framed(&delta(vec![resource(10, 1)], Vec::new(), "1"))
        );
        assert_eq!(trailers.get("grpc-status").unwrap(), "8");
        assert_eq!(
            trailers.get("grpc-message").unwrap(),
            "too%20many%20streams,%20try%20later"
        );
    }

    #[test]
    fn a_compressed_request_is_refused_and_identity_accepted() {
        let mut headers = http::HeaderMap::new();
        assert!(check_request_encoding(&headers).is_ok());
        headers.insert("grpc-encoding", "identity".parse().unwrap());
        assert!(check_request_encoding(&headers).is_ok());
        headers.insert("grpc-encoding", "gzip".parse().unwrap());
        let status = check_request_encoding(&headers).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(
            status.metadata().get("grpc-accept-encoding").unwrap(),
            "identity"
        );
    }

    #[test]
    fn prefix_lengths_match_prost() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384] {
            let m = DiscoveryResponseWire {
                resources: vec![resource(len, 7)],
                ..Default::default()
            };
            let prefix =
                prost::encoding::key_len(2) + prost::encoding::encoded_len_varint(len as u64);
            assert_eq!(m.encoded_len(), prefix + len);
        }
    }

    fn fuzz_config() -> ProptestConfig {
        ProptestConfig {
            cases: std::env::var("TRIBUTARY_FUZZ_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn sizes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(
            prop_oneof![
                4 => 0usize..200,
                2 => (ZERO_COPY_MIN - 8)..(ZERO_COPY_MIN + 8),
                1 => (ZERO_COPY_MIN + 8)..(3 * CHUNK),
            ],
            0..40,
        )
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        #[test]
        fn fuzz_ads_body(
            responses in prop::collection::vec(
                (sizes(), "[a-z0-9]{0,20}", prop::collection::vec("[a-z]{0,8}", 0..4), any::<bool>()),
                0..4,
            ),
        ) {
            let messages: Vec<DeltaDiscoveryResponseWire> = responses
                .iter()
                .map(|(sizes, version, removed, cp)| {
                    let mut d = delta(
                        sizes.iter().enumerate().map(|(i, n)| resource(*n, i as u8)).collect(),
                        removed.clone(),
                        version,
                    );
                    if !cp {
                        d.control_plane = None;
                    }
                    d
                })
                .collect();
            let sotw: Vec<DiscoveryResponseWire> = messages
                .iter()
                .map(|d| DiscoveryResponseWire {
                    version_info: d.system_version_info.clone(),
                    resources: d.resources.clone(),
                    type_url: d.type_url.clone(),
                    nonce: d.nonce.clone(),
                    control_plane: d.control_plane.clone(),
                })
                .collect();
            check(messages);
            check(sotw);
        }
    }
}
