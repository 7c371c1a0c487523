//! Live streams (Server-Sent Events) served without hyper's per-connection buffers.
//!
//! hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for every HTTP/1 connection
//! for as long as it is open: two thirds of what a live client cost, and no setting makes
//! them smaller. A live stream needs neither, since after its request the client only
//! listens. So the accept loop reads the first request of a connection itself, and when it
//! is a `GET` of a live route (a path ending in `/live`) whose head is complete within
//! [`HEAD_MAX`] bytes and which has no body, that request goes through the same router
//! here:
//! - an answer of unknown length (a stream) is written chunked, with `connection: close`,
//!   by a task that holds only the socket and the body. The client going away (end of
//!   file or an error on the socket) ends it, and so does a client that takes nothing for
//!   [`WRITE_STALL`];
//! - an answer of known length (an error, say) is written with its length, and hyper
//!   serves whatever the client sends next on that connection.
//!
//! Anything else (another method or path, a head too long or malformed, a body, an
//! upgrade) goes to hyper with the bytes already read, so hyper serves the connection as if
//! nothing had read it.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The longest request head read here; a longer one goes to hyper.
pub const HEAD_MAX: usize = 8 * 1024;
/// The most header lines read here; more go to hyper.
const HEADERS_MAX: usize = 64;
/// A stream whose client takes nothing for this long is closed.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// What the first request of a connection is.
pub enum First {
    /// A live route's request, read whole; `rest` is what the client sent after it.
    Stream(Box<Lean>),
    /// Anything else: hyper serves the connection, starting with these bytes.
    Hyper(Bytes),
    /// The client closed, sent nothing whole in time, or the server is stopping.
    Gone,
}

/// A request served here.
pub struct Lean {
    request: Request<Body>,
    rest: Bytes,
    /// HTTP/1.0: no chunked encoding, and the connection closes after the answer.
    http10: bool,
    /// The client asked to close the connection after the answer.
    close: bool,
}

/// What becomes of a connection after the request served here.
pub enum After {
    /// hyper serves the rest of it, starting with these bytes.
    Hyper(Bytes),
    Close,
}

/// Whether the bytes read so far decide where the request goes.
enum Verdict {
    NeedMore,
    Hyper,
    Stream(Box<Lean>),
}

/// Where a request that starts with `bytes` goes: its request line says whether it may be
/// a live route's, then its head is parsed (once) into the request served here.
fn classify(bytes: &[u8]) -> Verdict {
    const GET: &[u8] = b"GET /";
    if bytes.len() < GET.len() {
        return if GET.starts_with(bytes) {
            Verdict::NeedMore
        } else {
            Verdict::Hyper
        };
    }
    if !bytes.starts_with(GET) {
        return Verdict::Hyper;
    }
    let Some(line_end) = bytes.iter().position(|b| *b == b'\n') else {
        return if bytes.len() >= HEAD_MAX {
            Verdict::Hyper
        } else {
            Verdict::NeedMore
        };
    };
    let target = bytes[4..line_end]
        .split(|b| *b == b' ')
        .next()
        .unwrap_or(&[]);
    let path = target.split(|b| *b == b'?').next().unwrap_or(&[]);
    if !path.ends_with(b"/live") {
        return Verdict::Hyper;
    }
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(bytes) {
        Ok(httparse::Status::Complete(len)) if len <= HEAD_MAX => {
            match lean(&head, &bytes[len..]) {
                Some(lean) => Verdict::Stream(Box::new(lean)),
                None => Verdict::Hyper,
            }
        }
        Ok(httparse::Status::Partial) if bytes.len() < HEAD_MAX => Verdict::NeedMore,
        _ => Verdict::Hyper,
    }
}

/// Reads the first request of a connection, as far as it takes to tell where it goes:
/// within `timeout` of the connection's start, and only until `stopping`.
pub async fn first_request(
    stream: &mut TcpStream,
    timeout: Duration,
    stopping: &CancellationToken,
) -> First {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = BytesMut::with_capacity(1024);
    loop {
        if bytes.capacity() == bytes.len() {
            bytes.reserve(1024);
        }
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read_buf(stream, &mut bytes)) => read,
            () = stopping.cancelled() => return First::Gone,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return First::Gone,
            Ok(Ok(_)) => {}
        }
        match classify(&bytes) {
            Verdict::NeedMore => continue,
            Verdict::Hyper => return First::Hyper(bytes.freeze()),
            Verdict::Stream(lean) => return First::Stream(lean),
        }
    }
}

