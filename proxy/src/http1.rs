//! The HTTP/1.1 fast path: plaintext HTTP/1.1 keep-alive connections served without
//! hyper, for CPU per request (issue 13's goal: nginx's).
//!
//! One task per downstream connection reads requests with `httparse` into a buffer it
//! keeps, decides each request's route with the same code as hyper's path
//! ([`crate::http::route`], [`crate::http::admit`], [`crate::http::Retries`]), and
//! forwards it over a pooled plaintext HTTP/1.1 upstream connection
//! ([`crate::cluster::H1Conn`]) with a hand-written head; the response head is
//! rewritten the same way. Bodies (`Content-Length`, chunked, or an upstream response
//! delimited by its close, which goes downstream chunked) are streamed, never
//! buffered whole, except for a route that retries, which buffers the request body as
//! hyper's path does. The request body keeps going upstream while an early response
//! is relayed (full duplex: `Upload` is resumable). Transfer codings before the
//! final `chunked` are forwarded; request trailers are checked and those that must
//! not be trailers dropped. A head and the body bytes already read go out in one
//! write; no per-request allocation is made on the common path.
//!
//! What it does not serve goes to hyper's path, decided before a byte of the request
//! is consumed: the bytes read so far are handed over with the connection
//! ([`Rewind`]), and hyper serves the rest of the connection. That is: HTTP/2 prior
//! knowledge, HTTP/1.0, `CONNECT`, upgrades (`Upgrade`, `Connection: upgrade`), a
//! request target that is not origin-form, and a route that may pick a cluster that
//! is not plaintext HTTP/1.1 (HTTP/2 or TLS upstream). TLS connections never come
//! here ([`crate::listener`]).
//!
//! Malformed requests are answered 400 and the connection closed; a request head over
//! [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields, 431.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::http::{HeaderName, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;
use crate::cluster::{Admission, Cluster, Endpoint, H1Conn};
use crate::config::{Codec, Outcome, RequestHeaders, RetryPolicy, visible_ascii};
use crate::deadline::Deadline;
use crate::http::{Downstream, Local, Retries};

/// Largest request (or upstream response) head, bytes: Envoy's
/// `max_request_headers_kb` default (60 KiB). A larger request head is answered 431.
pub const MAX_HEAD: usize = 60 * 1024;
/// Most header fields in a head: Envoy's `max_headers_count` default. More: 431.
pub const MAX_HEADERS: usize = 100;
/// A request head must be complete this long after the connection began waiting for
/// it, so an idle keep-alive connection is closed after it too (hyper's
/// `header_read_timeout` default, which hyper's path applies the same way).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest trailer section, and largest chunk extension, of a chunked body.
const MAX_CHUNK_META: usize = 16 * 1024;
/// How long, and how many bytes, a connection closed with unread input is drained.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

const BAD_REQUEST: Local = crate::http::BAD_REQUEST;
const HEAD_TOO_LARGE: Local = Local::new(
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    "request header fields too large",
);
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// How a message's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// A response without length: until the upstream closes.
    UntilClose,
}

/// A parsed request head, borrowing the read buffer.
#[derive(Debug)]
pub struct RequestHead<'b> {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    pub method: &'b str,
    /// The request target (origin-form: path and query).
    pub target: &'b str,
    /// The path, without the query.
    pub path: &'b str,
    pub host: Option<&'b [u8]>,
    pub body: BodyKind,
    /// `Transfer-Encoding` names codings besides the final `chunked` (e.g. `gzip`):
    /// they are forwarded, and only `chunked` is re-framed.
    pub codings: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// A `Connection` header is present (it may name more hop-by-hop headers).
    pub connection: bool,
    pub headers: &'b [httparse::Header<'b>],
}

