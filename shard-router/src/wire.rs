//! HTTP/2 on a client's connection, as little of it as the router needs: the framing of
//! the connection's first frames, to read its first stream's path and first request
//! ([`FirstStream`]), and of the frames the client sends after, to relay them as bytes
//! with two edits ([`ClientFrames`]).
//!
//! The router routes a *connection*, not each stream: it reads the first request of
//! the connection's first stream, picks the replica, replays every byte read so far to
//! it and from then on copies bytes both ways. HTTP/2's state (HPACK tables, flow
//! control windows, stream ids, settings) is the client's and the replica's alone;
//! the router holds no HTTP/2 connection of its own, so a relayed connection costs it
//! two sockets and the state of one copy loop.
//!
//! Two edits keep that exact:
//! - **SETTINGS.** A client may wait for the server's connection preface (a SETTINGS
//!   frame) before it opens a stream (gRPC-Go does), so the router sends one of its
//!   own, empty (every setting at its default, the most conservative), before it knows
//!   the replica. The replica's own SETTINGS then reach the client as a later SETTINGS
//!   frame, which HTTP/2 allows; the client acknowledges both, in order, and the router
//!   drops the first acknowledgement, its own, so that the replica sees exactly one
//!   acknowledgement for the one SETTINGS frame it sent.
//! - **The forwarded identity.** Under mutual TLS the router appends the client's
//!   certified SPIFFE id to each stream's request headers as one more header field
//!   ([`PEER_ID_HEADER`]), in a CONTINUATION frame after the client's own header block,
//!   encoded as a literal that is never indexed, so the HPACK tables of client and
//!   replica stay in step. A hub believes the field from a router only, and refuses a
//!   stream that carries it twice (a client that set it itself).

use bytes::Bytes;

use tributary_controlplane::identity::authz::PEER_ID_HEADER;

use crate::first::{Dialect, FirstMessage, FirstRequestError, NodeIdentity, node_of};
use crate::hpack;

/// The client's connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The router's connection preface: an empty SETTINGS frame (every setting at its
/// default).
pub const ROUTER_SETTINGS: [u8; 9] = [0, 0, 0, SETTINGS, 0, 0, 0, 0, 0];

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// `SETTINGS_MAX_FRAME_SIZE`'s default, which the router's empty SETTINGS leaves in
/// force: no client frame before the replica's settings may be larger.
const MAX_FRAME: usize = 16_384;

/// The first request's header block, at most: gRPC's requests take a few hundred
/// bytes.
const FIRST_BLOCK_MAX: usize = 16 << 10;
/// Header fields in the first request's header block, at most.
const FIRST_BLOCK_FIELDS: usize = 64;
/// The first request's fields, decoded, at most (names, values and 32 per field, as
/// SETTINGS_MAX_HEADER_LIST_SIZE counts them): a field may repeat an entry of the
/// dynamic table in one byte.
const FIRST_LIST_MAX: usize = 64 << 10;

/// Bytes the router reads at most besides the first request itself before the first
/// request is whole (headers, SETTINGS, WINDOW_UPDATE, PING, other streams' frames).
pub const HEAD_SLACK: usize = 64 << 10;

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn encode(&self) -> [u8; 9] {
        let len = (self.len as u32).to_be_bytes();
        let stream = self.stream.to_be_bytes();
        [
            len[1], len[2], len[3], self.kind, self.flags, stream[0], stream[1], stream[2],
            stream[3],
        ]
    }
}

/// What the first stream of a connection asks for, once the router has read enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// An ADS stream: the node its first request names, or why it names none.
    Ads {
        dialect: Dialect,
        node: Result<NodeIdentity, FirstRequestError>,
    },
    /// Any other method: the router serves it itself (the directory API) or refuses it.
    Other { path: String },
}

/// Why the router cannot read a connection's first stream at all; the connection is
/// closed (there is no HTTP/2 stream to answer on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeekError {
    #[error(
        "the connection does not start with HTTP/2's preface: the router speaks gRPC (HTTP/2 with prior knowledge, or h2 over TLS) only"
    )]
    NotHttp2,
    #[error("HTTP/2 protocol error in the client's first frames: {0}")]
    Protocol(String),
    #[error(
        "more than {0} bytes arrived before the first stream's first request was whole (--max-first-request-bytes plus 64 KiB)"
    )]
    TooMuch(usize),
}

/// Reads a connection's first frames (what the client sent so far, whole) until the
/// first stream's path, and for ADS its first request, are known.
#[derive(Debug)]
pub struct FirstStream {
    /// Bytes of the connection parsed into whole frames so far.
    parsed: usize,
    /// The first stream's id (0: no HEADERS yet).
    stream: u32,
    /// Its header block, until END_HEADERS.
    block: Vec<u8>,
    dialect: Option<Dialect>,
    message: FirstMessage,
    max_head: usize,
}

impl FirstStream {
    pub fn new(max_first_request_bytes: usize) -> Self {
        Self {
            parsed: 0,
            stream: 0,
            block: Vec::new(),
            dialect: None,
            message: FirstMessage::new(max_first_request_bytes),
            max_head: max_first_request_bytes + HEAD_SLACK,
        }
    }

    /// The client has begun its first stream (sent its HEADERS): there is a stream to
    /// answer on.
    pub fn has_stream(&self) -> bool {
        self.stream != 0
    }

    /// Parses what `head` (every byte the client sent so far) adds; `Ok(None)` until
    /// the client has sent enough.
    pub fn advance(&mut self, head: &[u8]) -> Result<Option<Peeked>, PeekError> {
        if self.parsed == 0 {
            let n = head.len().min(PREFACE.len());
            if head[..n] != PREFACE[..n] {
                return Err(PeekError::NotHttp2);
            }
            if n < PREFACE.len() {
                return Ok(None);
            }
            self.parsed = PREFACE.len();
        }
        loop {
            let rest = &head[self.parsed..];
            if rest.len() < 9 {
                break;
            }
            let h = FrameHeader::parse(rest);
            if h.len > MAX_FRAME {
                return Err(PeekError::Protocol(format!(
                    "a frame of {} bytes, more than SETTINGS_MAX_FRAME_SIZE ({MAX_FRAME})",
                    h.len
                )));
            }
            if rest.len() < 9 + h.len {
                break;
            }
            self.parsed += 9 + h.len;
            if let Some(peeked) = self.frame(h, &rest[9..9 + h.len])? {
                return Ok(Some(peeked));
            }
        }
        if head.len() > self.max_head {
            return Err(PeekError::TooMuch(self.max_head));
        }
        Ok(None)
    }