/// The request of a whole `head` (`rest`: what followed it), or `None` when hyper should
/// answer it (a body, an upgrade, something not understood here).
fn lean(head: &httparse::Request, rest: &[u8]) -> Option<Lean> {
    let version = match head.version? {
        0 => Version::HTTP_10,
        1 => Version::HTTP_11,
        _ => return None,
    };
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    for line in head.headers.iter() {
        let name = HeaderName::from_bytes(line.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(line.value).ok()?;
        headers.append(name, value);
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes() != b"0");
    if has_body || headers.contains_key(header::UPGRADE) || headers.contains_key(header::EXPECT) {
        return None;
    }
    let close = version == Version::HTTP_10 || has_token(&headers, header::CONNECTION, "close");
    // The path starts with `/` (see `classify`): origin-form, never a scheme or authority.
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(head.path?)
        .version(version)
        .body(Body::empty())
        .ok()?;
    *request.headers_mut() = headers;
    Some(Lean {
        request,
        rest: match rest {
            [] => Bytes::new(),
            rest => Bytes::copy_from_slice(rest),
        },
        http10: version == Version::HTTP_10,
        close,
    })
}

/// Whether a comma-separated header lists `token`.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .any(|item| item.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Answers `lean` through `app` on `stream`: see the module documentation.
pub async fn serve(
    stream: &TcpStream,
    app: Router,
    lean: Lean,
    peer: SocketAddr,
    stopping: &CancellationToken,
) -> After {
    let Lean {
        mut request,
        rest,
        http10,
        close,
    } = lean;
    request.extensions_mut().insert(ConnectInfo(peer));
    // Boxed: the router's future is large, and this task lives as long as the stream.
    let response = match Box::pin(app.oneshot(request)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let (parts, mut body) = response.into_parts();
    let length = body.size_hint().exact();
    let streamed = length.is_none();
    let chunked = streamed && !http10;
    let close = close || streamed;
    let head = {
        let mut head = Vec::with_capacity(256);
        head.extend_from_slice(b"HTTP/1.1 ");
        head.extend_from_slice(parts.status.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        head.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            if is_framing(name) {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !parts.headers.contains_key(header::DATE) {
            head.extend_from_slice(b"date: ");
            head.extend_from_slice(
                httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes(),
            );
            head.extend_from_slice(b"\r\n");
        }
        let bodiless = parts.status.is_informational()
            || parts.status == axum::http::StatusCode::NO_CONTENT
            || parts.status == axum::http::StatusCode::NOT_MODIFIED;
        match length {
            Some(_) if bodiless => {}
            Some(length) => {
                head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
            }
            None if chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            None => {}
        }
        if close {
            head.extend_from_slice(b"connection: close\r\n");
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    drop(parts);
    if write_all(stream, &head, WRITE_STALL).await.is_err() {
        return After::Close;
    }
    drop(head);
    loop {
        let frame = tokio::select! {
            frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => frame,
            () = gone(stream) => return After::Close,
        };
        let data = match frame {
            None => break,
            // The body failed: the client sees a stream cut short.
            Some(Err(_)) => return After::Close,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        let written = if chunked {
            let mut chunk = Vec::with_capacity(data.len() + 20);
            chunk.extend_from_slice(format!("{:X}\r\n", data.len()).as_bytes());
            chunk.extend_from_slice(&data);
            chunk.extend_from_slice(b"\r\n");
            write_all(stream, &chunk, WRITE_STALL).await
        } else {
            write_all(stream, &data, WRITE_STALL).await
        };
        if written.is_err() {
            return After::Close;
        }
    }
    if chunked && write_all(stream, b"0\r\n\r\n", WRITE_STALL).await.is_err() {
        return After::Close;
    }
    if close || stopping.is_cancelled() {
        return After::Close;
    }
    After::Hyper(rest)
}

/// Headers that frame a message on this connection: written here, never copied from the
/// handler's answer.
fn is_framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::CONNECTION
        || name.as_str() == "keep-alive"
}

/// Writes all of `bytes`, waiting for room at most `stall` at a time ([`WRITE_STALL`]).
/// Only a write that finds the socket full sets a timer.
async fn write_all(stream: &TcpStream, mut bytes: &[u8], stall: Duration) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(stall, stream.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// What a client may send over its live stream before it is cut off.
const TALK_MAX: usize = 64 * 1024;

/// Resolves when the client has closed the connection or it failed, or has sent more than
/// [`TALK_MAX`] bytes over its stream. What it sends is read and dropped: the answer said
/// the connection closes after it.
async fn gone(stream: &TcpStream) {
    let mut talked = 0;
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut scratch = [0u8; 256];
        match stream.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => {
                talked += n;
                if talked > TALK_MAX {
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// A connection whose first bytes were already read: reads give those first.
pub struct Rewind {
    first: Bytes,
    stream: TcpStream,
}

impl Rewind {
    pub fn new(first: Bytes, stream: TcpStream) -> Rewind {
        Rewind { first, stream }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.advance(n);
            if self.first.is_empty() {
                // Give the allocation back now, not when the connection ends.
                self.first = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `bytes` go: `"more"`, `"hyper"`, or `"stream"` and what followed the head.
    fn verdict(bytes: &[u8]) -> (&'static str, Bytes) {
        match classify(bytes) {
            Verdict::NeedMore => ("more", Bytes::new()),
            Verdict::Hyper => ("hyper", Bytes::new()),
            Verdict::Stream(lean) => ("stream", lean.rest),
        }
    }

    fn lean_of(head: &str) -> Option<Box<Lean>> {
        match classify(head.as_bytes()) {
            Verdict::Stream(lean) => Some(lean),
            _ => None,
        }
    }

    #[test]
    fn only_gets_of_live_routes_with_a_whole_head_are_served_here() {
        assert_eq!(verdict(b"GE").0, "more");
        assert_eq!(verdict(b"POST /v1/votes").0, "hyper");
        assert_eq!(verdict(b"GET /v1/polls/p/li").0, "more");
        assert_eq!(verdict(b"GET /v1/polls/p/results HTTP/1.1\r\n").0, "hyper");
        assert_eq!(
            verdict(b"GET /v1/polls/p/live HTTP/1.1\r\nHost: x\r\n").0,
            "more"
        );
        let head = b"GET /v1/polls/p/live?results_token=t HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(verdict(head), ("stream", Bytes::new()));
        let lean =
            lean_of("GET /v1/polls/p/live?results_token=t HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(lean.request.uri(), "/v1/polls/p/live?results_token=t");
        assert_eq!(lean.request.headers()["host"], "x");
        assert_eq!(
            verdict(b"GET /v1/live?polls=a,b HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n"),
            ("stream", Bytes::from_static(b"GET / HTTP/1.1\r\n"))
        );
        assert_eq!(
            verdict(b"GET /v1/polls/p/live HTTP/1.1\r\nBad Header\r\n\r\n").0,
            "hyper"
        );
        let long = format!("GET /live HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(HEAD_MAX));
        assert_eq!(verdict(long.as_bytes()).0, "hyper");
        let long_line = format!("GET /{}", "a".repeat(HEAD_MAX));
        assert_eq!(verdict(long_line.as_bytes()).0, "hyper");
        assert_eq!(
            verdict(b"GET http://example.com/live HTTP/1.1\r\n\r\n").0,
            "hyper"
        );
    }

    #[test]
    fn requests_with_a_body_or_an_upgrade_go_to_hyper() {
        let served = |head: &str| lean_of(head).is_some();
        assert!(served(
            "GET /live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!served("GET /live HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(!served(
            "GET /live HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!served(
            "GET /live HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!served(
            "GET /live HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"
        ));
        assert!(!served("GET /live HTTP/1.1\r\nX: a\x01b\r\n\r\n"));
        let closing = lean_of("GET /live HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(closing.unwrap().close);
        let kept = lean_of("GET /live HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
        assert!(!kept.unwrap().close);
        let old = lean_of("GET /live HTTP/1.0\r\n\r\n").unwrap();
        assert!(old.http10 && old.close);
    }

    /// A client that stops reading holds its stream only for the stall time: the write
    /// gives up, and the stream ends (a slow client is dropped, not waited for).
    #[tokio::test]
    async fn a_write_to_a_client_that_reads_nothing_gives_up_after_the_stall_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        // Far more than the socket buffers of both ends hold.
        let event = vec![b'x'; 64 * 1024 * 1024];
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            write_all(&server, &event, Duration::from_millis(300)),
        )
        .await
        .expect("the write gives up instead of waiting on");
        assert_eq!(written.unwrap_err().kind(), io::ErrorKind::TimedOut);
        drop(client);
    }
}
