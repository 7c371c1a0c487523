//! Middleware as tower layers of their own, for the middleware every request of a route
//! passes through.
//!
//! `axum::middleware::from_fn` costs each request, per layer: a clone of the service under
//! it, a boxed `Next` around that clone, a boxed future for the middleware and another for
//! `Next::run`, and the request taken apart and put together again. [`AroundLayer`] keeps
//! the clone (tower hands the ready service to the request) and one boxed future, and
//! nothing else.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use tower::{Layer, Service};

/// A middleware: what runs around the rest of a request.
pub trait Around: Clone + Send + Sync + 'static {
    /// Answers `request`, calling `inner` with it (at most once) for the rest of the stack.
    fn around<F, Fut>(&self, request: Request, inner: F) -> impl Future<Output = Response> + Send
    where
        F: FnOnce(Request) -> Fut + Send,
        Fut: Future<Output = Response> + Send;
}

/// An [`Around`] as a tower layer (`Router::layer`, `Router::route_layer`,
/// `MethodRouter::layer`).
#[derive(Clone)]
pub struct AroundLayer<A>(pub A);

impl<A: Clone, S> Layer<S> for AroundLayer<A> {
    type Service = AroundService<A, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AroundService {
            around: self.0.clone(),
            inner,
        }
    }
}

/// The service of an [`AroundLayer`].
#[derive(Clone)]
pub struct AroundService<A, S> {
    around: A,
    inner: S,
}

/// A boxed response future, what a layer's service answers with.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<A, S> Service<Request> for AroundService<A, S>
where
    A: Around,
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service made ready goes with this request; a clone stays for the next one.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let around = self.around.clone();
        Box::pin(async move {
            let response = around
                .around(request, move |request| infallible(inner.call(request)))
                .await;
            Ok(response)
        })
    }
}

/// The response of a service that cannot fail.
pub async fn infallible(future: impl Future<Output = Result<Response, Infallible>>) -> Response {
    match future.await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}
