//! The vote log on a JetStream stream.
//!
//! Subjects are `votes.<partition>.<poll>.<unique_key>`. The stream keeps at most one
//! message per subject and discards new ones per subject, so the broker itself enforces one
//! vote per voter (and one entry per vote id on `dedupe: none` polls) across every ingest
//! replica. `Nats-Msg-Id` = `<poll>/<vote_id>` makes a retry inside the duplicate window an
//! acknowledged duplicate; after the window the per-subject limit still refuses it, and the
//! stored message tells whether it was the same vote.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use super::{jetstream_code, VOTES_STREAM};
use crate::backend::{Appended, LogEntry, LogReader, VoteLog};
use crate::vote::Vote;
use crate::{wire, Error, Result};

/// "maximum messages per subject exceeded": the key already holds a vote.
const ERR_PER_SUBJECT_LIMIT: u64 = 10077;

#[derive(Clone)]
pub struct JetStreamLog {
    js: jetstream::Context,
    partitions: u16,
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub partitions: u16,
    /// How long the broker remembers Msg-Ids for duplicate detection.
    pub duplicate_window: Duration,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: 1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl JetStreamLog {
    /// Opens the stream, creating it when missing.
    pub async fn open(client: async_nats::Client, options: LogOptions) -> Result<Self> {
        let js = jetstream::new(client);
        let config = stream::Config {
            name: VOTES_STREAM.to_owned(),
            subjects: vec!["votes.>".to_owned()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            duplicate_window: options.duplicate_window,
            ..Default::default()
        };
        js.get_or_create_stream(config).await.map_err(Error::bus)?;
        Ok(JetStreamLog {
            js,
            partitions: options.partitions.max(1),
        })
    }

    fn subject(&self, vote: &Vote, unique_key: &str) -> String {
        use std::fmt::Write;
        let mut subject = String::with_capacity(13 + vote.poll_id.len() + unique_key.len());
        let _ = write!(subject, "votes.{}.", self.partition_of(&vote.poll_id));
        subject.push_str(&vote.poll_id);
        subject.push('.');
        subject.push_str(unique_key);
        subject
    }

    /// After a per-subject refusal: the same vote (a late retry) or another voter's vote?
    async fn resolve_conflict(&self, subject: &str, vote: &Vote) -> Result<Appended> {
        let stream = self
            .js
            .get_stream_no_info(VOTES_STREAM)
            .await
            .map_err(Error::bus)?;
        let stored = stream
            .get_last_raw_message_by_subject(subject)
            .await
            .map_err(Error::bus)?;
        let existing = wire::decode(&stored.payload)?;
        if existing.vote_id == vote.vote_id {
            Ok(Appended::Accepted {
                seq: stored.sequence,
                duplicate: true,
            })
        } else {
            Ok(Appended::AlreadyVoted)
        }
    }
}

#[async_trait]
impl VoteLog for JetStreamLog {
    fn partitions(&self) -> u16 {
        self.partitions
    }

    async fn append(&self, vote: &Vote, unique_key: &str) -> Result<Appended> {
        // While the connection is down the client would buffer the publish and the caller
        // would wait out the ack timeout; answer at once instead (the vote is not sent).
        let state = self.js.client().connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(Error::Bus(format!("not connected to NATS ({state})")));
        }
        let mut msg_id = String::with_capacity(vote.poll_id.len() + 1 + vote.vote_id.len());
        msg_id.push_str(&vote.poll_id);
        msg_id.push('/');
        msg_id.push_str(&vote.vote_id);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        let payload = wire::encode(vote).into();
        // The first await hands the message to the connection; the second waits for the
        // stream's ack, which JetStream sends once the message is stored.
        let ack = self
            .js
            .publish_with_headers(self.subject(vote, unique_key), headers, payload)
            .await
            .map_err(Error::bus)?
            .await;
        match ack {
            Ok(ack) => Ok(Appended::Accepted {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(err) if jetstream_code(&err) == Some(ERR_PER_SUBJECT_LIMIT) => {
                self.resolve_conflict(&self.subject(vote, unique_key), vote)
                    .await
            }
            Err(err) => Err(Error::Bus(format!("publish not acknowledged: {err}"))),
        }
    }

    async fn reader(&self, partition: u16, after: u64) -> Result<Box<dyn LogReader>> {
        let stream = self.js.get_stream(VOTES_STREAM).await.map_err(Error::bus)?;
        let name = format!("processor-p{partition}");
        // The durable consumer is recreated at the caller's watermark: the warehouse, not the
        // consumer's ack floor, says where processing stands, and a fresh consumer delivers
        // strictly in order from there.
        if let Err(err) = stream.delete_consumer(&name).await {
            tracing::debug!(consumer = %name, error = %err, "no consumer to delete");
        }
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: format!("votes.{partition}.>"),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ack_policy: consumer::AckPolicy::All,
            ack_wait: Duration::from_secs(600),
            max_deliver: -1,
            max_ack_pending: 1_000_000,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(Error::bus)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(2_000)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(Error::bus)?;
        Ok(Box::new(JetStreamReader {
            messages,
            last: None,
            last_seq: after,
            last_delivery: 0,
        }))
    }

    async fn check(&self) -> Result<()> {
        self.js
            .get_stream_no_info(VOTES_STREAM)
            .await
            .map_err(Error::bus)?;
        Ok(())
    }
}

/// How long a batch may keep growing after its first entry.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// A pause between entries this long ends a batch.
const BATCH_GAP: Duration = Duration::from_millis(5);

struct JetStreamReader {
    messages: consumer::pull::Stream,
    /// The newest delivered message, kept so `commit` can ack it (ack policy "all").
    last: Option<jetstream::Message>,
    last_seq: u64,
    /// The consumer's delivery number of the newest message taken (0: none yet).
    last_delivery: u64,
}

impl JetStreamReader {
    /// Takes one delivered message into `batch`, or fails when a delivery is missing.
    ///
    /// The consumer numbers its deliveries 1, 2, 3, … (redeliveries included). A number
    /// that is not the next one means a delivery never arrived — typically it was in flight
    /// when the connection dropped, and the consumer will only redeliver it after
    /// `ack_wait` — or that an old one is being redelivered. Going on would pass over an
    /// entry and the watermark would then skip it for good, so the reader fails instead and
    /// the processor reopens it at its watermark, which delivers strictly in order again.
    fn accept(&mut self, message: jetstream::Message, batch: &mut Vec<LogEntry>) -> Result<()> {
        let info = message.info().map_err(Error::bus)?;
        let (seq, delivery) = (info.stream_sequence, info.consumer_sequence);
        if delivery != self.last_delivery + 1 || seq <= self.last_seq {
            return Err(Error::Bus(format!(
                "delivery {delivery} (entry {seq}) after delivery {} (entry {}): a delivery \
                 was lost or repeated; reopening at the watermark",
                self.last_delivery, self.last_seq
            )));
        }
        self.last_delivery = delivery;
        self.last_seq = seq;
        batch.push(LogEntry {
            seq,
            payload: message.payload.clone(),
        });
        self.last = Some(message);
        Ok(())
    }
}

#[async_trait]
impl LogReader for JetStreamReader {
    async fn next_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<LogEntry>> {
        let mut batch = Vec::new();
        let first = match tokio::time::timeout(wait, self.messages.next()).await {
            Err(_elapsed) => return Ok(batch),
            Ok(None) => return Err(Error::Bus("consumer stream ended".into())),
            Ok(Some(Err(err))) => return Err(Error::Bus(format!("consumer: {err}"))),
            Ok(Some(Ok(message))) => message,
        };
        self.accept(first, &mut batch)?;
        // Keep taking while entries keep coming, so batches grow with the load: the pull
        // hands over ~100 messages at a time, and a batch of 100 costs as many warehouse
        // round trips as one of 10,000. A 5 ms gap ends the batch, and it never lingers
        // longer than BATCH_LINGER in all.
        let linger_until = tokio::time::Instant::now() + BATCH_LINGER;
        while batch.len() < max {
            let next = match self.messages.next().now_or_never() {
                Some(next) => next,
                None => {
                    let left = linger_until.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match tokio::time::timeout(left.min(BATCH_GAP), self.messages.next()).await {
                        Ok(next) => next,
                        Err(_gap) => break,
                    }
                }
            };
            match next {
                Some(Ok(message)) => self.accept(message, &mut batch)?,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "consumer error while draining a batch");
                    break;
                }
                None => break,
            }
        }
        Ok(batch)
    }

    async fn commit(&mut self, seq: u64) -> Result<()> {
        let Some(message) = self
            .last
            .take_if(|m| m.info().map(|i| i.stream_sequence == seq).unwrap_or(false))
        else {
            return Ok(());
        };
        message
            .ack()
            .await
            .map_err(|e| Error::Bus(format!("ack: {e}")))
    }
}
