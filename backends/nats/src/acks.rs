//! The acks of single publishes, on one reply subscription for the whole process, and their
//! sending in groups.
//!
//! A vote sent alone (one HTTP request) is one publish whose ack the request waits for. The
//! client's JetStream publish makes a new inbox subject for each, routes the ack through its
//! request multiplexer and reads it as an untagged enum (an error value is built and thrown
//! away for every successful ack); in profiles of single votes the append was 15% of ingest's
//! instructions, and 10% this way. Here every single publish names `<inbox>.<token>` as its
//! reply subject on one long-lived subscription `<inbox>.*`; a task hands each ack to the
//! publish waiting for that token, and the ack is read in place ([`read_ack`]), as
//! [`super::publish_together`] does for batches.
//!
//! **Groups.** Sent as they come, single publishes reach the connection one at a time, and
//! each becomes its own socket write, its own read on the server and its own ack write back
//! — per vote, the broker spent several times what it spends on a vote of a batch. So the
//! publishes go out in groups, like a group commit: a publish made while no group is out is
//! sent at once; one made while a group is out waits until that group is answered (or
//! [`LINGER`] passed since it was sent, so one lost ack never holds the rest) and goes with
//! every other publish that waited, in one write. Alone, a vote waits for nothing; under
//! load, the votes that arrive during one round trip to the broker travel together.
//!
//! A publish that stops waiting (its deadline passed, or its request was dropped) takes its
//! token out of the table, so the table holds only publishes still waiting. If the
//! subscription ends (the client closed), every waiting publish is told so at once and the
//! next one subscribes again.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tally_core::{Error, Result};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::log::{read_ack, Ack};

type Waiting = HashMap<u64, oneshot::Sender<Result<Ack>>>;

/// The longest a publish waits for the group before it to be answered.
pub(crate) const LINGER: Duration = Duration::from_millis(1);

/// A publish not yet handed to the connection: subject, reply subject, payload, token.
type Held = (String, String, bytes::Bytes, u64);

/// The most publishes held at once. Held publishes whose callers stopped waiting are only
/// dropped when the next group is taken, so while the connection takes nothing (a broker
/// that stalls without disconnecting) every new vote would add one: past this many, a
/// publish is refused at once (ingest answers 503) instead.
const MAX_HELD: usize = 32 * 1024;

/// One reply subscription and the publishes waiting on it.
struct Route {
    inbox: String,
    next: AtomicU64,
    waiting: Mutex<Waiting>,
    /// Set when the subscription ended: no ack will come through this route any more.
    ended: AtomicBool,
    /// Publishes waiting for the group before them, in the order they were made.
    held: Mutex<Vec<Held>>,
    /// Wakes the sender: something was held, or the route ended.
    more: Notify,
    /// The first token of the group out, and how many of its publishes are not answered.
    group_first: AtomicU64,
    group_open: AtomicUsize,
    /// Wakes the sender when the group out is answered.
    answered: Notify,
    /// Groups sent so far.
    groups: AtomicU64,
}

impl Route {
    fn new(inbox: String) -> Route {
        Route {
            inbox,
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            ended: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            more: Notify::new(),
            group_first: AtomicU64::new(0),
            group_open: AtomicUsize::new(0),
            answered: Notify::new(),
            groups: AtomicU64::new(0),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // Nothing panics while holding the lock; a poisoned map is still a valid map.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds a publish for the next group, or refuses it when [`MAX_HELD`] are held.
    fn hold(&self, publish: Held) -> Result<()> {
        let mut held = self.held();
        if held.len() >= MAX_HELD {
            return Err(Error::unavailable(
                "vote log",
                format!("{MAX_HELD} votes are already waiting to be sent to the broker"),
            ));
        }
        held.push(publish);
        drop(held);
        self.more.notify_one();
        Ok(())
    }

    /// Takes every held publish into `group` (empty), leaving out those whose callers no
    /// longer wait; answers the smallest token taken.
    fn take_group(&self, group: &mut Vec<Held>) -> Option<u64> {
        std::mem::swap(&mut *self.held(), group);
        let waiting = self.waiting();
        group.retain(|held| waiting.contains_key(&held.3));
        group.iter().map(|held| held.3).min()
    }

    /// The answer to publish `token` came (an ack, or the publish failed): one less open in
    /// its group if it belongs to the group out.
    fn answer_came(&self, token: u64) {
        if token >= self.group_first.load(Ordering::Acquire)
            && self
                .group_open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                    open.checked_sub(1)
                })
                == Ok(1)
        {
            self.answered.notify_one();
        }
    }

