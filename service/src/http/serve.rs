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
use tower::ServiceExt;

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
        let service = app
            .clone()
            .map_request(move |mut request: hyper::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            });
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Held for the connection's life: the caps count it.
            let _held = (permit, place);
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
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
}
