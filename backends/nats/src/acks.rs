//! The acks of single publishes, on one reply subscription for the whole process.
//!
//! A vote sent alone (one HTTP request) is one publish whose ack the request waits for. The
//! client's JetStream publish makes a new inbox subject for each, routes the ack through its
//! request multiplexer and reads it as an untagged enum (an error value is built and thrown
//! away for every successful ack); in profiles of single votes the append was 15% of ingest's
//! instructions, and 10% this way. Here every single publish names `<inbox>.<token>` as its reply subject on one
//! long-lived subscription `<inbox>.*`; a task hands each ack to the publish waiting for that
//! token, and the ack is read in place ([`read_ack`]), as [`super::publish_together`] does for
//! batches.
//!
//! A publish that stops waiting (its deadline passed, or its request was dropped) takes its
//! token out of the table, so the table holds only publishes still waiting. If the
//! subscription ends (the client closed), every waiting publish is told so at once and the
//! next one subscribes again.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tally_core::{Error, Result};
use tokio::sync::oneshot;

use crate::log::{read_ack, Ack};

type Waiting = HashMap<u64, oneshot::Sender<Result<Ack>>>;

/// One reply subscription and the publishes waiting on it.
struct Route {
    inbox: String,
    next: AtomicU64,
    waiting: Mutex<Waiting>,
    /// Set when the subscription ended: no ack will come through this route any more.
    ended: AtomicBool,
}

impl Route {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Nothing panics while holding the lock; a poisoned map is still a valid map.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Publishes one message at a time and waits for its ack on the shared subscription.
pub(crate) struct AckRouter {
    client: async_nats::Client,
    current: Mutex<Option<Arc<Route>>>,
    /// Held while subscribing, so concurrent first publishes make one subscription.
    subscribing: tokio::sync::Mutex<()>,
}

/// Takes a publish's token out of the table however its wait ends.
struct Ticket<'a> {
    route: &'a Route,
    token: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.route.waiting().remove(&self.token);
    }
}

impl AckRouter {
    pub(crate) fn new(client: async_nats::Client) -> AckRouter {
        AckRouter {
            client,
            current: Mutex::new(None),
            subscribing: tokio::sync::Mutex::new(()),
        }
    }

    /// Publishes `payload` to `subject` and answers what the stream acked, or an error when
    /// the publish failed or no ack came within `timeout`.
    pub(crate) async fn publish(
        &self,
        subject: String,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<Ack> {
        let route = self.route().await?;
        let token = route.next.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = oneshot::channel();
        route.waiting().insert(token, sender);
        let _ticket = Ticket {
            route: &route,
            token,
        };
        let mut reply = String::with_capacity(route.inbox.len() + 21);
        reply.push_str(&route.inbox);
        let _ = write!(reply, ".{token}");
        self.client
            .publish_with_reply(subject, reply, payload)
            .await
            .map_err(|err| Error::unavailable("vote log", format!("publish: {err}")))?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(_)) => Err(Error::unavailable(
                "vote log",
                "the subscription for publish acks ended before this one came",
            )),
            Err(_) => Err(Error::unavailable(
                "vote log",
                format!("publish not acknowledged within {timeout:?}"),
            )),
        }
    }

    /// The live route, subscribing when there is none.
    async fn route(&self) -> Result<Arc<Route>> {
        if let Some(route) = self.live() {
            return Ok(route);
        }
        let _one = self.subscribing.lock().await;
        if let Some(route) = self.live() {
            return Ok(route);
        }
        let inbox = self.client.new_inbox();
        let mut acks = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|err| Error::unavailable("vote log", format!("subscribe to acks: {err}")))?;
        let route = Arc::new(Route {
            inbox,
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            ended: AtomicBool::new(false),
        });
        let routing = route.clone();
        tokio::spawn(async move {
            while let Some(ack) = acks.next().await {
                let token = ack
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|token| token.parse::<u64>().ok());
                let sender = token.and_then(|token| routing.waiting().remove(&token));
                if let Some(sender) = sender {
                    let _ = sender.send(read_ack(ack.status, &ack.payload));
                }
            }
            routing.ended.store(true, Ordering::Release);
            // Dropping the senders tells every publish still waiting.
            routing.waiting().clear();
        });
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(route.clone());
        Ok(route)
    }

    fn live(&self) -> Option<Arc<Route>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|route| !route.ended.load(Ordering::Acquire))
            .cloned()
    }

    /// Publishes still waiting for their ack (for tests: none once every wait has ended).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.live().map_or(0, |route| route.waiting().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_testkit::{require, NatsServer};

    /// Every way a wait ends takes its token out of the table: answered (a stored message, a
    /// subject nobody takes), timed out, or dropped by its caller.
    #[tokio::test]
    async fn needs_nats_a_publish_that_stops_waiting_leaves_no_token_behind() {
        require!(NatsServer);
        let server = NatsServer::start().await.expect("nats-server");
        let client = crate::connect(&server.url(), Duration::from_secs(10))
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "acks-test".into(),
            subjects: vec!["stored.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        let router = Arc::new(AckRouter::new(client.clone()));
        let wait = Duration::from_secs(5);

        let first = router.publish("stored.a".into(), "1".into(), wait).await;
        let second = router.publish("stored.b".into(), "2".into(), wait).await;
        match (first, second) {
            (
                Ok(Ack::Stored(tally_core::ports::Appended::Accepted { seq: 1, .. })),
                Ok(Ack::Stored(tally_core::ports::Appended::Accepted { seq: 2, .. })),
            ) => {}
            other => panic!("two stored messages, acked in order: {other:?}"),
        }
        assert_eq!(router.waiting(), 0);

        // No stream takes the subject: the server says so at once.
        let nobody = router.publish("nowhere.a".into(), "x".into(), wait).await;
        assert!(
            nobody
                .as_ref()
                .is_err_and(|err| format!("{err:?}").contains("no stream takes")),
            "{nobody:?}"
        );
        assert_eq!(router.waiting(), 0);

        // A plain subscriber takes the message and never answers: the wait times out.
        let _silent = client.subscribe("silent.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let started = std::time::Instant::now();
        let silent = router
            .publish("silent.a".into(), "x".into(), Duration::from_millis(200))
            .await;
        assert!(
            silent
                .as_ref()
                .is_err_and(|err| format!("{err:?}").contains("not acknowledged within")),
            "{silent:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(router.waiting(), 0);

        // The caller goes away while waiting.
        let waiting = tokio::spawn({
            let router = router.clone();
            async move { router.publish("silent.b".into(), "x".into(), wait).await }
        });
        let until = std::time::Instant::now() + wait;
        while router.waiting() == 0 && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(router.waiting(), 1, "the publish is waiting for its ack");
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(router.waiting(), 0);
    }
}