    /// Hands held publishes to the connection a group at a time (see the module
    /// documentation), until the route ends.
    async fn send_groups(self: Arc<Route>, client: async_nats::Client) {
        let mut sent_at: Option<Instant> = None;
        let mut group = Vec::new();
        loop {
            if self.ended.load(Ordering::Acquire) {
                return;
            }
            if self.held().is_empty() {
                self.more.notified().await;
                continue;
            }
            // The group before: answered, or given up on after LINGER.
            if let Some(sent) = sent_at {
                while self.group_open.load(Ordering::Acquire) > 0 {
                    let answered = self.answered.notified();
                    if tokio::time::timeout_at(sent + LINGER, answered)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            let Some(first) = self.take_group(&mut group) else {
                continue;
            };
            // Set before the first publish, whose ack may come back before the last is
            // sent. Tokens are taken just before their publish is held, so a late ack of the
            // group before may now and then count against this one: the next group then goes
            // a little early, which costs grouping, nothing else.
            self.group_first.store(first, Ordering::Release);
            self.group_open.store(group.len(), Ordering::Release);
            sent_at = Some(Instant::now());
            self.groups.fetch_add(1, Ordering::Relaxed);
            for (subject, reply, payload, token) in group.drain(..) {
                if let Err(err) = client.publish_with_reply(subject, reply, payload).await {
                    if let Some(waiter) = self.waiting().remove(&token) {
                        let _ = waiter.send(Err(Error::unavailable(
                            "vote log",
                            format!("publish: {err}"),
                        )));
                    }
                    self.answer_came(token);
                }
            }
        }
    }
}

/// Publishes single messages, in groups, and waits for each one's ack on the shared
/// subscription.
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
        route.hold((subject, reply, payload, token))?;
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
        let route = Arc::new(Route::new(inbox));
        tokio::spawn(route.clone().send_groups(self.client.clone()));
        let routing = route.clone();
        tokio::spawn(async move {
            while let Some(ack) = acks.next().await {
                let Some(token) = ack
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|token| token.parse::<u64>().ok())
                else {
                    continue;
                };
                let sender = routing.waiting().remove(&token);
                if let Some(sender) = sender {
                    let _ = sender.send(read_ack(ack.status, &ack.payload));
                }
                routing.answer_came(token);
            }
            routing.ended.store(true, Ordering::Release);
            routing.more.notify_one();
            // Dropping the senders tells every publish still waiting, held ones too.
            routing.held().clear();
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

    /// Groups sent on the live route (for tests).
    #[cfg(test)]
    fn groups(&self) -> u64 {
        self.live()
            .map_or(0, |route| route.groups.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_testkit::{require, NatsServer};

    /// A private nats-server with a stream `name` taking `stored.>`, a client of it and a
    /// router on that client.
    async fn router_on_a_stream(
        name: &str,
    ) -> (
        NatsServer,
        async_nats::Client,
        async_nats::jetstream::Context,
        Arc<AckRouter>,
    ) {
        let server = NatsServer::start().await.expect("nats-server");
        let client = crate::connect(&server.url(), Duration::from_secs(10))
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: name.into(),
            subjects: vec!["stored.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        let router = Arc::new(AckRouter::new(client.clone()));
        (server, client, js, router)
    }

    /// Waits (up to `wait`) until `count` publishes wait for their acks.
    async fn until_waiting(router: &AckRouter, count: usize, wait: Duration) {
        let until = std::time::Instant::now() + wait;
        while router.waiting() < count && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Held publishes are bounded, and a publish whose caller stopped waiting before its
    /// group left is not sent.
    #[test]
    fn held_publishes_are_bounded_and_abandoned_ones_left_out() {
        let route = Route::new("inbox".into());
        let publish = |token: u64| ("s".to_owned(), "r".to_owned(), bytes::Bytes::new(), token);
        for token in 0..MAX_HELD as u64 {
            route.hold(publish(token)).expect("below the bound");
        }
        let refused = route.hold(publish(MAX_HELD as u64));
        assert!(
            refused
                .as_ref()
                .is_err_and(|err| format!("{err:?}").contains("already waiting to be sent")),
            "{refused:?}"
        );
        // Only tokens 5 and 7 still have callers waiting.
        for token in [7, 5] {
            route.waiting().insert(token, oneshot::channel().0);
        }
        let mut group = Vec::new();
        assert_eq!(route.take_group(&mut group), Some(5));
        let tokens: Vec<u64> = group.iter().map(|held| held.3).collect();
        assert_eq!(tokens, [5, 7]);
        assert!(route.held().is_empty());
        route.hold(publish(9)).expect("room again");
    }

    /// Every way a wait ends takes its token out of the table: answered (a stored message, a
    /// subject nobody takes), timed out, or dropped by its caller.
    #[tokio::test]
    async fn needs_nats_a_publish_that_stops_waiting_leaves_no_token_behind() {
        require!(NatsServer);
        let (_server, client, _js, router) = router_on_a_stream("acks-test").await;
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
        until_waiting(&router, 1, wait).await;
        assert_eq!(router.waiting(), 1, "the publish is waiting for its ack");
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(router.waiting(), 0);
    }

    /// Publishes made together go out in a few groups, each answered with its own ack; a
    /// publish whose ack never comes does not hold the ones after it.
    #[tokio::test]
    async fn needs_nats_publishes_made_together_go_out_in_groups() {
        require!(NatsServer);
        let (_server, client, js, router) = router_on_a_stream("groups-test").await;
        let wait = Duration::from_secs(5);

        const MANY: usize = 300;
        let publishes = (0..MANY).map(|i| {
            let router = router.clone();
            tokio::spawn(async move {
                let payload = bytes::Bytes::from(i.to_string());
                router.publish(format!("stored.{i}"), payload, wait).await
            })
        });
        let mut told = Vec::new();
        for (i, answer) in futures::future::join_all(publishes)
            .await
            .into_iter()
            .enumerate()
        {
            match answer.expect("publish task") {
                Ok(Ack::Stored(tally_core::ports::Appended::Accepted { seq, .. })) => {
                    told.push((seq, i))
                }
                other => panic!("every publish stored: {other:?}"),
            }
        }
        told.sort_unstable();
        let seqs: Vec<u64> = told.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=MANY as u64).collect::<Vec<_>>());
        let groups = router.groups();
        assert!(
            (1..MANY as u64 / 2).contains(&groups),
            "{MANY} publishes made at once went out in {groups} groups"
        );
        // Each ack went to its own publish: the message at the seq a publish was told is
        // that publish's.
        let stream = js.get_stream("groups-test").await.expect("stream");
        for (seq, i) in told.iter().step_by(37) {
            let message = stream.get_raw_message(*seq).await.expect("stored message");
            assert_eq!(message.subject.as_str(), format!("stored.{i}"), "seq {seq}");
        }
        assert_eq!(router.waiting(), 0);

        // A publish nobody answers is out; the next one is answered all the same, long
        // before the first gives up.
        let _silent = client.subscribe("silent.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let silent = tokio::spawn({
            let router = router.clone();
            async move { router.publish("silent.a".into(), "x".into(), wait).await }
        });
        until_waiting(&router, 1, wait).await;
        let after = router
            .publish("stored.after".into(), "y".into(), wait)
            .await;
        assert!(
            matches!(after, Ok(Ack::Stored(_))),
            "a publish after an unanswered one: {after:?}"
        );
        assert!(
            !silent.is_finished(),
            "the unanswered publish is still waiting"
        );
        silent.abort();
    }
}