    fn frame(&mut self, h: FrameHeader, payload: &[u8]) -> Result<Option<Peeked>, PeekError> {
        let ended = |dialect| {
            Ok(Some(Peeked::Ads {
                dialect,
                node: Err(FirstRequestError::Ended),
            }))
        };
        match h.kind {
            GOAWAY => Err(PeekError::Protocol(
                "the client sent GOAWAY before its first request".into(),
            )),
            HEADERS if self.stream == 0 => {
                if h.stream == 0 {
                    return Err(PeekError::Protocol("HEADERS on stream 0".into()));
                }
                self.stream = h.stream;
                let fragment = unpadded(h, payload)?;
                let fragment = if h.flags & PRIORITY != 0 {
                    fragment.get(5..).ok_or_else(|| {
                        PeekError::Protocol("HEADERS shorter than its priority".into())
                    })?
                } else {
                    fragment
                };
                self.block.extend_from_slice(fragment);
                self.headers_done(h)
            }
            CONTINUATION if h.stream == self.stream && self.dialect.is_none() => {
                self.block.extend_from_slice(payload);
                self.headers_done(h)
            }
            DATA if h.stream == self.stream && self.stream != 0 => {
                let Some(dialect) = self.dialect else {
                    return Err(PeekError::Protocol(
                        "DATA before its stream's headers".into(),
                    ));
                };
                let data = unpadded(h, payload)?;
                match self.message.push(data) {
                    Err(e) => Ok(Some(Peeked::Ads {
                        dialect,
                        node: Err(e),
                    })),
                    Ok(Some(len)) => Ok(Some(Peeked::Ads {
                        dialect,
                        node: node_of(dialect, self.message.message(len)),
                    })),
                    Ok(None) if h.flags & END_STREAM != 0 => ended(dialect),
                    Ok(None) => Ok(None),
                }
            }
            // The client's trailers or a reset: the first stream ended unread.
            HEADERS | RST_STREAM if h.stream == self.stream && self.stream != 0 => {
                match self.dialect {
                    Some(dialect) => ended(dialect),
                    None => Err(PeekError::Protocol(
                        "the first stream ended inside its header block".into(),
                    )),
                }
            }
            // SETTINGS, WINDOW_UPDATE, PING, PRIORITY and other streams' frames: the
            // replica reads them when they are replayed.
            _ => Ok(None),
        }
    }

    /// After a HEADERS or CONTINUATION frame of the first stream: its path once the
    /// block is whole.
    fn headers_done(&mut self, h: FrameHeader) -> Result<Option<Peeked>, PeekError> {
        if self.block.len() > FIRST_BLOCK_MAX {
            return Err(PeekError::Protocol(format!(
                "the first request's headers take more than {FIRST_BLOCK_MAX} bytes"
            )));
        }
        if h.flags & END_HEADERS == 0 {
            return Ok(None);
        }
        // Only a block of whole fields, few of them, with no table larger than the
        // default goes to the decoder.
        let mut scan = BlockScan::new(4096);
        let bad =
            |what: String| PeekError::Protocol(format!("the first request's headers: {what}"));
        scan.feed(&self.block).map_err(|e| bad(e.to_string()))?;
        if !scan.whole() {
            return Err(bad(HeaderBlockError::MidField.to_string()));
        }
        if scan.fields() > FIRST_BLOCK_FIELDS {
            return Err(bad(format!("more than {FIRST_BLOCK_FIELDS} fields")));
        }
        // The connection's first header block: the decoder's dynamic table starts
        // empty, as the client's encoder's did.
        let block = std::mem::take(&mut self.block);
        let fields = hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE, FIRST_LIST_MAX)
            .decode(&block)
            .map_err(|e| bad(format!("HPACK: {e}")))?;
        let path = fields
            .into_iter()
            .find(|(name, _)| name == b":path")
            .map(|(_, value)| String::from_utf8_lossy(&value).into_owned())
            .ok_or_else(|| PeekError::Protocol("the first request has no :path".into()))?;
        let Some(dialect) = Dialect::from_path(&path) else {
            return Ok(Some(Peeked::Other { path }));
        };
        self.dialect = Some(dialect);
        // HEADERS with END_STREAM: a stream without a body.
        let headers_ended = h.kind == HEADERS && h.flags & END_STREAM != 0;
        Ok(headers_ended.then_some(Peeked::Ads {
            dialect,
            node: Err(FirstRequestError::Ended),
        }))
    }
}

/// A DATA or HEADERS payload without its padding.
fn unpadded(h: FrameHeader, payload: &[u8]) -> Result<&[u8], PeekError> {
    if h.flags & PADDED == 0 {
        return Ok(payload);
    }
    let pad = *payload
        .first()
        .ok_or_else(|| PeekError::Protocol("a padded frame without its pad length".into()))?
        as usize;
    payload
        .get(1..payload.len().saturating_sub(pad))
        .filter(|_| pad < payload.len())
        .ok_or_else(|| PeekError::Protocol("padding longer than its frame".into()))
}

/// The streams open on a relayed connection, followed from both directions' frames:
/// opened by the client's HEADERS, ended by the replica's END_STREAM or by either
/// side's RST_STREAM. With each, whether the replica has sent its response headers
/// (so that the router, ending the stream itself, sends trailers, not headers).
#[derive(Debug, Default)]
pub struct OpenStreams(Vec<(u32, bool)>);

impl OpenStreams {
    fn open(&mut self, stream: u32) {
        self.0.push((stream, false));
    }

    fn end(&mut self, stream: u32) {
        self.0.retain(|(s, _)| *s != stream);
    }

    fn responded(&mut self, stream: u32) {
        if let Some(s) = self.0.iter_mut().find(|(s, _)| *s == stream) {
            s.1 = true;
        }
    }
}

/// A frame header being read from a byte stream that may cut it anywhere.
#[derive(Debug, Default)]
struct HeaderBytes {
    bytes: [u8; 9],
    have: usize,
}

