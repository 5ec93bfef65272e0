//! HPACK (RFC 7541): decoding the header fields of a block, with the dynamic table
//! the connection's earlier blocks built; and the integers of the literals the router
//! adds itself ([`crate::wire::literal_never_indexed`]).
//!
//! The router decodes one header block per connection, its first request's, for the
//! `:path` ([`crate::wire::FirstStream`]); later blocks pass through unread
//! ([`crate::wire::BlockScan`] follows only where their fields end). It is written
//! here, small, rather than taken from a crate: the one crate that decodes HPACK on
//! its own (`hpack` 0.3) is unmaintained, misnames static entry 15, and built a hash
//! map for every Huffman string it decoded (a fifth of the router's CPU while 2,000
//! clients connected); h2's decoder is not public.

use std::collections::VecDeque;

/// The dynamic table's size until a SETTINGS_HEADER_TABLE_SIZE says otherwise
/// (RFC 9113 §6.5.2). The router never sends one, so its clients' encoders keep it.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// Why a header block cannot be decoded (an HTTP/2 COMPRESSION_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("the block ends inside a header field")]
    Truncated,
    #[error("an integer with more than 4 continuation bytes")]
    IntegerTooLong,
    #[error("index {index}: the static table has 61 entries and the dynamic table {dynamic}")]
    Index { index: u64, dynamic: usize },
    #[error("a dynamic table size update to {0} bytes, more than the {1} allowed")]
    TableSize(u64, usize),
    #[error("a dynamic table size update after a header field")]
    LateSizeUpdate,
    #[error("header fields of more than {0} bytes (names, values and 32 per field)")]
    ListTooLarge(usize),
    #[error("a Huffman-coded string with {0}")]
    Huffman(&'static str),
}

/// A string's Huffman code, padded with ones (tests build header blocks with it).
#[cfg(test)]
pub(crate) fn huffman_encode(src: &[u8]) -> Vec<u8> {
    huffman::encode(src)
}

/// Appends an integer with an `n`-bit prefix (RFC 7541 §5.1), `first` holding the
/// bits above the prefix.
pub fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header field: name and value, as octets.
pub type Field = (Vec<u8>, Vec<u8>);

/// One connection's decoding context: its dynamic table.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<Field>,
    /// The entries' size (RFC 7541 §4.1).
    size: usize,
    /// The table's size now, as the encoder last set it.
    max: usize,
    /// The most the encoder may set it to: this end's SETTINGS_HEADER_TABLE_SIZE.
    allowed: usize,
    /// The most a block's fields may take, sized as entries are.
    max_list: usize,
}

