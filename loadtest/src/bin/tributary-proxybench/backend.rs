//! The backend behind every proxy: a tiny HTTP/1.1 server on one thread answering
//! every request with the same small body, keep-alive, pipelining-safe.
//!
//! Ours rather than nginx serving a static file: it shares a core with the load
//! generator, so the less CPU it takes per request the higher the ceiling of that core;
//! it answers from one pre-built buffer (no file, no date header, no logging); and it
//! keeps nginx in one role only, the proxy under test. It accepts requests without a
//! body or with a Content-Length (the proxies forward GETs); anything else closes the
//! connection.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The answer to every request: `200 OK` with `body_bytes` of `x`.
pub fn response(body_bytes: usize) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {body_bytes}\r\n\r\n"
    )
    .into_bytes();
    r.resize(r.len() + body_bytes, b'x');
    r
}

/// Serves until the process is stopped; writes {"addr": ...} to `ready_file` once
/// listening.
pub fn run(listen: SocketAddr, body_bytes: usize, ready_file: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("backend --listen {listen}: cannot bind"))?;
        let addr = listener.local_addr()?;
        std::fs::write(
            ready_file,
            serde_json::json!({"addr": addr.to_string()}).to_string(),
        )
        .with_context(|| format!("--ready-file {}", ready_file.display()))?;
        let answer: &'static [u8] = Vec::leak(response(body_bytes));
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(4096);
                let mut out = Vec::with_capacity(answer.len());
                loop {
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    out.clear();
                    loop {
                        match request_len(&buf) {
                            Ok(Some(n)) => {
                                buf.advance(n);
                                out.extend_from_slice(answer);
                            }
                            Ok(None) => break,
                            Err(()) => return,
                        }
                    }
                    if !out.is_empty() && stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

/// The length of the complete request at the start of `buf` (head and body), `None`
/// while incomplete, `Err` when it is not a request this backend serves.
pub fn request_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut body = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(());
        }
    }
    Ok((buf.len() >= head + body).then_some(head + body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_by_their_head_and_content_length() {
        let get = b"GET / HTTP/1.1\r\nHost: bench.prod\r\n\r\n";
        assert_eq!(request_len(get), Ok(Some(get.len())));
        assert_eq!(request_len(&get[..get.len() - 1]), Ok(None));
        let post = b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(request_len(&post[..post.len() - 1]), Ok(None));
        assert_eq!(request_len(post), Ok(Some(post.len())));
        assert_eq!(request_len(b"\x00\x01 not http\r\n\r\n"), Err(()));
        let r = response(64);
        assert!(r.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(r.ends_with(&[b'x'; 64]));
    }
}