impl HeaderBytes {
    /// Takes what `input` holds of the header; the header once whole.
    fn take(&mut self, input: &mut &[u8]) -> Option<FrameHeader> {
        let n = (9 - self.have).min(input.len());
        self.bytes[self.have..self.have + n].copy_from_slice(&input[..n]);
        self.have += n;
        *input = &input[n..];
        if self.have < 9 {
            return None;
        }
        self.have = 0;
        Some(FrameHeader::parse(&self.bytes))
    }
}

/// The frames a client sends on a relayed connection, passed on with the router's two
/// edits (see the module's documentation): its acknowledgement of the router's own
/// SETTINGS dropped, and under mutual TLS the forwarded identity added to each
/// stream's headers. Fed the connection's bytes in order, from its first; once
/// neither edit is left to do, bytes pass as they come and are only followed
/// ([`OpenStreams`]).
#[derive(Debug)]
pub struct ClientFrames {
    preface_left: usize,
    /// The frame header being read (held back until whole while edits are left).
    header: HeaderBytes,
    /// Bytes of `header` are held back, not passed on yet.
    withheld: bool,
    /// Payload bytes of the current frame still to pass.
    left: usize,
    /// The router's SETTINGS are not acknowledged yet.
    drop_ack: bool,
    /// The forwarded identity's header field (HPACK), added to each new stream's
    /// request headers.
    identity: Option<Bytes>,
    /// The highest stream id whose request headers began.
    opened: u32,
    /// The stream whose header block continues in CONTINUATION frames.
    open_block: Option<u32>,
    /// After the current frame's payload, add the identity in a CONTINUATION frame
    /// on this stream.
    add_after: Option<u32>,
    /// The request header block the identity goes after, followed field by field: it
    /// must end on a whole field, or the client's last bytes would swallow the
    /// router's field (a block ending inside a literal makes the router's bytes its
    /// value, and the client's own forged field the only one the hub sees).
    scan: Option<BlockScan>,
    /// Where the current frame's payload is, while its fragment is scanned.
    fragment: Option<Fragment>,
}

impl ClientFrames {
    /// `forwarded`: the client's certified SPIFFE id, `None` on a plaintext listener.
    pub fn new(forwarded: Option<&str>) -> Self {
        Self {
            preface_left: PREFACE.len(),
            header: HeaderBytes::default(),
            withheld: false,
            left: 0,
            drop_ack: true,
            identity: forwarded.map(|id| literal_never_indexed(PEER_ID_HEADER, id)),
            opened: 0,
            open_block: None,
            add_after: None,
            scan: None,
            fragment: None,
        }
    }

    /// The highest stream id whose request headers the client began.
    pub fn opened(&self) -> u32 {
        self.opened
    }

    /// Edits are left to do: bytes must go through [`Self::feed`] with an output.
    pub fn edits(&self) -> bool {
        self.drop_ack || self.identity.is_some() || self.withheld
    }

    /// Follows `input`; with `out`, appends what of it goes on to the replica
    /// (without, while no edits are left, `input` goes on as it is). An error: the
    /// client's bytes cannot be relayed (the connection must close; what was passed
    /// on leaves the replica inside an unfinished header block, which it never acts
    /// on).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut out: Option<&mut Vec<u8>>,
        open: &mut OpenStreams,
    ) -> Result<(), HeaderBlockError> {
        fn put(out: &mut Option<&mut Vec<u8>>, bytes: &[u8]) {
            if let Some(out) = out {
                out.extend_from_slice(bytes);
            }
        }
        while !input.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(input.len());
                put(&mut out, &input[..n]);
                input = &input[n..];
                self.preface_left -= n;
                continue;
            }
            if self.left > 0 {
                let n = self.left.min(input.len());
                if let (Some(fragment), Some(scan)) = (&mut self.fragment, &mut self.scan) {
                    scan.feed(fragment.take(&input[..n])?)?;
                }
                put(&mut out, &input[..n]);
                input = &input[n..];
                self.left -= n;
                if self.left == 0 {
                    self.frame_passed(&mut out)?;
                }
                continue;
            }
            let Some(mut h) = self.header.take(&mut input) else {
                self.withheld = out.is_some();
                continue;
            };
            self.withheld = false;
            if h.kind == SETTINGS && h.flags & ACK != 0 && h.len == 0 && self.drop_ack {
                self.drop_ack = false;
                continue;
            }
            match h.kind {
                HEADERS if h.stream > self.opened => {
                    self.opened = h.stream;
                    open.open(h.stream);
                    if self.identity.is_some() {
                        self.scan = Some(BlockScan::new(u64::MAX));
                        self.block_of(&mut h)?;
                    }
                }
                CONTINUATION if self.identity.is_some() && self.open_block == Some(h.stream) => {
                    self.block_of(&mut h)?
                }
                RST_STREAM => open.end(h.stream),
                _ => {}
            }
            put(&mut out, &h.encode());
            self.left = h.len;
            if h.len == 0 {
                self.frame_passed(&mut out)?;
            }
        }
        Ok(())
    }

    /// A frame of a new stream's request header block: its fragment is scanned, and
    /// the identity goes after the block's last frame, which therefore no longer
    /// ends it.
    fn block_of(&mut self, h: &mut FrameHeader) -> Result<(), HeaderBlockError> {
        self.fragment = Some(Fragment::new(h)?);
        if h.flags & END_HEADERS != 0 {
            h.flags &= !END_HEADERS;
            self.open_block = None;
            self.add_after = Some(h.stream);
        } else {
            self.open_block = Some(h.stream);
        }
        Ok(())
    }

    fn frame_passed(&mut self, out: &mut Option<&mut Vec<u8>>) -> Result<(), HeaderBlockError> {
        self.fragment = None;
        let Some(stream) = self.add_after.take() else {
            return Ok(());
        };
        if !self.scan.take().is_some_and(|scan| scan.whole()) {
            return Err(HeaderBlockError::MidField);
        }
        if let (Some(field), Some(out)) = (&self.identity, out.as_deref_mut()) {
            let h = FrameHeader {
                len: field.len(),
                kind: CONTINUATION,
                flags: END_HEADERS,
                stream,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(field);
        }
        Ok(())
    }
}

