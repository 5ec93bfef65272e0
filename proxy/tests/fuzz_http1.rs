//! Property tests of the HTTP/1.1 fast path's request parser and chunked decoder
//! (`scripts/fuzz` runs each `fuzz_` test a million times; `TRIBUTARY_FUZZ_CASES`
//! sets the count, default small for CI). Each case is pure: no I/O, no runtime.

use proptest::prelude::*;
use tributary_proxy::http1::{BodyKind, Chunked, MAX_HEAD, MAX_HEADERS, Parsed, parse_request};

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

/// Bytes that are often nearly a request: a request line and header lines from
/// pieces that matter to framing, with arbitrary bytes mixed in.
fn requestish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"GET / HTTP/1.1\r\n".to_vec()),
        Just(b"POST /a?b HTTP/1.1\r\n".to_vec()),
        Just(b"GET / HTTP/1.0\r\n".to_vec()),
        Just(b"PRI * HTTP/2.0\r\n".to_vec()),
        Just(b"Host: x\r\n".to_vec()),
        Just(b"Content-Length: 5\r\n".to_vec()),
        Just(b"content-length: 18446744073709551616\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"transfer-encoding: gzip, chunked\r\n".to_vec()),
        Just(b"Connection: close, upgrade\r\n".to_vec()),
        Just(b"Expect: 100-continue\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn parse(buf: &[u8]) -> String {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match parse_request(buf, &mut storage) {
        Parsed::Complete(h) => {
            assert!(h.len <= buf.len() && h.len <= MAX_HEAD);
            assert!(h.target.starts_with('/') && h.target.starts_with(h.path));
            format!(
                "complete {} {:?} {} {}",
                h.len, h.body, h.close, h.expect_continue
            )
        }
        Parsed::Partial => {
            assert!(buf.len() <= MAX_HEAD);
            "partial".into()
        }
        other => format!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: no panic; a complete head is decided by its own bytes alone (what
    /// follows it is the body or the next request); a head that is still partial
    /// never becomes a different complete head with more bytes before it ends.
    #[test]
    fn fuzz_http1_fast_path_parse(
        input in prop_oneof![requestish(), prop::collection::vec(any::<u8>(), 0..256)],
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let whole = parse(&input);
        if let Some(len) = whole.strip_prefix("complete ").and_then(|r| r.split(' ').next()) {
            let len: usize = len.parse().unwrap();
            prop_assert_eq!(parse(&input[..len]), whole.clone());
            let mut more = input.clone();
            more.extend_from_slice(&tail);
            prop_assert_eq!(parse(&more), whole.clone());
            // Framing is one of the request kinds, never a response-only one.
            let until_close = format!("{:?}", BodyKind::UntilClose);
            prop_assert!(!whole.contains(&until_close), "{}", whole);
        }
        // Every prefix of the input is still partial, or decided as the whole input
        // is: bytes arriving in any pieces get one answer.
        for cut in 0..input.len() {
            let p = parse(&input[..cut]);
            prop_assert!(p == "partial" || p == whole, "{:?}: {} then {}", &input[..cut], p, whole);
        }
    }

    /// The chunked decoder finds the same end, data and verdict however its input is
    /// split, and when the chunks and the trailer section are fed apart (as the fast
    /// path does to filter request trailers).
    #[test]
    fn fuzz_http1_chunked_decoder(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..128),
            prop::collection::vec(
                prop_oneof![
                    Just(b"5\r\nhello\r\n".to_vec()),
                    Just(b"0\r\n\r\n".to_vec()),
                    Just(b"3;x=y\r\nabc\r\n".to_vec()),
                    Just(b"0\r\nt: 1\r\n\r\n".to_vec()),
                    Just(b"0\r\nContent-Length: 1\r\nx-v: a\tb\r\n\r\n".to_vec()),
                    Just(b"t y: 1\r\n".to_vec()),
                    prop::collection::vec(any::<u8>(), 0..6),
                ],
                0..6,
            ).prop_map(|v| v.concat()),
        ],
        cut in any::<prop::sample::Index>(),
    ) {
        let run = |parts: &[&[u8]]| {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            let mut consumed = 0;
            for p in parts {
                match c.feed(p, |d| data.extend_from_slice(d)) {
                    Ok(n) => {
                        consumed += n;
                        if c.is_done() {
                            break;
                        }
                    }
                    Err(_) => return None,
                }
            }
            Some((consumed, c.is_done(), data))
        };
        let at = cut.index(input.len() + 1);
        let whole = run(&[&input]);
        let split = run(&[&input[..at], &input[at..]]);
        prop_assert_eq!(&whole, &split);
        let staged = {
            let mut c = Chunked::default();
            let mut data = Vec::new();
            c.feed_chunks(&input, |d| data.extend_from_slice(d))
                .ok()
                .and_then(|n| {
                    let rest = if c.in_trailers() {
                        c.feed(&input[n..], |d| data.extend_from_slice(d)).ok()?
                    } else {
                        0
                    };
                    Some((n + rest, c.is_done(), data))
                })
        };
        prop_assert_eq!(&whole, &staged);
        if let Some((consumed, done, data)) = whole {
            prop_assert!(consumed <= input.len());
            prop_assert!(data.len() <= consumed);
            prop_assert!(done || consumed == input.len());
        }
    }
}