/// What [`parse_request`] makes of the bytes at the start of a buffer.
#[derive(Debug)]
pub enum Parsed<'b> {
    Complete(RequestHead<'b>),
    /// More bytes are needed.
    Partial,
    /// hyper's path serves this connection from here on.
    HandOver,
    /// Answered 400, and the connection closed.
    Bad(&'static str),
    /// Answered 431, and the connection closed.
    TooLarge,
}

/// Parses the request head at the start of `buf` and decides how its body is framed
/// (RFC 9112 §6), with `storage` for the header fields.
pub fn parse_request<'b>(buf: &'b [u8], storage: &'b mut [httparse::Header<'b>]) -> Parsed<'b> {
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return Parsed::Partial;
    }
    let mut req = httparse::Request::new(storage);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Parsed::TooLarge,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(_) if buf.starts_with(H2_PREFACE) => return Parsed::HandOver,
        Err(_) => return Parsed::Bad("malformed request head"),
    };
    if len > MAX_HEAD {
        return Parsed::TooLarge;
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad("malformed request line");
    };
    if version != 1 || method == "CONNECT" || !target.starts_with('/') {
        return Parsed::HandOver;
    }
    let headers: &'b [httparse::Header<'b>] = req.headers;
    let mut host = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    // Transfer codings in order (RFC 9112 §6.1): `chunked` must be the final one, once.
    let mut encoded = false;
    let mut chunked = false;
    let mut codings = false;
    let mut close = false;
    let mut expect_continue = false;
    let mut connection = false;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            // Several Host fields: which one routes is ambiguous (RFC 9112 §3.2).
            hosts += 1;
            if hosts > 1 {
                return Parsed::Bad("several host headers");
            }
            host = Some(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = parse_length(h.value) else {
                return Parsed::Bad("invalid content-length");
            };
            if length.is_some_and(|l| l != n) {
                return Parsed::Bad("conflicting content-length");
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = true;
            for coding in tokens(h.value) {
                if chunked {
                    // A coding after `chunked` (or `chunked` twice).
                    return Parsed::Bad("transfer-encoding whose final coding is not chunked");
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else {
                    codings = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection = true;
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::HandOver;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            return Parsed::HandOver;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = trim(h.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    let body = match (encoded, chunked, length) {
        (false, _, None) => BodyKind::None,
        (false, _, Some(n)) => BodyKind::Length(n),
        // With a length too it is a smuggling attempt (RFC 9112 §6.3).
        (true, true, None) => BodyKind::Chunked,
        (true, true, Some(_)) => return Parsed::Bad("transfer-encoding with content-length"),
        // A request's final coding must be chunked (RFC 9112 §6.3): its length is unknown.
        _ => return Parsed::Bad("transfer-encoding whose final coding is not chunked"),
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Parsed::Complete(RequestHead {
        len,
        method,
        target,
        path,
        host,
        body,
        codings,
        close,
        expect_continue,
        connection,
        headers,
    })
}

fn parse_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

/// The comma-separated tokens of a header value.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(trim).filter(|t| !t.is_empty())
}

/// Whether header `name` is hop-by-hop on either side (RFC 9110 §7.6.1; as
/// [`crate::http`]'s `strip_hop_by_hop`), or framing that this path writes itself.
fn hop_by_hop(name: &[u8], value: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te") && value != b"trailers",
        7 => name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        14 => name.eq_ignore_ascii_case(b"content-length"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// Appends one `transfer-encoding` line with the codings of every such field of
/// `headers` but `chunked`, then `chunked` (the framing this path writes); nothing,
/// and false, when they name only `chunked`. One line, since some servers refuse a
/// field given twice.
fn write_codings(out: &mut Vec<u8>, headers: &[httparse::Header<'_>]) -> bool {
    let codings = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|h| tokens(h.value))
        .filter(|t| !t.eq_ignore_ascii_case(b"chunked"));
    let mut first = true;
    for coding in codings {
        out.extend_from_slice(if first {
            b"transfer-encoding: ".as_slice()
        } else {
            b", ".as_slice()
        });
        out.extend_from_slice(coding);
        first = false;
    }
    if !first {
        out.extend_from_slice(b", chunked\r\n");
    }
    !first
}

/// Whether a `Connection` header among `headers` names `name` (hop-by-hop too).
fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| tokens(h.value).any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
}

const XFCC: &str = "x-forwarded-client-cert";

/// The request headers routes see: as hyper's path sees them after
/// `forward_client_cert_details` (without `x-forwarded-client-cert` unless kept).
struct Visible<'a, 'b> {
    headers: &'a [httparse::Header<'b>],
    keep_xfcc: bool,
}

impl RequestHeaders for Visible<'_, '_> {
    fn first_value(&self, name: &HeaderName) -> Option<&[u8]> {
        if !self.keep_xfcc && name.as_str() == XFCC {
            return None;
        }
        self.headers.first_value(name)
    }
}

/// Where a chunked body ends, and its data (RFC 9112 §7.1), fed any split of bytes.
#[derive(Debug, Clone, Default)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    /// Bytes of the current chunk extension or of the trailer section.
    meta: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    SizeMore,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    /// A trailer field's name (a token, RFC 9110 §5.1), up to its colon.
    TrailerName,
    /// Its value: visible characters, spaces and tabs (RFC 9110 §5.5).
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body that breaks the framing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunked encoding")]
pub struct ChunkError;

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Whether the chunks are over and the trailer section is being read.
    pub fn in_trailers(&self) -> bool {
        use ChunkState::*;
        matches!(
            self.state,
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf
        )
    }

    /// Consumes bytes of `input` up to the end of the body; returns how many, calling
    /// `data` with the chunk data among them. Trailer fields are checked as header
    /// fields are (a token, a colon, a value without control characters).
    pub fn feed(&mut self, input: &[u8], data: impl FnMut(&[u8])) -> Result<usize, ChunkError> {
        self.feed_to(input, data, false)
    }

    /// As [`Chunked::feed`], but stops where the trailer section begins (after the
    /// last chunk's size line), so that the caller can look at the trailers whole.
    pub fn feed_chunks(
        &mut self,
        input: &[u8],
        data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        self.feed_to(input, data, true)
    }

    fn feed_to(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
        stop_at_trailers: bool,
    ) -> Result<usize, ChunkError> {
        use ChunkState::*;
        let mut i = 0;
        while i < input.len() && self.state != Done {
            let b = input[i];
            match self.state {
                Data => {
                    let n = (input.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    data(&input[i..i + n]);
                    self.size -= n as u64;
                    i += n;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                Size | SizeMore => match (b as char).to_digit(16) {
                    Some(d) => {
                        if self.size > u64::MAX >> 4 {
                            return Err(ChunkError);
                        }
                        self.size = self.size << 4 | u64::from(d);
                        self.state = SizeMore;
                    }
                    None if self.state == SizeMore && matches!(b, b';' | b' ' | b'\t') => {
                        self.meta = 0;
                        self.state = Ext;
                    }
                    None if self.state == SizeMore && b == b'\r' => self.state = SizeLf,
                    None => return Err(ChunkError),
                },
                Ext => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(ChunkError),
                    _ => {
                        self.meta += 1;
                        if self.meta > MAX_CHUNK_META {
                            return Err(ChunkError);
                        }
                    }
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    if self.size == 0 {
                        self.meta = 0;
                        self.state = TrailerStart;
                        if stop_at_trailers {
                            return Ok(i + 1);
                        }
                    } else {
                        self.state = Data;
                    }
                }
                DataCr => {
                    self.state = if b == b'\r' {
                        DataLf
                    } else {
                        return Err(ChunkError);
                    }
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = Size;
                }
                TrailerStart | TrailerName | TrailerValue => {
                    self.state = match (self.state, b) {
                        (TrailerStart, b'\r') => EndLf,
                        (TrailerStart | TrailerName, b) if is_tchar(b) => TrailerName,
                        (TrailerName, b':') => TrailerValue,
                        (TrailerValue, b'\r') => TrailerLf,
                        (TrailerValue, b'\t' | b' '..=b'~' | 0x80..=0xff) => TrailerValue,
                        _ => return Err(ChunkError),
                    };
                    self.meta += 1;
                    if self.meta > MAX_CHUNK_META {
                        return Err(ChunkError);
                    }
                }
                TrailerLf | EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = if self.state == EndLf {
                        Done
                    } else {
                        TrailerStart
                    };
                }
                Done => unreachable!("the loop stops at Done"),
            }
            i += 1;
        }
        Ok(i)
    }
}

/// Whether `b` may be part of a field name (`tchar`, RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether a request trailer field may be forwarded: not framing, routing, hop-by-hop
/// or otherwise a field a recipient must not take from trailers (RFC 9110 §6.5.1;
/// the fields hyper's encoder refuses as trailers, and hop-by-hop ones).
fn allowed_trailer(name: &[u8]) -> bool {
    const FORBIDDEN: [&[u8]; 18] = [
        b"authorization",
        b"cache-control",
        b"connection",
        b"content-encoding",
        b"content-length",
        b"content-range",
        b"content-type",
        b"expect",
        b"host",
        b"keep-alive",
        b"max-forwards",
        b"proxy-authorization",
        b"proxy-connection",
        b"set-cookie",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    !FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(name))
}

/// The field lines of a complete trailer section (checked by [`Chunked`]), with the
/// CRLF that ends each.
fn trailer_lines(section: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = section;
    std::iter::from_fn(move || {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        if end == 0 {
            return None;
        }
        let (line, after) = rest.split_at(end + 2);
        rest = after;
        Some(line)
    })
}

fn trailer_name(line: &[u8]) -> &[u8] {
    line.split(|b| *b == b':').next().unwrap_or(line)
}

/// Whether every field of a complete trailer section may be forwarded.
fn trailers_allowed(section: &[u8]) -> bool {
    trailer_lines(section).all(|l| allowed_trailer(trailer_name(l)))
}

/// Appends the trailer section with the fields that may not be forwarded left out.
fn filter_trailers(section: &[u8], out: &mut Vec<u8>) {
    for line in trailer_lines(section).filter(|l| allowed_trailer(trailer_name(l))) {
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b"\r\n");
}

/// A stream that yields `prefix` (bytes already read from it) before its own: how a
/// connection is handed to hyper's path without losing what the fast path read.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Appends `date: <now>\r\n`, formatted once a second per thread (hyper's server adds
/// it the same way when the response has none).
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Appends a local reply (`text/plain`, as hyper's path sends it).
fn local_reply(out: &mut Vec<u8>, l: Local, head_request: bool, close: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n",
        l.status.as_str(),
        l.status.canonical_reason().unwrap_or(""),
        l.text.len()
    );
    if l.overloaded {
        out.extend_from_slice(b"x-envoy-overloaded: true\r\n");
    }
    date(out);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(l.text.as_bytes());
    }
}

/// What a connection does after a request.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    HandOver,
}

/// A request whose head is read and whose route is decided.
#[derive(Debug)]
struct Prepared {
    head_len: usize,
    body: BodyKind,
    /// Transfer codings besides `chunked` were written into the upstream head.
    codings: bool,
    close: bool,
    expect_continue: bool,
    head_request: bool,
    idempotent: bool,
    has_host: bool,
    route: Result<Forward, Local>,
}

#[derive(Debug)]
struct Forward {
    cluster: Arc<Cluster>,
    admission: Admission,
    timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
}

/// An upstream response head, rewritten into the connection's write buffer.
#[derive(Debug)]
struct ResponseHead {
    status: u16,
    body: BodyKind,
    /// A `transfer-encoding` line with codings other than `chunked` (and `chunked`
    /// last) is in the rewritten head.
    codings: bool,
    keep_alive: bool,
    has_date: bool,
}

/// An upstream answered (its head is in the write buffer).
#[derive(Debug)]
struct Got {
    conn: H1Conn,
    head: ResponseHead,
    /// The request body's progress upstream (`done`: the whole request went, so the
    /// connection may be reused).
    upload: Upload,
}

/// Why a request got no upstream answer.
#[derive(Debug)]
enum Failed {
    Upstream(Outcome),
    Reply(Local),
    /// The client went away (or broke its body's framing: `Reply` then).
    Client,
}

/// The request body as one try sends it.
#[derive(Debug, Clone, Copy)]
enum Sending<'a> {
    /// Streamed from the downstream connection (its framing kept).
    Stream,
    /// Buffered whole (a route that retries), sent with a length.
    Buffered(&'a [u8]),
}

enum PumpError {
    Client,
    BadBody,
    Upstream,
}

/// One downstream connection on the fast path.
struct Conn {
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    io: TcpStream,
    /// What was read from the client and not yet consumed.
    rbuf: BytesMut,
    /// The response (or a local reply) being written to the client.
    wbuf: Vec<u8>,
    /// The upstream request's head up to its per-try fields (host, framing).
    head: Vec<u8>,
    /// What goes upstream in one write: head and the body bytes at hand.
    up: Vec<u8>,
    /// A retried request's body.
    body: Vec<u8>,
    /// The current request's body is consumed (the connection can carry another).
    body_done: bool,
    stop: watch::Receiver<bool>,
}

/// Serves one plaintext downstream connection of an HTTP connection manager whose
/// codec allows HTTP/1.1; hands it to hyper's path when it must (see the module).
/// `stop` turns true when the listener drains: an idle connection closes, a busy one
/// after its response (`connection: close`).
pub async fn serve(
    shared: Arc<Shared>,
    downstream: Arc<Downstream>,
    codec: Codec,
    io: TcpStream,
    stop: watch::Receiver<bool>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let mut c = Conn {
        shared,
        downstream,
        io,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        wbuf: Vec::with_capacity(1024),
        head: Vec::with_capacity(1024),
        up: Vec::with_capacity(1024),
        body: Vec::new(),
        body_done: true,
        stop,
    };
    let next = c.run().await;
    if next == Next::Close && (!c.rbuf.is_empty() || !c.body_done) {
        c.linger().await;
    }
    if next == Next::HandOver {
        let Conn {
            shared,
            downstream,
            io,
            rbuf,
            ..
        } = c;
        let io = Rewind::new(rbuf.freeze(), io);
        crate::listener::serve_http(shared, downstream, io, None, codec, watcher).await;
    }
}

impl Conn {
    async fn run(&mut self) -> Next {
        // One timer each for the head and the route timeout, kept from one request to
        // the next (see `crate::deadline`: a timer per request woke the driver).
        let mut head_timer = Deadline::new();
        let mut route_timer = Deadline::new();
        loop {
            // From the moment a head is awaited, the client has HEAD_TIMEOUT to send
            // all of it: an idle keep-alive connection is closed after it too, as
            // hyper's `header_read_timeout` does on the other path (idle clients must
            // not keep a socket, a task and a buffer each for ever).
            let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
            let prepared = loop {
                if !self.rbuf.is_empty() {
                    match self.prepare() {
                        Ok(Some(p)) => break p,
                        Ok(None) => {}
                        Err(Next::HandOver) => return Next::HandOver,
                        Err(_) => {
                            self.flush().await;
                            return Next::Close;
                        }
                    }
                }
                self.rbuf.reserve(READ_CHUNK);
                // Between requests a drain closes the connection at once; a head
                // already begun is read to its end (or its deadline).
                let idle = self.rbuf.is_empty();
                let read = tokio::select! {
                    biased;
                    r = self.io.read_buf(&mut self.rbuf) => r,
                    () = head_timer.until(deadline, HEAD_TIMEOUT) => return Next::Close,
                    _ = self.stop.changed(), if idle => return Next::Close,
                };
                match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                }
            };
            match self.exchange(prepared, &mut route_timer).await {
                Next::KeepAlive => {}
                next => return next,
            }
        }
    }

    /// Parses the head at the start of the read buffer and decides its route: `None`
    /// when more bytes are needed, `Err` after answering a bad head (or to hand over).
    fn prepare(&mut self) -> Result<Option<Prepared>, Next> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let head = match parse_request(&self.rbuf, &mut storage) {
            Parsed::Complete(h) => h,
            Parsed::Partial => return Ok(None),
            Parsed::HandOver => return Err(Next::HandOver),
            Parsed::Bad(why) => {
                tracing::debug!(why, "malformed request");
                self.reject(BAD_REQUEST);
                return Err(Next::Close);
            }
            Parsed::TooLarge => {
                self.reject(HEAD_TOO_LARGE);
                return Err(Next::Close);
            }
        };
        let shared = &self.shared;
        let downstream = &self.downstream;
        let keep_xfcc = downstream.keeps_xfcc_without_cert();
        let snapshot = shared.snapshot.load();
        let host = head.host.and_then(visible_ascii).unwrap_or("");
        let visible = Visible {
            headers: head.headers,
            keep_xfcc,
        };
        let route =
            match crate::http::route(shared, downstream, &snapshot, host, head.path, &visible) {
                Err(l) => Err(l),
                Ok(action) => {
                    // A route that may pick a cluster this path cannot speak to goes to
                    // hyper's path whole (deciding per pick would skew a weighted split).
                    if action.clusters.names().any(|c| {
                        snapshot
                            .clusters
                            .get(c)
                            .is_some_and(|c| !c.speaks_plain_http1())
                    }) {
                        return Err(Next::HandOver);
                    }
                    crate::http::admit(shared, &snapshot, action).map(|(cluster, admission)| {
                        Forward {
                            cluster,
                            admission,
                            timeout: action.timeout,
                            retry: action.retry.clone().filter(|r| r.num_retries > 0),
                        }
                    })
                }
            };
        // The upstream head, up to what each try adds.
        let out = &mut self.head;
        out.clear();
        out.extend_from_slice(head.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(head.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let mut has_host = false;
        let mut codings_written = false;
        for h in head.headers {
            if head.codings && h.name.eq_ignore_ascii_case("transfer-encoding") {
                // The codings before `chunked` go on (`gzip, chunked`), only the final
                // `chunked` is this path's own framing.
                if !codings_written {
                    codings_written = write_codings(out, head.headers);
                }
                continue;
            }
            if hop_by_hop(h.name.as_bytes(), h.value)
                || (!keep_xfcc && h.name.eq_ignore_ascii_case(XFCC))
                || (head.connection && named_by_connection(head.headers, h.name))
            {
                continue;
            }
            has_host |= h.name.eq_ignore_ascii_case("host");
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
        Ok(Some(Prepared {
            head_len: head.len,
            body: head.body,
            codings: head.codings,
            close: head.close,
            expect_continue: head.expect_continue,
            head_request: head.method == "HEAD",
            idempotent: matches!(
                head.method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
            has_host,
            route,
        }))
    }

    /// Queues a reply to a request that could not be read; the connection closes.
    fn reject(&mut self, l: Local) {
        self.wbuf.clear();
        local_reply(&mut self.wbuf, l, false, true);
    }

    /// Closes after a reply while the client may still be sending: our side first
    /// (the client reads the reply, then its end), then what it sends is read and
    /// dropped for a while, so that the kernel does not reset the connection over
    /// unread bytes and lose the reply (nginx's `lingering_close`).
    async fn linger(&mut self) {
        let _ = self.io.shutdown().await;
        let drain = async {
            let mut total = 0usize;
            while total < LINGER_BYTES {
                self.rbuf.clear();
                self.rbuf.reserve(READ_CHUNK);
                match self.io.read_buf(&mut self.rbuf).await {
                    Ok(n) if n > 0 => total += n,
                    _ => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    fn draining(&self) -> bool {
        *self.stop.borrow()
    }

    async fn flush(&mut self) -> bool {
        let ok = self.io.write_all(&self.wbuf).await.is_ok();
        self.wbuf.clear();
        ok
    }

    async fn exchange(&mut self, p: Prepared, route_timer: &mut Deadline) -> Next {
        self.rbuf.advance(p.head_len);
        self.body_done = matches!(p.body, BodyKind::None | BodyKind::Length(0));
        let Prepared {
            body,
            codings,
            close,
            expect_continue,
            head_request,
            idempotent,
            has_host,
            route,
            ..
        } = p;
        let Forward {
            cluster,
            admission,
            timeout,
            retry,
        } = match route {
            Ok(f) => f,
            Err(l) => {
                let skipped = self.skip_body(body);
                let close = close || !skipped || self.draining();
                self.wbuf.clear();
                local_reply(&mut self.wbuf, l, head_request, close);
                return if self.flush().await && !close {
                    Next::KeepAlive
                } else {
                    Next::Close
                };
            }
        };
        let req = Req {
            idempotent,
            body,
            codings,
            expect_continue,
            head_request,
            has_host,
        };
        let result = {
            let tries = self.tries(&cluster, &req, retry);
            match timeout {
                Some(t) => tokio::select! {
                    biased;
                    r = tries => r,
                    () = route_timer.after(t) => Err(Failed::Reply(crate::http::ROUTE_TIMEOUT)),
                },
                None => tries.await,
            }
        };
        let next = match result {
            Ok((got, endpoint)) => self.respond(got, &cluster, &endpoint.endpoint, close).await,
            Err(Failed::Client) => Next::Close,
            Err(Failed::Upstream(o)) => self.fail(upstream_reply(o), &req, close).await,
            Err(Failed::Reply(l)) => self.fail(l, &req, close).await,
        };
        drop(admission);
        next
    }

    async fn fail(&mut self, l: Local, req: &Req, close: bool) -> Next {
        let close = close || !self.body_done || self.draining();
        self.wbuf.clear();
        local_reply(&mut self.wbuf, l, req.head_request, close);
        if self.flush().await && !close {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Drops a body that is wholly in the read buffer; false when it is not.
    fn skip_body(&mut self, body: BodyKind) -> bool {
        match body {
            BodyKind::None | BodyKind::UntilClose => true,
            BodyKind::Length(n) if self.rbuf.len() as u64 >= n => {
                self.rbuf.advance(n as usize);
                true
            }
            BodyKind::Length(_) => false,
            BodyKind::Chunked => {
                let mut c = Chunked::default();
                match c.feed(&self.rbuf, |_| {}) {
                    Ok(n) if c.is_done() => {
                        self.rbuf.advance(n);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// The tries of one request under its route's retry policy; the answer with the
    /// endpoint that gave it.
    async fn tries(
        &mut self,
        cluster: &Arc<Cluster>,
        req: &Req,
        retry: Option<RetryPolicy>,
    ) -> Result<(Got, crate::cluster::InFlight), Failed> {
        let Some(policy) = retry else {
            let endpoint = cluster
                .pick(None)
                .map_err(|u| Failed::Reply(crate::http::unavailable_reply(u)))?;
            cluster.stats.requests.inc();
            let r = self
                .try_once(cluster, &endpoint.endpoint, Sending::Stream, req)
                .await;
            settle(cluster, &endpoint.endpoint, &r);
            return r.map(|g| (g, endpoint));
        };
        // Retries: the body is buffered so that each try can send it. One declared
        // over the limit is refused before the client is told to send it.
        if matches!(req.body, BodyKind::Length(n) if n > crate::http::RETRY_BUFFER_LIMIT as u64) {
            return Err(Failed::Reply(crate::http::TOO_LARGE_TO_RETRY));
        }
        if req.expect_continue && !self.skip_check(req.body) {
            self.io
                .write_all(CONTINUE)
                .await
                .map_err(|_| Failed::Client)?;
        }
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        let read = self.read_body(req.body, &mut body).await;
        let result = match read {
            Err(f) => Err(f),
            Ok(()) => {
                self.body_done = true;
                self.retrying(cluster, req, policy, &body).await
            }
        };
        self.body = body;
        result
    }

    /// Whether the body is wholly in the read buffer (nothing to wait for).
    fn skip_check(&self, body: BodyKind) -> bool {
        match body {
            BodyKind::None | BodyKind::UntilClose => true,
            BodyKind::Length(n) => self.rbuf.len() as u64 >= n,
            BodyKind::Chunked => {
                let mut c = Chunked::default();
                c.feed(&self.rbuf, |_| {}).is_ok() && c.is_done()
            }
        }
    }

    async fn retrying(
        &mut self,
        cluster: &Arc<Cluster>,
        req: &Req,
        policy: RetryPolicy,
        body: &[u8],
    ) -> Result<(Got, crate::cluster::InFlight), Failed> {
        let mut retries = Retries::new(policy);
        loop {
            let endpoint = cluster
                .pick(retries.avoid)
                .map_err(|u| Failed::Reply(crate::http::unavailable_reply(u)))?;
            cluster.stats.requests.inc();
            let attempt = self.try_once(cluster, &endpoint.endpoint, Sending::Buffered(body), req);
            let r = match retries.policy.per_try_timeout {
                Some(t) => match tokio::time::timeout(t, attempt).await {
                    Ok(r) => r,
                    Err(_) => Err(Failed::Upstream(Outcome::Timeout)),
                },
                None => attempt.await,
            };
            let Some(outcome) = settle(cluster, &endpoint.endpoint, &r) else {
                return r.map(|g| (g, endpoint));
            };
            let Some(backoff) = retries.again(cluster, endpoint.endpoint.address, outcome) else {
                return r.map(|g| (g, endpoint));
            };
            // This try's answer is dropped with its connection.
            drop(r);
            drop(endpoint);
            tokio::time::sleep(backoff).await;
        }
    }

    /// Reads a whole request body into `out` (decoded), up to the retry buffer limit.
    async fn read_body(&mut self, kind: BodyKind, out: &mut Vec<u8>) -> Result<(), Failed> {
        let limit = crate::http::RETRY_BUFFER_LIMIT;
        match kind {
            BodyKind::None | BodyKind::UntilClose => Ok(()),
            BodyKind::Length(n) if n > limit as u64 => {
                Err(Failed::Reply(crate::http::TOO_LARGE_TO_RETRY))
            }
            BodyKind::Length(n) => {
                let mut left = n as usize;
                loop {
                    let k = left.min(self.rbuf.len());
                    out.extend_from_slice(&self.rbuf[..k]);
                    self.rbuf.advance(k);
                    left -= k;
                    if left == 0 {
                        return Ok(());
                    }
                    self.read_more().await?;
                }
            }
            BodyKind::Chunked => {
                let mut c = Chunked::default();
                loop {
                    let mut large = false;
                    let n = c
                        .feed(&self.rbuf, |d| {
                            large |= out.len() + d.len() > limit;
                            if !large {
                                out.extend_from_slice(d);
                            }
                        })
                        .map_err(|_| Failed::Reply(BAD_REQUEST))?;
                    self.rbuf.advance(n);
                    if large {
                        return Err(Failed::Reply(crate::http::TOO_LARGE_TO_RETRY));
                    }
                    if c.is_done() {
                        return Ok(());
                    }
                    self.read_more().await?;
                }
            }
        }
    }

    async fn read_more(&mut self) -> Result<(), Failed> {
        self.rbuf.reserve(READ_CHUNK);
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) | Err(_) => Err(Failed::Client),
            Ok(_) => Ok(()),
        }
    }

    /// One try: a connection to `endpoint` (pooled, else new), the request, the
    /// response head. A pooled connection that turns out closed before answering is
    /// replaced by another when the request can be sent again.
    async fn try_once(
        &mut self,
        cluster: &Cluster,
        endpoint: &Endpoint,
        send: Sending<'_>,
        req: &Req,
    ) -> Result<Got, Failed> {
        let mut continued = false;
        loop {
            let mut conn = match cluster.pooled_h1(endpoint) {
                Some(c) => c,
                None => cluster.connect_h1(endpoint).await.map_err(|e| {
                    tracing::debug!(endpoint = %endpoint.address, error = %e, "upstream connect error");
                    Failed::Upstream(Outcome::ConnectFailure)
                })?,
            };
            let reused = conn.reused;
            // The head, and the body bytes at hand, in one write.
            let up = &mut self.up;
            up.clear();
            up.extend_from_slice(&self.head);
            if !req.has_host {
                up.extend_from_slice(b"host: ");
                up.extend_from_slice(endpoint.authority.as_str().as_bytes());
                up.extend_from_slice(b"\r\n");
            }
            let mut chunked = Chunked::default();
            let mut left = 0u64;
            let (at_hand, complete) = match (send, req.body) {
                (_, BodyKind::None | BodyKind::UntilClose) => {
                    up.extend_from_slice(b"\r\n");
                    (0, true)
                }
                (Sending::Buffered(b), _) if req.codings => {
                    // Its codings are in the head: chunked again, in one chunk.
                    up.extend_from_slice(b"\r\n");
                    if !b.is_empty() {
                        let _ = write!(up, "{:x}\r\n", b.len());
                        up.extend_from_slice(b);
                        up.extend_from_slice(b"\r\n");
                    }
                    up.extend_from_slice(b"0\r\n\r\n");
                    (0, true)
                }
                (Sending::Buffered(b), _) => {
                    let _ = write!(up, "content-length: {}\r\n\r\n", b.len());
                    up.extend_from_slice(b);
                    (0, true)
                }
                (Sending::Stream, BodyKind::Length(n)) => {
                    let _ = write!(up, "content-length: {n}\r\n\r\n");
                    let k = (self.rbuf.len() as u64).min(n) as usize;
                    up.extend_from_slice(&self.rbuf[..k]);
                    left = n - k as u64;
                    (k, left == 0)
                }
                (Sending::Stream, BodyKind::Chunked) => {
                    if !req.codings {
                        up.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    }
                    up.extend_from_slice(b"\r\n");
                    let mut k = chunked
                        .feed_chunks(&self.rbuf, |_| {})
                        .map_err(|_| Failed::Reply(BAD_REQUEST))?;
                    up.extend_from_slice(&self.rbuf[..k]);
                    if chunked.in_trailers() {
                        // The trailer section goes in the same write if it is all here
                        // (else the pump below takes it from its start).
                        let mut t = chunked.clone();
                        let n = t
                            .feed(&self.rbuf[k..], |_| {})
                            .map_err(|_| Failed::Reply(BAD_REQUEST))?;
                        if t.is_done() {
                            let section = &self.rbuf[k..k + n];
                            if trailers_allowed(section) {
                                up.extend_from_slice(section);
                            } else {
                                filter_trailers(section, up);
                            }
                            chunked = t;
                            k += n;
                        }
                    }
                    (k, chunked.is_done())
                }
            };
            if !complete && req.expect_continue && !continued {
                continued = true;
                self.io
                    .write_all(CONTINUE)
                    .await
                    .map_err(|_| Failed::Client)?;
            }
            if let Err(e) = conn.stream.write_all(&self.up).await {
                // Nothing was consumed yet: a stale pooled connection is replaced.
                if reused {
                    continue;
                }
                tracing::debug!(error = %e, "upstream write failed");
                return Err(Failed::Upstream(Outcome::Reset));
            }
            let mut upload = Upload {
                kind: req.body,
                left,
                chunked,
                ready: 0,
                held: 0,
                trailers: None,
                done: complete,
                stopped: false,
            };
            if complete {
                let H1Conn { stream, buf, .. } = &mut conn;
                self.wbuf.clear();
                match read_head(stream, buf, &mut self.wbuf, req.head_request).await {
                    Ok(head) => {
                        self.rbuf.advance(at_hand);
                        self.body_done = true;
                        return Ok(Got { conn, head, upload });
                    }
                    // A pooled connection the upstream closed as the request went out:
                    // sent again on another, if sending it twice is harmless.
                    Err(nothing) if nothing && reused && req.idempotent => continue,
                    Err(_) => {
                        if matches!(send, Sending::Stream) {
                            self.rbuf.advance(at_hand);
                            self.body_done = true;
                        }
                        return Err(Failed::Upstream(Outcome::Reset));
                    }
                }
            }
            // The rest of the body streams while the response head is awaited (an
            // upstream may answer before it has read the whole body), and on while
            // the response is relayed ([`Conn::respond`]): the pump is resumable.
            self.rbuf.advance(at_hand);
            let head = {
                let (io, rbuf, wbuf, scratch) =
                    (&mut self.io, &mut self.rbuf, &mut self.wbuf, &mut self.up);
                wbuf.clear();
                let (mut down, _) = io.split();
                let H1Conn { stream, buf, .. } = &mut conn;
                let (mut ur, mut uw) = stream.split();
                let pump = upload.pump(&mut down, rbuf, &mut uw, scratch);
                let head = read_head(&mut ur, buf, wbuf, req.head_request);
                tokio::pin!(pump, head);
                let mut pumped = false;
                loop {
                    tokio::select! {
                        biased;
                        h = &mut head => break h,
                        p = &mut pump, if !pumped => match p {
                            Err(PumpError::Client) => return Err(Failed::Client),
                            Err(PumpError::BadBody) => return Err(Failed::Reply(BAD_REQUEST)),
                            Ok(()) | Err(PumpError::Upstream) => pumped = true,
                        },
                    }
                }
            };
            self.body_done = upload.done;
            return match head {
                Ok(head) => Ok(Got { conn, head, upload }),
                Err(_) => Err(Failed::Upstream(Outcome::Reset)),
            };
        }
    }

    /// Sends an upstream answer downstream: the rewritten head, then the body as it
    /// comes, while the rest of the request body (if any) still goes upstream (full
    /// duplex: an upstream may answer before it has read the body, as a streaming
    /// echo does); the connection goes back to the pool if the exchange ended cleanly.
    /// A request body not all sent when the response ends is not sent further: the
    /// upstream connection is dropped, and the client's closes after the response
    /// (it said `connection: close`) with what it still sends drained for a while
    /// (RFC 9112 §9.6).
    async fn respond(
        &mut self,
        got: Got,
        cluster: &Cluster,
        endpoint: &Endpoint,
        close: bool,
    ) -> Next {
        let Got {
            mut conn,
            head,
            mut upload,
        } = got;
        let close = close || !self.body_done || self.draining();
        let out = &mut self.wbuf;
        match head.body {
            BodyKind::None => {}
            BodyKind::Length(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            BodyKind::Chunked | BodyKind::UntilClose if !head.codings => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            BodyKind::Chunked | BodyKind::UntilClose => {}
        }
        if !head.has_date {
            date(out);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let ended = {
            let (io, rbuf, wbuf, scratch) =
                (&mut self.io, &mut self.rbuf, &mut self.wbuf, &mut self.up);
            let (mut down_r, mut down_w) = io.split();
            let H1Conn { stream, buf, .. } = &mut conn;
            let (mut up_r, mut up_w) = stream.split();
            let relay = relay(&mut down_w, wbuf, &mut up_r, buf, head.body);
            if upload.done || upload.stopped {
                relay.await
            } else {
                let pump = upload.pump(&mut down_r, rbuf, &mut up_w, scratch);
                tokio::pin!(relay, pump);
                let mut pumped = false;
                loop {
                    tokio::select! {
                        ended = &mut relay => break ended,
                        p = &mut pump, if !pumped => match p {
                            // The client broke off its request: so does the exchange.
                            Err(PumpError::Client | PumpError::BadBody) => break false,
                            // The upstream takes no more: its answer still comes.
                            Ok(()) | Err(PumpError::Upstream) => pumped = true,
                        },
                    }
                }
            }
        };
        self.wbuf.clear();
        self.body_done = upload.done;
        if ended
            && upload.done
            && head.keep_alive
            && head.body != BodyKind::UntilClose
            && conn.buf.is_empty()
        {
            cluster.release_h1(endpoint, conn);
        }
        if ended && !close {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }
}

/// The request fields each try needs.
#[derive(Debug)]
struct Req {
    /// The method may be sent twice (RFC 9110 §9.2.2).
    idempotent: bool,
    body: BodyKind,
    /// The head carries transfer codings besides `chunked` (the body must be chunked).
    codings: bool,
    expect_continue: bool,
    head_request: bool,
    has_host: bool,
}

/// The reply for a try that got no answer.
fn upstream_reply(o: Outcome) -> Local {
    match o {
        Outcome::ConnectFailure => crate::http::CONNECT_ERROR,
        Outcome::Timeout => crate::http::PER_TRY_TIMEOUT,
        Outcome::Reset | Outcome::Status(_) => crate::http::RESET,
    }
}

/// Records how a try ended (outlier detection, stats); its outcome, unless the
/// client ended it.
fn settle(cluster: &Cluster, endpoint: &Endpoint, r: &Result<Got, Failed>) -> Option<Outcome> {
    let outcome = match r {
        Ok(g) => Outcome::Status(g.head.status),
        Err(Failed::Upstream(o)) => *o,
        Err(Failed::Reply(_) | Failed::Client) => return None,
    };
    crate::http::finished(cluster, endpoint, outcome);
    Some(outcome)
}

/// Where a streamed request body stands on its way upstream. Its [`Upload::pump`]
/// is resumable: each await in it (a read from the client, one write upstream) is
/// cancel-safe and the state is updated right after it, so a pump dropped when the
/// response head arrives is taken up again while the response is relayed.
#[derive(Debug)]
struct Upload {
    kind: BodyKind,
    /// `Length`: bytes not yet decided (read and counted) from the client.
    left: u64,
    chunked: Chunked,
    /// Bytes at the start of the read buffer decided and due upstream.
    ready: usize,
    /// Chunked: bytes of the trailer section held at the start of the read buffer
    /// until it is complete (it is forwarded whole, its forbidden fields left out).
    held: usize,
    /// A filtered trailer section in the scratch buffer: bytes of it already sent.
    trailers: Option<usize>,
    /// The whole body went upstream.
    done: bool,
    /// The upstream took no more of it (a write failed).
    stopped: bool,
}

impl Upload {
    /// Streams the rest of the request body from the client (`down`, whose bytes
    /// already read are in `rbuf`) to the upstream; `scratch` holds a trailer section
    /// that had fields left out.
    async fn pump<R, W>(
        &mut self,
        down: &mut R,
        rbuf: &mut BytesMut,
        up: &mut W,
        scratch: &mut Vec<u8>,
    ) -> Result<(), PumpError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if let Some(sent) = self.trailers {
                if sent == scratch.len() {
                    self.trailers = None;
                    self.done = true;
                    return Ok(());
                }
                let n = self.write(up, &scratch[sent..]).await?;
                self.trailers = Some(sent + n);
                continue;
            }
            if self.ready > 0 {
                let n = self.write(up, &rbuf[..self.ready]).await?;
                rbuf.advance(n);
                self.ready -= n;
                continue;
            }
            match self.kind {
                BodyKind::Chunked if self.chunked.is_done() => {
                    self.done = true;
                    return Ok(());
                }
                BodyKind::Chunked if self.chunked.in_trailers() => {
                    if self.held == rbuf.len() {
                        read(down, rbuf).await?;
                    }
                    let n = self
                        .chunked
                        .feed(&rbuf[self.held..], |_| {})
                        .map_err(|_| PumpError::BadBody)?;
                    self.held += n;
                    if self.chunked.is_done() {
                        let section = &rbuf[..self.held];
                        if trailers_allowed(section) {
                            self.ready = self.held;
                        } else {
                            scratch.clear();
                            filter_trailers(section, scratch);
                            rbuf.advance(self.held);
                            self.trailers = Some(0);
                        }
                        self.held = 0;
                    }
                }
                BodyKind::Chunked => {
                    if rbuf.is_empty() {
                        read(down, rbuf).await?;
                    }
                    self.ready = self
                        .chunked
                        .feed_chunks(rbuf, |_| {})
                        .map_err(|_| PumpError::BadBody)?;
                }
                _ if self.left == 0 => {
                    self.done = true;
                    return Ok(());
                }
                _ => {
                    if rbuf.is_empty() {
                        read(down, rbuf).await?;
                    }
                    let k = (rbuf.len() as u64).min(self.left);
                    self.left -= k;
                    self.ready = k as usize;
                }
            }
        }
    }

    /// One write upstream (cancel-safe); how many bytes it took.
    async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        up: &mut W,
        bytes: &[u8],
    ) -> Result<usize, PumpError> {
        match up.write(bytes).await {
            Ok(n) if n > 0 => Ok(n),
            _ => {
                self.stopped = true;
                Err(PumpError::Upstream)
            }
        }
    }
}

/// Reads more of the client's bytes (cancel-safe).
async fn read<R: AsyncRead + Unpin>(down: &mut R, rbuf: &mut BytesMut) -> Result<(), PumpError> {
    rbuf.reserve(READ_CHUNK);
    match down.read_buf(rbuf).await {
        Ok(0) | Err(_) => Err(PumpError::Client),
        Ok(_) => Ok(()),
    }
}

/// Relays an upstream response downstream: `wbuf` holds its rewritten head, `buf`
/// what was read of the upstream after it; then the body, as `body` frames it (an
/// answer delimited by the upstream's close goes out chunked). Whether it ended.
async fn relay<W, R>(
    down: &mut W,
    wbuf: &mut Vec<u8>,
    up: &mut R,
    buf: &mut BytesMut,
    body: BodyKind,
) -> bool
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match body {
        BodyKind::None => down.write_all(wbuf).await.is_ok(),
        BodyKind::Length(n) => {
            let k = (buf.len() as u64).min(n) as usize;
            wbuf.extend_from_slice(&buf[..k]);
            buf.advance(k);
            let mut left = n - k as u64;
            let mut ok = down.write_all(wbuf).await.is_ok();
            while ok && left > 0 {
                ok = read_more(up, buf).await;
                if ok {
                    let k = (buf.len() as u64).min(left) as usize;
                    ok = down.write_all(&buf[..k]).await.is_ok();
                    buf.advance(k);
                    left -= k as u64;
                }
            }
            ok
        }
        BodyKind::Chunked => {
            let mut c = Chunked::default();
            let mut first = true;
            loop {
                let Ok(k) = c.feed(buf, |_| {}) else {
                    break false;
                };
                let w = if first {
                    first = false;
                    wbuf.extend_from_slice(&buf[..k]);
                    down.write_all(wbuf).await
                } else {
                    down.write_all(&buf[..k]).await
                };
                buf.advance(k);
                if w.is_err() {
                    break false;
                }
                if c.is_done() {
                    break true;
                }
                if !read_more(up, buf).await {
                    break false;
                }
            }
        }
        BodyKind::UntilClose => {
            // Re-framed as chunks: the client keeps its connection.
            loop {
                if !buf.is_empty() {
                    let _ = write!(wbuf, "{:x}\r\n", buf.len());
                    wbuf.extend_from_slice(buf);
                    wbuf.extend_from_slice(b"\r\n");
                    buf.clear();
                }
                if !wbuf.is_empty() {
                    let ok = down.write_all(wbuf).await.is_ok();
                    wbuf.clear();
                    if !ok {
                        break false;
                    }
                }
                buf.reserve(READ_CHUNK);
                match up.read_buf(buf).await {
                    Ok(0) => break down.write_all(b"0\r\n\r\n").await.is_ok(),
                    Ok(_) => {}
                    Err(_) => break false,
                }
            }
        }
    }
}

/// Reads more of an upstream connection into its buffer; false at its end.
async fn read_more<R: AsyncRead + Unpin>(up: &mut R, buf: &mut BytesMut) -> bool {
    buf.reserve(READ_CHUNK);
    matches!(up.read_buf(buf).await, Ok(n) if n > 0)
}

/// Reads an upstream response head (skipping interim 1xx answers) and writes its
/// rewrite into `out`: the status line and the end-to-end headers, without framing
/// (the caller adds it). `Err(true)` when the upstream closed before sending a byte.
async fn read_head<R: AsyncRead + Unpin>(
    up: &mut R,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    head_request: bool,
) -> Result<ResponseHead, bool> {
    let mut received = !buf.is_empty();
    loop {
        if !buf.is_empty() {
            let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut storage);
            match res.parse(&buf[..]) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = res.code.unwrap_or(0);
                    if (100..200).contains(&status) && status != 101 {
                        buf.advance(n);
                        continue;
                    }
                    let head = rewrite_response(&res, head_request, out);
                    buf.advance(n);
                    return head.ok_or(false);
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
                _ => return Err(false),
            }
        }
        buf.reserve(READ_CHUNK);
        match up.read_buf(buf).await {
            Ok(n) if n > 0 => received = true,
            _ => return Err(!received),
        }
    }
}

/// The downstream head for an upstream response: `None` if it cannot be relayed.
fn rewrite_response(
    res: &httparse::Response<'_, '_>,
    head_request: bool,
    out: &mut Vec<u8>,
) -> Option<ResponseHead> {
    let status = res.code?;
    if status == 101 || !(200..1000).contains(&status) {
        return None;
    }
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", res.reason.unwrap_or(""));
    let mut length: Option<u64> = None;
    let mut encoded = None;
    let mut keep_alive = res.version == Some(1);
    let mut has_date = false;
    let mut connection = false;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(h.value)?;
            if length.is_some_and(|l| l != n) {
                return None;
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = Some(
                tokens(h.value)
                    .last()
                    .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")),
            );
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection = true;
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && res.version == Some(0) {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
    }
    let bodiless = head_request || status == 204 || status == 304;
    let mut codings = false;
    let body = if bodiless {
        BodyKind::None
    } else {
        match (encoded, length) {
            (Some(true), _) => BodyKind::Chunked,
            (Some(false), _) => BodyKind::UntilClose,
            (None, Some(n)) => BodyKind::Length(n),
            (None, None) => BodyKind::UntilClose,
        }
    };
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        // A bodiless answer keeps its content-length (HEAD, 304): it describes the
        // resource, not this message.
        let framing_kept = bodiless && name.eq_ignore_ascii_case(b"content-length");
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Codings other than `chunked` go on, with `chunked` as the framing.
            if !bodiless && !codings {
                codings = write_codings(out, &*res.headers);
            }
            continue;
        }
        if (hop_by_hop(name, h.value) && !framing_kept)
            || (connection && named_by_connection(&*res.headers, h.name))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    Some(ResponseHead {
        status,
        body,
        codings,
        keep_alive,
        has_date,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8]) -> String {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match parse_request(buf, &mut storage) {
            Parsed::Complete(h) => {
                format!("{} {} {:?} close={}", h.method, h.path, h.body, h.close)
            }
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            parse(b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n"),
            "GET /a None close=false"
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"),
            "POST / Length(5) close=true"
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"),
            "POST / Chunked close=false"
        );
        assert!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n")
                .starts_with("Bad")
        );
        assert!(parse(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n").starts_with("Bad"));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            "POST / Chunked close=false"
        );
        assert_eq!(
            parse(
                b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
            ),
            "POST / Chunked close=false"
        );
        for bad in [
            &b"POST / HTTP/1.1\r\ntransfer-encoding: chunked, gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: \r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\nhost: a\r\n\r\n",
        ] {
            assert!(
                parse(bad).starts_with("Bad"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            parse(b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n")
                .starts_with("Bad")
        );
        assert!(parse(b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n").starts_with("Bad"));
        assert_eq!(parse(b"GET / HTTP/1.0\r\n\r\n"), "HandOver");
        assert_eq!(parse(b"GET http://x/ HTTP/1.1\r\n\r\n"), "HandOver");
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"),
            "HandOver"
        );
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "HandOver");
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), "Partial");
        assert!(parse(b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n").starts_with("Bad"));
    }

    #[test]
    fn forbidden_trailers_are_left_out() {
        let section = b"x-a: 1\r\nContent-Length: 3\r\nHOST: h\r\nx-b: 2\r\n\r\n";
        assert!(!trailers_allowed(section));
        let mut out = Vec::new();
        filter_trailers(section, &mut out);
        assert_eq!(out, b"x-a: 1\r\nx-b: 2\r\n\r\n");
        assert!(trailers_allowed(b"\r\n"));
        assert!(trailers_allowed(b"x-a: 1\r\n\r\n"));
        let mut c = Chunked::default();
        assert_eq!(c.feed_chunks(b"1\r\na\r\n0\r\nx: 1\r\n\r\n", |_| {}), Ok(9));
        assert!(c.in_trailers());
    }

    #[test]
    fn chunked_decoder_finds_the_end_across_any_split() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for split in 0..=body.len() - 4 {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let a = c
                .feed(&body[..split], |d| data.extend_from_slice(d))
                .unwrap();
            assert_eq!(a, split);
            let b = c
                .feed(&body[split..], |d| data.extend_from_slice(d))
                .unwrap();
            assert!(c.is_done());
            assert_eq!(a + b, body.len() - 4);
            assert_eq!(data, b"hello world");
        }
        assert!(Chunked::default().feed(b"zz\r\n", |_| {}).is_err());
        for bad in [
            &b"0\r\nx y: 1\r\n\r\n"[..],
            b"0\r\n: v\r\n\r\n",
            b"0\r\nname\r\n\r\n",
            b"0\r\nx: a\x00b\r\n\r\n",
            b"0\r\nx: a\r\n b\r\n\r\n",
        ] {
            assert!(
                Chunked::default().feed(bad, |_| {}).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(Chunked::default().feed(b"3\r\nabcX", |_| {}).is_err());
        assert!(
            Chunked::default()
                .feed(b"fffffffffffffffff\r\n", |_| {})
                .is_err()
        );
    }
}