/// Why the router cannot pass a client's header block on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderBlockError {
    #[error("a request header block ends inside a header field (HPACK)")]
    MidField,
    #[error("an HPACK integer with more than 4 continuation bytes")]
    IntegerTooLong,
    #[error("an HPACK dynamic table size update to {0} bytes, more than {1}")]
    TableSize(u64, u64),
    #[error("a HEADERS frame shorter than its padding and priority")]
    Padding,
}

/// Where a frame's payload is, for a HEADERS or CONTINUATION frame whose header
/// block fragment is scanned: HEADERS may carry a pad length and a priority before
/// it and padding after it.
#[derive(Debug)]
struct Fragment {
    pos: usize,
    len: usize,
    front: usize,
    padded: bool,
    pad: usize,
}

impl Fragment {
    fn new(h: &FrameHeader) -> Result<Self, HeaderBlockError> {
        let headers = h.kind == HEADERS;
        let padded = headers && h.flags & PADDED != 0;
        let priority = if headers && h.flags & PRIORITY != 0 {
            5
        } else {
            0
        };
        let front = usize::from(padded) + priority;
        if front > h.len {
            return Err(HeaderBlockError::Padding);
        }
        Ok(Self {
            pos: 0,
            len: h.len,
            front,
            padded,
            pad: 0,
        })
    }

    /// The bytes of `chunk`, the payload from `pos` on, inside the fragment.
    fn take<'a>(&mut self, chunk: &'a [u8]) -> Result<&'a [u8], HeaderBlockError> {
        let start = self.pos;
        if self.padded && start == 0 && !chunk.is_empty() {
            self.pad = usize::from(chunk[0]);
            if self.front + self.pad > self.len {
                return Err(HeaderBlockError::Padding);
            }
        }
        self.pos += chunk.len();
        let lo = self.front.clamp(start, self.pos);
        let hi = (self.len - self.pad).clamp(lo, self.pos);
        Ok(&chunk[lo - start..hi - start])
    }
}

/// Follows a header block representation by representation (RFC 7541 §6), reading
/// only the integers and string lengths (no table, no Huffman): whether the bytes so
/// far end on a whole field, and how many fields there are.
#[derive(Debug, Clone)]
pub struct BlockScan {
    state: Scan,
    fields: usize,
    max_table: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// At a representation's first byte.
    Field,
    /// In a prefix integer's continuation bytes.
    Int {
        value: u64,
        shift: u32,
        next: Next,
    },
    /// At a string's first byte (Huffman bit and length prefix); `strings`: this one
    /// and those after it in the field.
    StrHead {
        strings: u8,
    },
    Str {
        left: u64,
        strings: u8,
    },
}

/// What an integer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// An indexed field's index.
    Index,
    /// A literal's name index (0: a literal name follows).
    Literal,
    SizeUpdate,
    /// A string's length.
    Length {
        strings: u8,
    },
}

