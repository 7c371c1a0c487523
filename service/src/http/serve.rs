//! Serving a router: the accept loop every service runs, with the limits a public server
//! needs and a drain on shutdown.
//!
//! - **Header-read and idle timeout.** A client has `header_read_timeout` to send a
//!   request's headers, and the same after a response to start the next one; a connection
//!   that sends nothing is closed (hyper's HTTP/1 header timer, which also runs while a
//!   keep-alive connection waits).
//! - **Connection caps.** At most `max_connections` at once, and `max_per_address` from one
//!   client address; a connection over a cap is closed as soon as it is accepted, so file
//!   descriptors run out for nobody.
//! - **Drain.** When `shutdown` resolves the listener closes, in-flight requests finish, and
//!   connections are asked to close after their current response; whatever has not ended
//!   after `drain` is dropped.
//! - **Live streams off hyper.** The first request of a connection is read here; a live
//!   stream's is answered without hyper's per-connection buffers (see [`super::streams`]),
//!   everything else is served by hyper.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::streams::{self, After, First, Rewind};
use crate::limits::limit_key;

/// The limits of one listener.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Time to send a request's headers, and to start the next request on a kept-alive
    /// connection.
    pub header_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one client address (IPv6: one /64).
    pub max_per_address: usize,
    /// How long a shutdown waits for in-flight requests and streams to end.
    pub drain: Duration,
}

/// The default header-read (and keep-alive idle) timeout.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The default cap on open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 25_000;
/// The default cap on open connections from one address.
pub const DEFAULT_MAX_PER_ADDRESS: usize = 1_024;
/// The default time a shutdown waits for requests and streams to end.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_address: DEFAULT_MAX_PER_ADDRESS,
            drain: DEFAULT_DRAIN,
        }
    }
}