impl Decoder {
    /// A connection's decoder: `table_size` is this end's SETTINGS_HEADER_TABLE_SIZE
    /// (fixed: the router never changes its settings); a block whose fields take more
    /// than `max_list` bytes (the names, the values and 32 per field, as
    /// SETTINGS_MAX_HEADER_LIST_SIZE counts) is refused before more is allocated.
    pub fn new(table_size: usize, max_list: usize) -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max: table_size,
            allowed: table_size,
            max_list,
        }
    }

    /// The fields of one header block, in order; the dynamic table is left as the
    /// block leaves it, for the connection's next block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut r = Reader {
            rest: block,
            max_list: self.max_list,
        };
        let mut fields = Vec::new();
        let mut list = 0usize;
        while let Some(&first) = r.rest.first() {
            // What the field may still take, its 32 aside.
            let budget = self.max_list.saturating_sub(list + 32);
            let field = match first {
                // Indexed (§6.1).
                0x80.. => {
                    let (name, value) = self.entry(r.int(7)?)?;
                    if name.len() + value.len() > budget {
                        return Err(HpackError::ListTooLarge(self.max_list));
                    }
                    (name.to_vec(), value.to_vec())
                }
                // Literal with incremental indexing (§6.2.1).
                0x40.. => {
                    let field = self.literal(&mut r, 6, budget)?;
                    self.insert(field.clone());
                    field
                }
                // Dynamic table size update (§6.3), only before the block's fields
                // (§4.2).
                0x20.. => {
                    if !fields.is_empty() {
                        return Err(HpackError::LateSizeUpdate);
                    }
                    let size = r.int(5)?;
                    self.max = usize::try_from(size)
                        .ok()
                        .filter(|s| *s <= self.allowed)
                        .ok_or(HpackError::TableSize(size, self.allowed))?;
                    self.evict(0);
                    continue;
                }
                // Literal without indexing (§6.2.2) or never indexed (§6.2.3).
                _ => self.literal(&mut r, 4, budget)?,
            };
            list += field.0.len() + field.1.len() + 32;
            if list > self.max_list {
                return Err(HpackError::ListTooLarge(self.max_list));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    /// A literal field whose name index has a `prefix`-bit prefix (0: the name is a
    /// string too), its name and value within `budget` bytes together.
    fn literal(&self, r: &mut Reader<'_>, prefix: u32, budget: usize) -> Result<Field, HpackError> {
        let name = match r.int(prefix)? {
            0 => r.string(budget)?,
            index => self.entry(index)?.0.to_vec(),
        };
        let value = r.string(budget.saturating_sub(name.len()))?;
        Ok((name, value))
    }

    /// Entry `index` of the static table (1–61) then the dynamic one (§2.3.3).
    fn entry(&self, index: u64) -> Result<(&[u8], &[u8]), HpackError> {
        let bad = || HpackError::Index {
            index,
            dynamic: self.table.len(),
        };
        let i = usize::try_from(index).map_err(|_| bad())?;
        match i {
            0 => Err(bad()),
            1..=61 => {
                let (name, value) = STATIC_TABLE[i - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .table
                .get(i - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or_else(bad),
        }
    }

    /// Adds an entry, evicting the oldest to make room; one larger than the whole
    /// table empties it and is not added (§4.4).
    fn insert(&mut self, field: Field) {
        let size = field.0.len() + field.1.len() + 32;
        self.evict(size);
        if size <= self.max {
            self.size += size;
            self.table.push_front(field);
        }
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.table.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + 32;
        }
    }
}

/// The static table (RFC 7541 Appendix A); entry 1 first.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A block's bytes not read yet.
struct Reader<'a> {
    rest: &'a [u8],
    /// The decoder's limit, for its error.
    max_list: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, HpackError> {
        let (&b, rest) = self.rest.split_first().ok_or(HpackError::Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    /// An integer with an `n`-bit prefix (§5.1), at most 4 continuation bytes (2^28
    /// and more: nothing in a header block is that large).
    fn int(&mut self, n: u32) -> Result<u64, HpackError> {
        let max = (1u64 << n) - 1;
        let mut value = u64::from(self.byte()?) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0;
        loop {
            if shift > 21 {
                return Err(HpackError::IntegerTooLong);
            }
            let b = self.byte()?;
            value += u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    /// A string literal (§5.2), Huffman-decoded if it is coded; refused as soon as
    /// it is known to decode to more than `max` bytes (a plain one before it is
    /// copied, a coded one at its `max + 1`st octet).
    fn string(&mut self, max: usize) -> Result<Vec<u8>, HpackError> {
        let coded = self.rest.first().is_some_and(|b| b & 0x80 != 0);
        let len = self.int(7)?;
        let too_large = HpackError::ListTooLarge(self.max_list);
        if !coded && len > max as u64 {
            return Err(too_large);
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.rest.len())
            .ok_or(HpackError::Truncated)?;
        let (bytes, rest) = self.rest.split_at(len);
        self.rest = rest;
        if !coded {
            return Ok(bytes.to_vec());
        }
        let mut out = Vec::with_capacity(len.min(max));
        if !huffman::decode(bytes, &mut out, max)? {
            return Err(too_large);
        }
        Ok(out)
    }
}

/// The Huffman code of string literals (RFC 7541 §5.2, Appendix B).
mod huffman {
    use super::HpackError;

    /// The code's length in bits for each octet, then for EOS (256). The code is
    /// canonical: codes of one length are consecutive in symbol order, each length's
    /// first code following the shorter lengths' last; so the lengths are the whole
    /// code, and decoding needs only how many codes each length has.
    const LENGTHS: [u8; 257] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
        28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
        6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
        5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
        13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
        7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
        15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
        6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
        20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
        24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
        22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
        21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
        26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
        19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
        20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
        26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
        30,
    ];

    const EOS: u16 = 256;
    const LONGEST: usize = 30;

    /// How many codes each length has, and the symbols in code order.
    struct Canonical {
        count: [u16; LONGEST + 1],
        symbols: [u16; 257],
    }

    static CANONICAL: Canonical = canonical();

    const fn canonical() -> Canonical {
        let mut count = [0u16; LONGEST + 1];
        let mut s = 0;
        while s < 257 {
            count[LENGTHS[s] as usize] += 1;
            s += 1;
        }
        // Where each length's symbols start.
        let mut at = [0u16; LONGEST + 1];
        let mut len = 1;
        while len <= LONGEST {
            at[len] = at[len - 1] + count[len - 1];
            len += 1;
        }
        let mut symbols = [0u16; 257];
        let mut s = 0;
        while s < 257 {
            let len = LENGTHS[s] as usize;
            symbols[at[len] as usize] = s as u16;
            at[len] += 1;
            s += 1;
        }
        Canonical { count, symbols }
    }

    /// Appends the octets `src` codes to `out`, at most `max` of them (`Ok(false)`:
    /// there were more). Refused: EOS inside the string, and padding other than up to
    /// 7 bits of EOS's prefix (all ones; §5.2).
    pub(super) fn decode(src: &[u8], out: &mut Vec<u8>, max: usize) -> Result<bool, HpackError> {
        // The code read so far, the first code of its length, and where that
        // length's symbols start (the canonical decoding of RFC 1951's `puff`).
        let (mut code, mut first, mut at, mut len) = (0u32, 0u32, 0usize, 0usize);
        let mut ones = true;
        for &byte in src {
            for shift in (0..8).rev() {
                let bit = u32::from(byte >> shift & 1);
                code |= bit;
                ones &= bit == 1;
                len += 1;
                let count = u32::from(CANONICAL.count[len]);
                let offset = code.wrapping_sub(first);
                if offset < count {
                    let symbol = CANONICAL.symbols[at + offset as usize];
                    if symbol == EOS {
                        return Err(HpackError::Huffman("EOS inside it"));
                    }
                    if out.len() == max {
                        return Ok(false);
                    }
                    out.push(symbol as u8);
                    (code, first, at, len) = (0, 0, 0, 0);
                    ones = true;
                    continue;
                }
                if len == LONGEST {
                    return Err(HpackError::Huffman("a code longer than 30 bits"));
                }
                at += count as usize;
                first = (first + count) << 1;
                code <<= 1;
            }
        }
        if len > 7 {
            return Err(HpackError::Huffman("more than 7 bits of padding"));
        }
        if !ones {
            return Err(HpackError::Huffman("padding that is not EOS's prefix"));
        }
        Ok(true)
    }

    /// The canonical code of each symbol, derived from LENGTHS as RFC 7541
    /// Appendix B lists it.
    #[cfg(test)]
    pub(super) fn codes() -> Vec<(u32, u8)> {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (LENGTHS[s], s));
        let mut codes = vec![(0u32, 0u8); 257];
        let (mut code, mut prev) = (0u32, LENGTHS[order[0]]);
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (LENGTHS[s] - prev);
            }
            prev = LENGTHS[s];
            codes[s] = (code, LENGTHS[s]);
        }
        codes
    }

    #[cfg(test)]
    pub(crate) fn encode(src: &[u8]) -> Vec<u8> {
        static CODES: std::sync::OnceLock<Vec<(u32, u8)>> = std::sync::OnceLock::new();
        let codes = CODES.get_or_init(codes);
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in src {
            let (code, len) = codes[usize::from(b)];
            acc = acc << len | u64::from(code);
            bits += u32::from(len);
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
        }
        out
    }

    #[cfg(test)]
    pub(super) fn unhex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn decoded(src: &[u8]) -> Result<Vec<u8>, HpackError> {
            let mut out = Vec::new();
            assert!(decode(src, &mut out, usize::MAX)?);
            Ok(out)
        }

        #[test]
        fn the_code_is_the_rfcs() {
            // Entries of RFC 7541 Appendix B: the shortest, a 6-bit one, the longest
            // ones, EOS.
            let codes = codes();
            assert_eq!(codes[usize::from(b'0')], (0x0, 5));
            assert_eq!(codes[usize::from(b't')], (0x9, 5));
            assert_eq!(codes[usize::from(b' ')], (0x14, 6));
            assert_eq!(codes[usize::from(b'/')], (0x18, 6));
            assert_eq!(codes[0], (0x1ff8, 13));
            assert_eq!(codes[10], (0x3ffffffc, 30));
            assert_eq!(codes[255], (0x3ffffee, 26));
            assert_eq!(codes[256], (0x3fffffff, 30));
            // The RFC's examples (C.4 and C.6).
            for (text, hex) in [
                ("www.example.com", "f1e3c2e5f23a6ba0ab90f4ff"),
                ("no-cache", "a8eb10649cbf"),
                ("custom-key", "25a849e95ba97d7f"),
                ("custom-value", "25a849e95bb8e8b4bf"),
                ("302", "6402"),
                ("private", "aec3771a4b"),
                (
                    "Mon, 21 Oct 2013 20:13:21 GMT",
                    "d07abe941054d444a8200595040b8166e082a62d1bff",
                ),
                (
                    "https://www.example.com",
                    "9d29ad171863c78f0b97c8e9ae82ae43d3",
                ),
            ] {
                let bytes = unhex(hex);
                assert_eq!(encode(text.as_bytes()), bytes, "{text}");
                assert_eq!(decoded(&bytes).unwrap(), text.as_bytes(), "{text}");
            }
        }

        #[test]
        fn every_octet_decodes_alone_and_in_runs() {
            for b in 0..=255u8 {
                assert_eq!(decoded(&encode(&[b])).unwrap(), [b], "octet {b}");
            }
            let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
            assert_eq!(decoded(&encode(&all)).unwrap(), all);
            assert_eq!(decoded(&[]).unwrap(), b"");
        }

        #[test]
        fn bad_padding_and_eos_are_refused() {
            // '0' (00000) then 3 zero bits: padding that is not EOS's prefix.
            assert_eq!(
                decoded(&[0b0000_0000]),
                Err(HpackError::Huffman("padding that is not EOS's prefix"))
            );
            // 8 bits of padding alone, and 13 after "ab" (11 bits of codes).
            assert_eq!(
                decoded(&[0xff]),
                Err(HpackError::Huffman("more than 7 bits of padding"))
            );
            let mut long = encode(b"ab");
            long.push(0xff);
            assert_eq!(
                decoded(&long),
                Err(HpackError::Huffman("more than 7 bits of padding"))
            );
            // At most `max` octets: one more is refused, not appended.
            let mut out = Vec::new();
            assert_eq!(decode(&encode(b"abc"), &mut out, 2), Ok(false));
            assert_eq!(out, b"ab");
            // EOS itself (30 ones), padded with two more ones.
            assert_eq!(
                decoded(&[0xff, 0xff, 0xff, 0xff]),
                Err(HpackError::Huffman("EOS inside it"))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::huffman::unhex;
    use super::*;

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn table(d: &Decoder) -> Vec<Field> {
        d.table.iter().cloned().collect()
    }

    #[test]
    fn the_rfcs_requests_decode_with_huffman_and_the_dynamic_table() {
        // RFC 7541 C.4: three requests on one connection.
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 64 << 10);
        assert_eq!(
            d.decode(&unhex("828684418cf1e3c2e5f23a6ba0ab90f4ff"))
                .unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.size, 57);
        assert_eq!(
            d.decode(&unhex("828684be5886a8eb10649cbf")).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(
            d.decode(&unhex("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf"))
                .unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(
            table(&d),
            fields(&[
                ("custom-key", "custom-value"),
                ("cache-control", "no-cache"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn the_rfcs_responses_decode_with_eviction() {
        // RFC 7541 C.6: a 256-byte table, entries evicted as the responses go.
        let mut d = Decoder::new(256, 64 << 10);
        assert_eq!(
            d.decode(&unhex(
                "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3"
            ))
            .unwrap(),
            fields(&[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(d.size, 222);
        assert_eq!(
            d.decode(&unhex("4883640effc1c0bf")).unwrap(),
            fields(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(
            d.decode(&unhex(
                "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"
            ))
            .unwrap(),
            fields(&[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
            ])
        );
        assert_eq!(
            table(&d),
            fields(&[
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
                ),
                ("content-encoding", "gzip"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
            ])
        );
        assert_eq!(d.size, 215);
    }

    #[test]
    fn literals_of_every_kind_and_size_updates() {
        let mut d = Decoder::new(DEFAULT_TABLE_SIZE, 64 << 10);
        // A size update to 0 then 100 (before any field), a literal without indexing
        // with a static name (content-type, 31), one never indexed with a literal
        // name, and one indexed whose entry goes to the table.
        let mut block = vec![0x20, 0x3f, 0x45];
        block.extend([0x0f, 0x10, 16]);
        block.extend(b"application/grpc");
        block.extend([0x10, 4]);
        block.extend(b"x-id");
        block.extend([2]);
        block.extend(b"v1");
        block.extend([0x44, 5]);
        block.extend(b"/a/b/");
        assert_eq!(
            d.decode(&block).unwrap(),
            fields(&[
                ("content-type", "application/grpc"),
                ("x-id", "v1"),
                (":path", "/a/b/"),
            ])
        );
        assert_eq!(d.max, 100);
        assert_eq!(table(&d), fields(&[(":path", "/a/b/")]));
        assert_eq!(d.decode(&[0xbe]).unwrap(), fields(&[(":path", "/a/b/")]));
        // An entry larger than the table empties it (§4.4).
        let mut big = vec![0x44, 80];
        big.extend([b'/'; 80]);
        d.decode(&big).unwrap();
        assert!(table(&d).is_empty());
        assert_eq!(d.size, 0);
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let new = || Decoder::new(DEFAULT_TABLE_SIZE, 1 << 10);
        let cases: [(&[u8], HpackError); 8] = [
            (
                &[0x80],
                HpackError::Index {
                    index: 0,
                    dynamic: 0,
                },
            ),
            (
                &[0xbe],
                HpackError::Index {
                    index: 62,
                    dynamic: 0,
                },
            ),
            (&[0x44], HpackError::Truncated),
            (&[0x44, 0x05, b'/'], HpackError::Truncated),
            (
                &[0xff, 0x80, 0x80, 0x80, 0x80, 0x01],
                HpackError::IntegerTooLong,
            ),
            (&[0x3f, 0xe2, 0x1f], HpackError::TableSize(4097, 4096)),
            (&[0x82, 0x20], HpackError::LateSizeUpdate),
            (&[0x04, 0x7f, 0x82, 0x08], HpackError::ListTooLarge(1 << 10)),
        ];
        for (block, want) in cases {
            assert_eq!(new().decode(block), Err(want), "{block:02x?}");
        }
        // Many small fields over the list's limit.
        let many = vec![0x82; 40];
        assert_eq!(new().decode(&many), Err(HpackError::ListTooLarge(1 << 10)));
    }

    fn cases() -> u32 {
        std::env::var("TRIBUTARY_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500)
    }

    /// A string literal, Huffman-coded or not.
    fn string(out: &mut Vec<u8>, s: &[u8], coded: bool) {
        let (flag, bytes) = if coded {
            (0x80, huffman_encode(s))
        } else {
            (0, s.to_vec())
        };
        encode_int(out, flag, 7, bytes.len());
        out.extend_from_slice(&bytes);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Fields encoded every way (indexed from either table, literals of each
        /// kind with a literal, static or dynamic name, Huffman-coded or not, some
        /// larger than the table), over blocks that share a small dynamic table and
        /// may start by resizing it, decode to themselves, and the table is what an
        /// independent model of it says; and no input makes the decoder panic.
        #[test]
        fn fuzz_hpack(
            blocks in proptest::collection::vec(
                (
                    proptest::option::of(0usize..=256),
                    proptest::collection::vec(
                        (
                            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
                            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                            0u8..7,
                            proptest::prelude::any::<bool>(),
                            1u64..62,
                            proptest::prelude::any::<proptest::sample::Index>(),
                        ),
                        0..12,
                    ),
                ),
                1..4,
            ),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let mut d = Decoder::new(256, 64 << 10);
            // The encoder's own account of the dynamic table, newest first, and its
            // size limit.
            let mut model: Vec<Field> = Vec::new();
            let mut max = 256;
            let size = |f: &Field| f.0.len() + f.1.len() + 32;
            let fit = |model: &mut Vec<Field>, max: usize, room: usize| {
                let mut total: usize = model.iter().map(size).sum();
                while total + room > max {
                    let Some(old) = model.pop() else { break };
                    total -= size(&old);
                }
            };
            for (resize, block) in blocks {
                let (mut bytes, mut want) = (Vec::new(), Vec::new());
                if let Some(to) = resize {
                    encode_int(&mut bytes, 0x20, 5, to);
                    max = to;
                    fit(&mut model, max, 0);
                }
                for (name, value, how, coded, static_index, pick) in block {
                    let static_name = || STATIC_TABLE[static_index as usize - 1].0.as_bytes().to_vec();
                    let (field, indexing) = match how {
                        // Indexed, from the static table.
                        0 => {
                            encode_int(&mut bytes, 0x80, 7, static_index as usize);
                            let (n, v) = STATIC_TABLE[static_index as usize - 1];
                            ((n.as_bytes().to_vec(), v.as_bytes().to_vec()), false)
                        }
                        // Indexed, any dynamic entry (if there is one).
                        1 if !model.is_empty() => {
                            let k = pick.index(model.len());
                            encode_int(&mut bytes, 0x80, 7, 62 + k);
                            (model[k].clone(), false)
                        }
                        // Incremental indexing, the name of a dynamic entry.
                        6 if !model.is_empty() => {
                            let k = pick.index(model.len());
                            encode_int(&mut bytes, 0x40, 6, 62 + k);
                            string(&mut bytes, &value, coded);
                            ((model[k].0.clone(), value), true)
                        }
                        // Literal with incremental indexing, a literal name.
                        1 | 2 | 6 => {
                            bytes.push(0x40);
                            string(&mut bytes, &name, coded);
                            string(&mut bytes, &value, !coded);
                            ((name, value), true)
                        }
                        // Incremental indexing, a static name.
                        3 => {
                            encode_int(&mut bytes, 0x40, 6, static_index as usize);
                            string(&mut bytes, &value, coded);
                            ((static_name(), value), true)
                        }
                        // Without indexing, a static name.
                        4 => {
                            encode_int(&mut bytes, 0x00, 4, static_index as usize);
                            string(&mut bytes, &value, coded);
                            ((static_name(), value), false)
                        }
                        // Never indexed, a literal name.
                        _ => {
                            bytes.push(0x10);
                            string(&mut bytes, &name, coded);
                            string(&mut bytes, &value, coded);
                            ((name, value), false)
                        }
                    };
                    if indexing {
                        // Larger than the table: it empties the table (§4.4).
                        fit(&mut model, max, size(&field));
                        if size(&field) <= max {
                            model.insert(0, field.clone());
                        }
                    }
                    want.push(field);
                }
                let got = d.decode(&bytes);
                proptest::prop_assert_eq!(got.as_ref(), Ok(&want));
                proptest::prop_assert_eq!(table(&d), model.clone());
            }
            // Garbage, on a decoder whose table the blocks filled, and on a fresh one.
            let _ = d.decode(&garbage);
            let _ = Decoder::new(DEFAULT_TABLE_SIZE, 1 << 10).decode(&garbage);
        }
    }
}