impl BlockScan {
    /// `max_table`: the largest dynamic table size update allowed.
    pub fn new(max_table: u64) -> Self {
        Self {
            state: Scan::Field,
            fields: 0,
            max_table,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HeaderBlockError> {
        for &b in bytes {
            self.state = match self.state {
                Scan::Field => {
                    let (prefix, next) = match b {
                        0x80.. => (7, Next::Index),
                        0x40.. => (6, Next::Literal),
                        0x20.. => (5, Next::SizeUpdate),
                        _ => (4, Next::Literal),
                    };
                    if next != Next::SizeUpdate {
                        self.fields += 1;
                    }
                    self.int_start(b, prefix, next)?
                }
                Scan::Int { value, shift, next } => {
                    if shift > 21 {
                        return Err(HeaderBlockError::IntegerTooLong);
                    }
                    let value = value + (u64::from(b & 0x7f) << shift);
                    if b & 0x80 != 0 {
                        Scan::Int {
                            value,
                            shift: shift + 7,
                            next,
                        }
                    } else {
                        self.int_done(value, next)?
                    }
                }
                Scan::StrHead { strings } => self.int_start(b, 7, Next::Length { strings })?,
                Scan::Str { left, strings } if left > 1 => Scan::Str {
                    left: left - 1,
                    strings,
                },
                Scan::Str { strings, .. } => Self::string_done(strings),
            };
        }
        Ok(())
    }

    /// The bytes so far end on a whole field.
    pub fn whole(&self) -> bool {
        self.state == Scan::Field
    }

    /// Header fields begun so far.
    pub fn fields(&self) -> usize {
        self.fields
    }

    fn int_start(&self, b: u8, prefix: u32, next: Next) -> Result<Scan, HeaderBlockError> {
        let max = (1u64 << prefix) - 1;
        let v = u64::from(b) & max;
        if v < max {
            self.int_done(v, next)
        } else {
            Ok(Scan::Int {
                value: max,
                shift: 0,
                next,
            })
        }
    }

    fn int_done(&self, value: u64, next: Next) -> Result<Scan, HeaderBlockError> {
        Ok(match next {
            Next::Index => Scan::Field,
            Next::Literal => Scan::StrHead {
                strings: if value == 0 { 2 } else { 1 },
            },
            Next::SizeUpdate if value > self.max_table => {
                return Err(HeaderBlockError::TableSize(value, self.max_table));
            }
            Next::SizeUpdate => Scan::Field,
            Next::Length { strings } if value == 0 => Self::string_done(strings),
            Next::Length { strings } => Scan::Str {
                left: value,
                strings,
            },
        })
    }

    fn string_done(strings: u8) -> Scan {
        if strings > 1 {
            Scan::StrHead {
                strings: strings - 1,
            }
        } else {
            Scan::Field
        }
    }
}

/// The frames a replica sends on a relayed connection: passed on as they are, and
/// followed, so that the router knows where a frame ends and which streams the
/// replica has answered or ended ([`OpenStreams`]).
#[derive(Debug, Default)]
pub struct ServerFrames {
    header: HeaderBytes,
    left: usize,
    /// Inside a header block (HEADERS without END_HEADERS, until its CONTINUATION
    /// with it): no other frame may come in between.
    in_block: bool,
    /// The last stream id of the replica's GOAWAY, once it sent one (streams above
    /// it are refused, and the client knows).
    goaway: Option<u32>,
    /// Reading the last stream id of a GOAWAY: its bytes so far.
    goaway_id: Option<([u8; 4], usize)>,
}

impl ServerFrames {
    pub fn feed(&mut self, mut input: &[u8], open: &mut OpenStreams) {
        while !input.is_empty() {
            if self.left > 0 {
                let n = self.left.min(input.len());
                if let Some((id, have)) = &mut self.goaway_id {
                    let k = (4 - *have).min(n);
                    id[*have..*have + k].copy_from_slice(&input[..k]);
                    *have += k;
                    if *have == 4 {
                        let last = u32::from_be_bytes(*id) & 0x7fff_ffff;
                        self.goaway = Some(self.goaway.map_or(last, |g| g.min(last)));
                        self.goaway_id = None;
                    }
                }
                input = &input[n..];
                self.left -= n;
                continue;
            }
            let Some(h) = self.header.take(&mut input) else {
                continue;
            };
            match h.kind {
                GOAWAY if h.len >= 8 => self.goaway_id = Some(([0; 4], 0)),
                HEADERS | CONTINUATION | PUSH_PROMISE => {
                    self.in_block = h.flags & END_HEADERS == 0;
                    if h.kind == HEADERS {
                        open.responded(h.stream);
                        if h.flags & END_STREAM != 0 {
                            open.end(h.stream);
                        }
                    }
                }
                DATA if h.flags & END_STREAM != 0 => open.end(h.stream),
                RST_STREAM => open.end(h.stream),
                _ => {}
            }
            self.left = h.len;
        }
    }

    /// Between two frames, outside a header block: the router may add frames of its
    /// own here.
    pub fn at_boundary(&self) -> bool {
        self.header.have == 0 && self.left == 0 && !self.in_block
    }

    /// What the router sends a client to end its relayed connection itself, where
    /// [`Self::at_boundary`]: for each open stream a gRPC status (trailers, or a
    /// trailers-only response where the replica has not answered yet), then GOAWAY.
    /// After a GOAWAY of the replica's, only the streams it still serves get a status,
    /// and the router's GOAWAY names no higher last stream id than the replica's
    /// (it must not grow): `highest` is the highest stream id the client opened. Every field is
    /// a literal never indexed (or, for `:status`, the static table), so the client's
    /// HPACK table, which the replica's encoder keeps in step, is not touched.
    pub fn ending(
        &self,
        open: &OpenStreams,
        highest: u32,
        code: tonic::Code,
        message: &str,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let status = (code as i32).to_string();
        // grpc-message is percent-encoded: keep printable ASCII other than '%'.
        let message: String = message
            .chars()
            .map(|c| {
                if (' '..='~').contains(&c) && c != '%' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        let served = |stream: u32| self.goaway.is_none_or(|last| stream <= last);
        for &(stream, responded) in open.0.iter().filter(|(s, _)| served(*s)) {
            let mut block = Vec::new();
            if !responded {
                block.push(0x88); // :status: 200
                block.extend_from_slice(&literal_never_indexed("content-type", "application/grpc"));
            }
            block.extend_from_slice(&literal_never_indexed("grpc-status", &status));
            block.extend_from_slice(&literal_never_indexed("grpc-message", &message));
            let h = FrameHeader {
                len: block.len(),
                kind: HEADERS,
                flags: END_HEADERS | END_STREAM,
                stream,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&block);
        }
        // The last stream id the client may count as seen: the highest it opened,
        // never more than a GOAWAY of the replica's said (it must not grow).
        let last = self.goaway.map_or(highest, |g| g.min(highest));
        {
            let mut goaway = last.to_be_bytes().to_vec();
            goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
            let h = FrameHeader {
                len: goaway.len(),
                kind: GOAWAY,
                flags: 0,
                stream: 0,
            };
            out.extend_from_slice(&h.encode());
            out.extend_from_slice(&goaway);
        }
        out
    }
}

/// One header field as an HPACK literal never indexed, with a literal name and no
/// Huffman coding (RFC 7541 §6.2.3): it leaves both ends' dynamic tables as they are.
pub fn literal_never_indexed(name: &str, value: &str) -> Bytes {
    let mut b = Vec::with_capacity(3 + name.len() + value.len() + 4);
    b.push(0x10);
    hpack::encode_int(&mut b, 0, 7, name.len());
    b.extend_from_slice(name.as_bytes());
    hpack::encode_int(&mut b, 0, 7, value.len());
    b.extend_from_slice(value.as_bytes());
    Bytes::from(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tributary_proto::envoy::envoy::config::core::v3::{Locality, Node};
    use tributary_proto::envoy::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use tributary_proto::envoy::google::protobuf::{Struct, Value, value::Kind};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .encode()
        .to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// A gRPC request's header block: `:method` and `:scheme` from the static table,
    /// `:path` Huffman-coded and added to the dynamic table (as h2 and gRPC's clients
    /// send it), the rest literals.
    fn request_headers(path: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        let coded = hpack::huffman_encode(path.as_bytes());
        b.push(0x44);
        hpack::encode_int(&mut b, 0x80, 7, coded.len());
        b.extend_from_slice(&coded);
        b.extend_from_slice(&literal_never_indexed(":authority", "router"));
        b.extend_from_slice(&literal_never_indexed("content-type", "application/grpc"));
        b
    }

    fn first_request(env: &str, zone: &str) -> Vec<u8> {
        let msg = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "n1".into(),
                locality: Some(Locality {
                    zone: zone.into(),
                    ..Default::default()
                }),
                metadata: Some(Struct {
                    fields: [(
                        "tributary.io/env".to_string(),
                        Value {
                            kind: Some(Kind::StringValue(env.into())),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        framed
    }

    /// A client's connection: preface, SETTINGS, the acknowledgement of the router's
    /// SETTINGS, a WINDOW_UPDATE, then the first stream's headers (split into HEADERS
    /// and CONTINUATION) and its first request over two padded DATA frames.
    fn client_connection() -> Vec<u8> {
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        c.extend(frame(SETTINGS, ACK, 0, &[]));
        c.extend(frame(0x8, 0, 0, &1000u32.to_be_bytes()));
        let block = request_headers(Dialect::DELTA_PATH);
        let (a, b) = block.split_at(5);
        c.extend(frame(HEADERS, 0, 1, a));
        c.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let body = first_request("prod", "az1");
        let (x, y) = body.split_at(7);
        let mut padded = vec![3u8];
        padded.extend_from_slice(x);
        padded.extend_from_slice(&[0, 0, 0]);
        c.extend(frame(DATA, PADDED, 1, &padded));
        c.extend(frame(DATA, 0, 1, y));
        c
    }

    #[test]
    fn the_first_request_is_read_whatever_the_reads_cut() {
        let conn = client_connection();
        let want = Peeked::Ads {
            dialect: Dialect::Delta,
            node: Ok(NodeIdentity {
                id: "n1".into(),
                environment: Some("prod".into()),
                zone: Some("az1".into()),
            }),
        };
        // Every prefix of the connection: nothing until the last byte, then the node.
        let mut first = FirstStream::new(1 << 20);
        for end in 1..conn.len() {
            assert_eq!(first.advance(&conn[..end]), Ok(None), "after {end} bytes");
        }
        assert_eq!(first.advance(&conn), Ok(Some(want)));
    }

    #[test]
    fn other_methods_and_broken_connections_are_told_apart() {
        let mut c = PREFACE.to_vec();
        c.extend(frame(SETTINGS, 0, 0, &[]));
        c.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request_headers("/tributary.directory.v1.Directory/Watch"),
        ));
        assert_eq!(
            FirstStream::new(1 << 20).advance(&c),
            Ok(Some(Peeked::Other {
                path: "/tributary.directory.v1.Directory/Watch".into()
            }))
        );
        assert_eq!(
            FirstStream::new(1 << 20).advance(b"GET / HTTP/1.1\r\n"),
            Err(PeekError::NotHttp2)
        );
        let mut big = PREFACE.to_vec();
        big.extend(frame(0x8, 0, 0, &vec![0; MAX_FRAME + 1]));
        assert!(matches!(
            FirstStream::new(1 << 20).advance(&big),
            Err(PeekError::Protocol(_))
        ));
        // A stream that ends before its first request.
        let mut ended = PREFACE.to_vec();
        ended.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &request_headers(Dialect::SOTW_PATH),
        ));
        assert_eq!(
            FirstStream::new(1 << 20).advance(&ended),
            Ok(Some(Peeked::Ads {
                dialect: Dialect::Sotw,
                node: Err(FirstRequestError::Ended)
            }))
        );
    }

    /// Feeds `input` in pieces of `cut` bytes.
    /// Passes on what the router's copy loop would: through `feed`'s output while
    /// edits are left, else the input as it is.
    fn feed_in_pieces(frames: &mut ClientFrames, input: &[u8], cut: usize) -> Vec<u8> {
        let (mut out, mut open) = (Vec::new(), OpenStreams::default());
        for piece in input.chunks(cut) {
            if frames.edits() {
                frames.feed(piece, Some(&mut out), &mut open).unwrap();
            } else {
                frames.feed(piece, None, &mut open).unwrap();
                out.extend_from_slice(piece);
            }
        }
        out
    }

    #[test]
    fn the_routers_settings_ack_is_dropped_and_nothing_else() {
        let conn = client_connection();
        let mut want = conn.clone();
        let ack = frame(SETTINGS, ACK, 0, &[]);
        let at = PREFACE.len() + 15;
        assert_eq!(want[at..at + 9], ack[..]);
        want.drain(at..at + 9);
        // A second acknowledgement (the replica's SETTINGS) passes.
        let mut conn2 = conn.clone();
        conn2.extend(&ack);
        want.extend(&ack);
        for cut in [1, 2, 8, 9, 10, 1000] {
            let mut frames = ClientFrames::new(None);
            assert_eq!(feed_in_pieces(&mut frames, &conn2, cut), want, "cut {cut}");
            assert!(!frames.edits());
        }
    }

    #[test]
    fn the_forwarded_identity_ends_each_new_streams_headers() {
        let id = "spiffe://tributary.local/env/prod/ns/shop/sa/".to_string() + &"x".repeat(150);
        let block = request_headers(Dialect::DELTA_PATH);
        let mut conn = PREFACE.to_vec();
        // Stream 1: one HEADERS frame; stream 3: HEADERS + CONTINUATION; then stream
        // 1's trailers, which get nothing.
        conn.extend(frame(HEADERS, END_HEADERS, 1, &block));
        conn.extend(frame(DATA, 0, 1, b"abc"));
        conn.extend(frame(HEADERS, 0, 3, &block[..4]));
        conn.extend(frame(CONTINUATION, END_HEADERS, 3, &block[4..]));
        conn.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block[..2]));
        for cut in [1, 7, 9, 64, 4096] {
            let mut frames = ClientFrames::new(Some(&id));
            let out = feed_in_pieces(&mut frames, &conn, cut);
            // Walk the frames out: each stream's header block decodes to its own
            // fields and the identity, last.
            let mut rest = &out[PREFACE.len()..];
            let mut blocks: Vec<(u32, Vec<u8>)> = Vec::new();
            let mut open = None;
            while !rest.is_empty() {
                let h = FrameHeader::parse(rest);
                let payload = &rest[9..9 + h.len];
                match h.kind {
                    HEADERS if open.is_none() => {
                        blocks.push((h.stream, payload.to_vec()));
                        open = (h.flags & END_HEADERS == 0).then_some(h.stream);
                    }
                    CONTINUATION => {
                        assert_eq!(open, Some(h.stream), "cut {cut}");
                        blocks.last_mut().unwrap().1.extend_from_slice(payload);
                        open = (h.flags & END_HEADERS == 0).then_some(h.stream);
                    }
                    _ => assert_eq!(open, None, "a frame inside a header block, cut {cut}"),
                }
                rest = &rest[9 + h.len..];
            }
            let streams: Vec<u32> = blocks.iter().map(|b| b.0).collect();
            assert_eq!(streams, vec![1, 3, 1], "cut {cut}");
            let mut decoder = hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE, usize::MAX);
            for (i, (_, block)) in blocks.iter().enumerate() {
                let fields = decoder.decode(block).unwrap();
                let forwarded: Vec<_> = fields
                    .iter()
                    .filter(|(n, _)| n == PEER_ID_HEADER.as_bytes())
                    .collect();
                if i == 2 {
                    assert!(forwarded.is_empty(), "trailers got the identity, cut {cut}");
                    continue;
                }
                assert_eq!(fields.last().unwrap().0, PEER_ID_HEADER.as_bytes());
                assert_eq!(forwarded.len(), 1, "cut {cut}");
                assert_eq!(forwarded[0].1, id.as_bytes(), "cut {cut}");
            }
        }
    }

    /// Streams are followed from both sides, in either mode, whatever the reads cut;
    /// the router's own ending of the connection decodes to a gRPC status per open
    /// stream (trailers-only where the replica has not answered) and GOAWAY.
    #[test]
    fn open_streams_are_followed_and_ended_with_a_status() {
        let block = request_headers(Dialect::DELTA_PATH);
        let mut client = PREFACE.to_vec();
        client.extend(frame(SETTINGS, ACK, 0, &[]));
        for stream in [1, 3, 5] {
            client.extend(frame(HEADERS, END_HEADERS, stream, &block));
            client.extend(frame(DATA, 0, stream, b"abcdef"));
        }
        client.extend(frame(RST_STREAM, 0, 5, &[0, 0, 0, 8]));
        let mut server = frame(SETTINGS, 0, 0, &[]);
        server.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        server.extend(frame(DATA, 0, 1, &[0; 40]));
        server.extend(frame(HEADERS, 0, 1, &[]));
        server.extend(frame(CONTINUATION, END_HEADERS, 1, &[]));
        for cut in [1, 5, 9, 13, 1000] {
            let mut open = OpenStreams::default();
            let mut frames = ClientFrames::new(None);
            let mut server_frames = ServerFrames::default();
            for piece in client.chunks(cut) {
                if frames.edits() {
                    frames
                        .feed(piece, Some(&mut Vec::new()), &mut open)
                        .unwrap();
                } else {
                    frames.feed(piece, None, &mut open).unwrap();
                }
            }
            for (i, piece) in server.chunks(cut).enumerate() {
                server_frames.feed(piece, &mut open);
                let passed = (i + 1) * cut;
                // Inside the HEADERS + CONTINUATION block (bytes 9+10+49 .. +18): no
                // boundary.
                if passed > 68 && passed < 86 {
                    assert!(!server_frames.at_boundary(), "cut {cut}, {passed} bytes");
                }
            }
            assert!(server_frames.at_boundary(), "cut {cut}");
            assert_eq!(open.0, vec![(1, true), (3, false)], "cut {cut}");
            assert_eq!(frames.opened(), 5);
        }
        let mut open = OpenStreams::default();
        open.open(1);
        open.responded(1);
        open.open(3);
        let out = ServerFrames::default().ending(
            &open,
            3,
            tonic::Code::Unavailable,
            "replica a left; 100% gone",
        );
        let mut rest = &out[..];
        let mut decoder = hpack::Decoder::new(hpack::DEFAULT_TABLE_SIZE, usize::MAX);
        let mut seen = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest);
            let payload = &rest[9..9 + h.len];
            if h.kind == HEADERS {
                assert_eq!(h.flags, END_HEADERS | END_STREAM);
                let fields: Vec<(String, String)> = decoder
                    .decode(payload)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect();
                seen.push((h.stream, fields));
            } else {
                assert_eq!(h.kind, GOAWAY);
                assert_eq!(&payload[..4], &3u32.to_be_bytes());
            }
            rest = &rest[9 + h.len..];
        }
        let trailers = |pseudo: bool| {
            let mut f = Vec::new();
            if pseudo {
                f.push((":status".to_string(), "200".to_string()));
                f.push(("content-type".into(), "application/grpc".into()));
            }
            f.push(("grpc-status".into(), "14".into()));
            f.push(("grpc-message".into(), "replica a left; 100? gone".into()));
            f
        };
        assert_eq!(seen, vec![(1, trailers(false)), (3, trailers(true))]);
    }

    /// A client's header block that ends inside a field would swallow the router's
    /// identity field: its last byte begins a literal whose name index needs one more
    /// byte, and the router's bytes would become that field's value and the next
    /// one's, leaving the client's own forged `x-tributary-peer-id` the only one the
    /// hub sees. The router refuses to pass such a block on: nothing is added, and
    /// the error closes the connection.
    #[test]
    fn a_header_block_ending_inside_a_field_is_refused_not_completed() {
        let id = format!(
            "spiffe://tributary.local/env/staging/ns/shop/sa/{}",
            "w".repeat(68)
        );
        let mut forged = request_headers(Dialect::DELTA_PATH);
        forged.extend_from_slice(&literal_never_indexed(
            PEER_ID_HEADER,
            "spiffe://tributary.local/env/prod/ns/shop/sa/web",
        ));
        forged.push(0x0f); // a literal without indexing, name index 15 + more bytes
        let mut conn = PREFACE.to_vec();
        conn.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request_headers(Dialect::DELTA_PATH),
        ));
        conn.extend(frame(HEADERS, END_HEADERS, 3, &forged));
        for cut in [1, 9, 4096] {
            let mut frames = ClientFrames::new(Some(&id));
            let (mut out, mut open) = (Vec::new(), OpenStreams::default());
            let mut failed = None;
            for piece in conn.chunks(cut) {
                if let Err(e) = frames.feed(piece, Some(&mut out), &mut open) {
                    failed = Some(e);
                    break;
                }
            }
            assert_eq!(failed, Some(HeaderBlockError::MidField), "cut {cut}");
            // Stream 1 got the identity; stream 3's block was passed on unfinished
            // (END_HEADERS cleared) and nothing was added to it.
            let injected = frame(
                CONTINUATION,
                END_HEADERS,
                3,
                &literal_never_indexed(PEER_ID_HEADER, &id),
            );
            assert!(
                !out.windows(injected.len()).any(|w| w == injected),
                "cut {cut}"
            );
            let ok = frame(
                CONTINUATION,
                END_HEADERS,
                1,
                &literal_never_indexed(PEER_ID_HEADER, &id),
            );
            assert!(out.windows(ok.len()).any(|w| w == ok), "cut {cut}");
        }
        // The same block with padding and a priority, cut mid-field, whatever the
        // reads cut: also refused, and nothing of the block ends it.
        let mut padded = vec![2u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(&forged);
        padded.extend_from_slice(&[0, 0]);
        let mut conn = PREFACE.to_vec();
        conn.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &padded));
        for cut in 1..=conn.len() {
            let mut frames = ClientFrames::new(Some(&id));
            let (mut out, mut open) = (Vec::new(), OpenStreams::default());
            let failed = conn
                .chunks(cut)
                .find_map(|piece| frames.feed(piece, Some(&mut out), &mut open).err());
            assert_eq!(failed, Some(HeaderBlockError::MidField), "cut {cut}");
            let h = FrameHeader::parse(&out[PREFACE.len()..]);
            assert_eq!(h.flags & END_HEADERS, 0, "cut {cut}");
            assert_eq!(out.len(), conn.len(), "cut {cut}: something was added");
        }
        // Other blocks ending inside a field: a literal with an indexed name needing
        // more bytes, a literal name's length, a string, a size update, and a block
        // whose last frame is a CONTINUATION.
        for tail in [
            &[0x7f][..],
            &[0x1f],
            &[0x10],
            &[0x10, 0x05, b'a', b'b'],
            &[0x3f],
        ] {
            let mut block = request_headers(Dialect::DELTA_PATH);
            block.extend_from_slice(tail);
            let (a, b) = block.split_at(3);
            let mut conn = PREFACE.to_vec();
            conn.extend(frame(HEADERS, 0, 1, a));
            conn.extend(frame(CONTINUATION, END_HEADERS, 1, b));
            let mut frames = ClientFrames::new(Some(&id));
            assert_eq!(
                frames.feed(&conn, Some(&mut Vec::new()), &mut OpenStreams::default()),
                Err(HeaderBlockError::MidField),
                "{tail:?}"
            );
        }
        // Without the stray byte, the padded block passes and gets the identity.
        let mut whole = vec![2u8];
        whole.extend_from_slice(&[0, 0, 0, 0, 16]);
        whole.extend_from_slice(&forged[..forged.len() - 1]);
        whole.extend_from_slice(&[0, 0]);
        let mut conn = PREFACE.to_vec();
        conn.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &whole));
        let mut out = Vec::new();
        ClientFrames::new(Some(&id))
            .feed(&conn, Some(&mut out), &mut OpenStreams::default())
            .unwrap();
        assert!(out.ends_with(&literal_never_indexed(PEER_ID_HEADER, &id)));
    }

    /// The first header block goes to the HPACK decoder only whole, small, and with
    /// no table larger than the default: a truncated size update (which made the
    /// decoder panic) and a table size or field count meant to make it allocate are
    /// refused as protocol errors.
    #[test]
    fn the_first_header_block_is_bounded_before_it_is_decoded() {
        let first = |block: &[u8]| {
            let mut c = PREFACE.to_vec();
            c.extend(frame(HEADERS, END_HEADERS, 1, block));
            FirstStream::new(1 << 20).advance(&c)
        };
        for (block, what) in [
            (vec![0x3f], "ends inside"),
            (vec![0x3f, 0xe1, 0x7f], "size update"),
            (vec![0x82; 65], "more than 64 fields"),
            (
                vec![0x3f, 0xff, 0xff, 0xff, 0xff, 0x7f],
                "more than 4 continuation bytes",
            ),
        ] {
            match first(&block) {
                Err(PeekError::Protocol(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{block:?}: {other:?}"),
            }
        }
        // Blocks the scan lets through and the decoder refuses: an index beyond an
        // empty dynamic table, a size update after a field, a Huffman-coded :path
        // padded with zeros, and one large entry repeated past FIRST_LIST_MAX.
        let mut bad_padding = vec![0x83, 0x44, 0x81];
        bad_padding.push(0x00);
        let mut repeated = vec![0x40, 1, b'x'];
        hpack::encode_int(&mut repeated, 0, 7, 4000);
        repeated.extend([b'a'; 4000]);
        repeated.extend([0xbe; 16]);
        for (block, what) in [
            (vec![0x83, 0xbe], "HPACK: index 62"),
            (
                vec![0x83, 0x20],
                "HPACK: a dynamic table size update after a header field",
            ),
            (bad_padding, "HPACK: a Huffman-coded string"),
            (repeated, "HPACK: header fields of more than 65536 bytes"),
        ] {
            match first(&block) {
                Err(PeekError::Protocol(m)) => assert!(m.contains(what), "{m}"),
                other => panic!("{block:?}: {other:?}"),
            }
        }
        // A block larger than FIRST_BLOCK_MAX, in frames each within the frame size.
        let big = literal_never_indexed("x", &"y".repeat(FIRST_BLOCK_MAX));
        let (a, b) = big.split_at(MAX_FRAME);
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, 0, 1, a));
        c.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        assert!(
            matches!(FirstStream::new(1 << 20).advance(&c), Err(PeekError::Protocol(m)) if m.contains("headers take more than")),
        );
    }

    /// After the replica's own GOAWAY, the router's ending gives a status only to the
    /// streams the replica still serves, and its GOAWAY names no higher last stream id
    /// than the replica's.
    #[test]
    fn the_ending_respects_the_replicas_goaway() {
        let mut open = OpenStreams::default();
        for s in [1, 3, 5] {
            open.open(s);
        }
        let mut server = ServerFrames::default();
        let mut goaway = 3u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&0u32.to_be_bytes());
        for piece in frame(GOAWAY, 0, 0, &goaway).chunks(2) {
            server.feed(piece, &mut open);
        }
        let out = server.ending(&open, 5, tonic::Code::Unavailable, "gone");
        let mut rest = &out[..];
        let (mut streams, mut goaways) = (Vec::new(), Vec::new());
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest);
            match h.kind {
                HEADERS => streams.push(h.stream),
                GOAWAY => goaways.push(u32::from_be_bytes(rest[9..13].try_into().unwrap())),
                k => panic!("frame type {k}"),
            }
            rest = &rest[9 + h.len..];
        }
        assert_eq!(streams, vec![1, 3]);
        // The last stream id is the replica's, not the higher one the client opened.
        assert_eq!(goaways, vec![3]);
    }
}