/// How many of something (connections, live streams) each client address holds, with a cap
/// per address. Shared by the accept loop and the live routes.
#[derive(Default)]
pub struct PerAddress {
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One thing an address holds; gives its place back when dropped.
pub struct Place {
    counts: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    /// A place for `key`, unless it already holds `max`.
    pub fn take(self: &Arc<Self>, key: IpAddr, max: usize) -> Option<Place> {
        let mut held = self.held.lock().expect("per-address counts");
        let count = held.entry(key).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Place {
            counts: self.clone(),
            key,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.counts.held.lock().expect("per-address counts");
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains (see the module
/// documentation). Handlers see the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let graceful = GracefulShutdown::new();
    // Cancelled when the server stops: connections still reading their first request close.
    let stopping = CancellationToken::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors or a connection reset before accept: wait a
                    // little rather than spin, and go on.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: at the connection cap");
            continue;
        };
        let Some(place) = per_address.take(limit_key(peer.ip()), config.max_per_address) else {
            tracing::debug!(%peer, "connection refused: at the per-address cap");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let stopping = stopping.clone();
        let header_read_timeout = config.header_read_timeout;
        tokio::spawn(async move {
            // Held for the connection's life: the caps count it. So is `watcher`, which the
            // drain waits for, whoever serves the connection.
            let _held = (permit, place);
            let mut stream = stream;
            let first =
                match streams::first_request(&mut stream, header_read_timeout, &stopping).await {
                    First::Gone => return,
                    First::Hyper(first) => first,
                    First::Stream(lean) => {
                        match streams::serve(&stream, app.clone(), *lean, peer, &stopping).await {
                            After::Close => return,
                            After::Hyper(rest) => rest,
                        }
                    }
                };
            let service = app.map_request(move |mut request: hyper::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            });
            let connection = builder.serve_connection(
                TokioIo::new(Rewind::new(first, stream)),
                TowerToHyperService::new(service),
            );
            // Boxed: a live stream's task does not carry room for a hyper connection.
            if let Err(err) = Box::pin(watcher.watch(connection)).await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    stopping.cancel();
    if tokio::time::timeout(config.drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_seconds = config.drain.as_secs_f64(),
            "connections still open after the drain time; closing them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(config: ServeConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, config, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    /// Reads until the server closes the connection (or `wait` passes); true when closed.
    async fn closed_within(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buffer = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_closed() {
        let (addr, _stop) = start(ServeConfig {
            header_read_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut slow, Duration::from_secs(3)).await);
        // An idle kept-alive connection is closed too.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut idle, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn connections_over_the_per_address_cap_are_closed_at_once() {
        let (addr, _stop) = start(ServeConfig {
            max_per_address: 2,
            ..Default::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buffer = [0u8; 256];
            let n = stream.read(&mut buffer).await.unwrap();
            assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
            held.push(stream);
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(closed_within(&mut third, Duration::from_secs(2)).await);
        // A place is given back when a connection closes.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 256];
        let n = again.read(&mut buffer).await.unwrap();
        assert!(
            buffer[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buffer[..n])
        );
    }

    #[tokio::test]
    async fn handlers_see_the_peer_and_shutdown_drains() {
        let (addr, stop) = start(ServeConfig::default()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 512];
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).ends_with("127.0.0.1"));
        stop.send(()).unwrap();
        assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

    /// Serves `app` with `config`; the handle ends when the drain does.
    async fn serve_app(
        app: Router,
        config: ServeConfig,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, app, config, async move {
            let _ = stopped.await;
        }));
        (addr, stop, served)
    }

    /// Routes whose answers stream: `/s/live` three chunks then the end, `/forever/live` one
    /// chunk then nothing, telling `left` when its body is dropped; `/` the peer's address.
    fn streaming_app(left: tokio::sync::oneshot::Sender<()>) -> Router {
        use axum::body::{Body, Bytes};
        use futures::StreamExt;
        let left = Arc::new(Mutex::new(Some(left)));
        Router::new()
            .route(
                "/",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }),
            )
            .route(
                "/s/live",
                get(|| async {
                    let chunks = ["a", "bb", "ccc"].map(|c| Ok::<_, std::convert::Infallible>(Bytes::from(c)));
                    ([("content-type", "text/event-stream")], Body::from_stream(futures::stream::iter(chunks)))
                }),
            )
            .route(
                "/forever/live",
                get(move || {
                    let guard = left.lock().unwrap().take();
                    async move {
                        let body = futures::stream::once(async { Ok::<_, std::convert::Infallible>(Bytes::from("a")) })
                            .chain(futures::stream::pending())
                            .map(move |chunk| {
                                let _held = &guard;
                                chunk
                            });
                        Body::from_stream(body)
                    }
                }),
            )
    }

    /// Everything the server sends until it closes the connection (at most `wait`).
    async fn read_all(stream: &mut tokio::net::TcpStream, wait: Duration) -> String {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(wait, stream.read_to_end(&mut all)).await;
        String::from_utf8_lossy(&all).into_owned()
    }

    /// What the server sends until it has sent something ending in `end` (within 5 s).
    async fn read_until(stream: &mut tokio::net::TcpStream, end: &str) -> String {
        let mut seen = String::new();
        let mut buffer = [0u8; 1024];
        while !seen.ends_with(end) {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
                .await
                .unwrap_or_else(|_| panic!("no {end:?} in time: {seen}"))
                .unwrap();
            assert!(n > 0, "closed early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
        seen
    }

    /// A connection holding `/forever/live` open, its first event already read.
    async fn forever_stream(addr: SocketAddr) -> tokio::net::TcpStream {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /forever/live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut stream, "1\r\na\r\n").await;
        stream
    }

    #[tokio::test]
    async fn live_streams_are_written_chunked_and_close_the_connection() {
        let (left, _) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /s/live?x=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut stream, Duration::from_secs(5)).await;
        let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let lines: Vec<&str> = head.lines().collect();
        for expected in [
            "content-type: text/event-stream",
            "transfer-encoding: chunked",
            "connection: close",
        ] {
            assert!(lines.contains(&expected), "{expected} in {answer}");
        }
        assert!(lines.iter().any(|l| l.starts_with("date: ")), "{answer}");
        assert_eq!(body, "1\r\na\r\n2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\n");

        // HTTP/1.0 has no chunks: the body as it is, then the end of the connection.
        let mut old = tokio::net::TcpStream::connect(addr).await.unwrap();
        old.write_all(b"GET /s/live HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut old, Duration::from_secs(5)).await;
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nabbccc"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_ends_its_live_stream() {
        let (left, dropped) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        let stream = forever_stream(addr).await;
        drop(stream);
        let ended = tokio::time::timeout(Duration::from_secs(3), dropped).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the stream's body is dropped when its client goes"
        );
    }

    #[tokio::test]
    async fn an_answer_of_known_length_leaves_the_connection_to_hyper() {
        let (left, _) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A live route that does not exist, and a second request sent with it.
        stream
            .write_all(
                b"GET /nothing/live HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            .await
            .unwrap();
        let seen = read_until(&mut stream, "127.0.0.1").await;
        assert!(seen.starts_with("HTTP/1.1 404 Not Found\r\n"), "{seen}");
        assert!(seen.contains("content-length: 0\r\n"), "{seen}");
        assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 1, "{seen}");
        // And the connection stays open for more.
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let again = read_until(&mut stream, "127.0.0.1").await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }

    #[tokio::test]
    async fn a_live_request_too_long_to_read_here_is_served_by_hyper() {
        let (left, _) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /s/live HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
            "a".repeat(super::streams::HEAD_MAX)
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let seen = read_until(&mut stream, "0\r\n\r\n").await;
        assert!(seen.starts_with("HTTP/1.1 200 OK\r\n"), "{seen}");
        // hyper's answer: the connection is kept.
        assert!(!seen.contains("connection: close"), "{seen}");
        assert!(
            seen.ends_with("1\r\na\r\n2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\n"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn stopping_closes_silent_connections_and_waits_for_streams_within_the_drain() {
        let (left, dropped) = tokio::sync::oneshot::channel();
        let (addr, stop, served) = serve_app(
            streaming_app(left),
            ServeConfig {
                drain: Duration::from_millis(500),
                ..Default::default()
            },
        )
        .await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let live = forever_stream(addr).await;
        let started = std::time::Instant::now();
        stop.send(()).unwrap();
        // A connection that has sent nothing is closed at once, not after the header timeout.
        assert!(closed_within(&mut silent, Duration::from_secs(2)).await);
        // A stream that does not end holds the drain up to its time, no longer.
        served.await.unwrap().unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "{took:?}"
        );
        drop(live);
        let _ = tokio::time::timeout(Duration::from_secs(3), dropped).await;
    }

    #[tokio::test]
    async fn a_client_that_talks_over_its_live_stream_is_cut_off() {
        let (left, dropped) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        let mut stream = forever_stream(addr).await;
        // Up to 64 KiB is read and dropped; more ends the stream.
        let chatter = vec![b'x'; 16 * 1024];
        for _ in 0..8 {
            if stream.write_all(&chatter).await.is_err() {
                break;
            }
        }
        assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
        let ended = tokio::time::timeout(Duration::from_secs(3), dropped).await;
        assert!(matches!(ended, Ok(Err(_))), "the stream's body is dropped");
    }

    #[tokio::test]
    async fn malformed_live_requests_are_answered_by_hyper() {
        let (left, _) = tokio::sync::oneshot::channel();
        let (addr, _stop, _served) = serve_app(streaming_app(left), ServeConfig::default()).await;
        for request in [
            &b"GET /s/live HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n"[..],
            b"GET /s/live HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"GET /s/live HTTP/2.0\r\n\r\n",
            b"GET /s/live\r\n\r\n",
        ] {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            let answer = read_all(&mut stream, Duration::from_secs(5)).await;
            assert!(
                answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{:?}: {answer}",
                String::from_utf8_lossy(request)
            );
        }
        // The server goes on.
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(read_until(&mut stream, "127.0.0.1")
            .await
            .starts_with("HTTP/1.1 200"));
    }
}
