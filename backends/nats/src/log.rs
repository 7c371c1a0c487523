//! The vote log on a JetStream stream.
//!
//! Subjects are `votes.<partition>.<poll>.<unique_key>`. The stream keeps at most one
//! message per subject and discards new ones per subject, so the broker itself enforces one
//! vote per voter (and one entry per vote id on `dedupe: none` polls) across every ingest
//! replica. A retry is refused by the same limit, and the stored message tells whether it
//! was the same vote (the original's answer) or another one (already voted). Publishes
//! carry no `Nats-Msg-Id`: the per-subject limit already makes retries idempotent at any
//! age, and a duplicate window would cost the broker a remembered id per vote (at 100k
//! votes/s and the default 2 minutes, 12M of them) and a fifth of its CPU per publish.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use crate::acks::AckRouter;
use crate::layout::StreamLayout;
use tally_core::ports::{Appended, LogEntry, LogReader, LogRetention, VoteLog};
use tally_core::vote::Vote;
use tally_core::{wire, Error, Result};

/// "maximum messages per subject exceeded": the key already holds a vote.
const ERR_PER_SUBJECT_LIMIT: u64 = 10077;

/// How long a publish may wait for the stream's ack (JetStream's own default).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes of one [`VoteLog::append_many`] that share one reply subscription; far below
/// the client's per-subscription buffer, so no ack is dropped as a slow consumer's.
pub const ACKS_PER_SUBSCRIPTION: usize = 4096;

#[derive(Clone)]
pub struct JetStreamLog {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Which stream holds each partition.
    layout: StreamLayout,
    /// Single appends' acks, on one reply subscription ([`crate::acks`]).
    acks: std::sync::Arc<AckRouter>,
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub partitions: u16,
    /// Copies of the stream a NATS cluster keeps (1, 3 or 5): with 3, the stream outlives
    /// one server. A stream found with fewer is refused; one with more is kept as it is.
    pub replicas: usize,
    /// Partitions to a stream (0: all in one stream, `VOTES`); see [`StreamLayout`].
    pub per_stream: u16,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: 1,
            replicas: 1,
            per_stream: 0,
        }
    }
}

/// The stream's metadata key holding the partition count its votes were written with.
pub const PARTITIONS_METADATA: &str = "tally.partitions";

impl JetStreamLog {
    /// Opens the log's streams, creating those missing, and refuses one whose shape would
    /// break a guarantee (see [`check_shape`]).
    pub async fn open(client: async_nats::Client, options: LogOptions) -> Result<Self> {
        let js = jetstream::new(client);
        let layout = StreamLayout::new(options.partitions, options.per_stream);
        let replicas = options.replicas.max(1);
        // Streams found first: a missing one is made to number its votes after all of theirs.
        let mut found = Vec::new();
        for stream in 0..layout.streams() {
            found.push(existing_stream(&js, &layout.name(stream)).await?);
        }
        let newest = found
            .iter()
            .flatten()
            .map(|stream| stream.cached_info().state.last_sequence)
            .max();
        // Every stream found is checked before any is made: a log laid out otherwise is
        // refused as it is, with nothing added to it.
        for (index, stream) in (0..).zip(&found) {
            if let Some(stream) = stream {
                check_stream(stream, &layout, index, replicas).await?;
            }
        }
        for (index, existing) in (0..).zip(found) {
            if existing.is_none() {
                let mut config = stream_config(&layout, index, replicas);
                config.first_sequence = newest.filter(|&seq| seq > 0).map(|seq| seq + 1);
                let stream = js
                    .get_or_create_stream(config)
                    .await
                    .map_err(|e| Error::unavailable("vote log", e))?;
                check_stream(&stream, &layout, index, replicas).await?;
            }
        }
        Ok(JetStreamLog {
            client: js.client(),
            acks: std::sync::Arc::new(AckRouter::new(js.client())),
            js,
            layout,
        })
    }

    /// The votes each of the log's streams holds now, by name.
    pub async fn held_per_stream(&self) -> Result<Vec<(String, u64)>> {
        let mut held = Vec::new();
        for name in self.layout.names() {
            let stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| Error::unavailable("vote log", e))?;
            held.push((name, stream.cached_info().state.messages));
        }
        Ok(held)
    }

    fn subject(&self, vote: &Vote, unique_key: &str) -> String {
        Self::subject_in(self.placement(&vote.poll_id, unique_key), vote, unique_key)
    }

    /// The subject of `vote` in `partition`.
    fn subject_in(partition: u16, vote: &Vote, unique_key: &str) -> String {
        let mut subject = String::with_capacity(13 + vote.poll_id.len() + unique_key.len());
        subject.push_str("votes.");
        subject.push_str(itoa::Buffer::new().format(partition));
        subject.push('.');
        subject.push_str(&vote.poll_id);
        subject.push('.');
        subject.push_str(unique_key);
        subject
    }

    /// Fails at once while the connection is down: the client would buffer a publish and
    /// the caller would wait out the ack timeout for a vote that was never sent.
    fn disconnected(&self) -> Option<String> {
        let state = self.client.connection_state();
        (state != async_nats::connection::State::Connected)
            .then(|| format!("not connected to NATS ({state})"))
    }

    /// Publishes `votes` together ([`publish_together`]); a vote the per-subject limit
    /// refused is resolved against the stored one.
    async fn publish_votes(&self, votes: &[(Vote, String)]) -> Vec<Result<Appended>> {
        let messages = votes
            .iter()
            .map(|(vote, unique_key)| (self.subject(vote, unique_key), wire::encode(vote).into()))
            .collect();
        let mut taken = Vec::new();
        let mut answers: Vec<Result<Appended>> = publish_together(&self.client, messages)
            .await
            .into_iter()
            .enumerate()
            .map(|(i, ack)| match ack? {
                Ack::Stored(appended) => Ok(appended),
                Ack::SubjectTaken => {
                    taken.push(i);
                    Ok(Appended::AlreadyVoted)
                }
            })
            .collect();
        let resolved: Vec<(usize, Result<Appended>)> = futures::stream::iter(taken)
            .map(|i| {
                let (vote, unique_key) = &votes[i];
                async move { (i, self.resolve_conflict(vote, unique_key).await) }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        for (i, answer) in resolved {
            answers[i] = answer;
        }
        answers
    }

    /// After a per-subject refusal: the same vote (a late retry), the same vote id with
    /// another ballot, or another vote of the voter?
    async fn resolve_conflict(&self, vote: &Vote, unique_key: &str) -> Result<Appended> {
        self.held(vote, unique_key).await?.ok_or_else(|| {
            Error::unavailable(
                "vote log",
                format!(
                    "{} refused a vote as taken and then held none",
                    self.subject(vote, unique_key)
                ),
            )
        })
    }

    /// What the log holds under the subject of `vote`, as the answer for it.
    async fn held(&self, vote: &Vote, unique_key: &str) -> Result<Option<Appended>> {
        let partition = self.placement(&vote.poll_id, unique_key);
        let subject = Self::subject_in(partition, vote, unique_key);
        let Some(stored) = self.last_of(partition, &subject).await? else {
            return Ok(None);
        };
        let existing = wire::decode(&stored.payload)?;
        Ok(Some(Appended::for_taken_key(
            &existing,
            vote,
            stored.sequence,
        )))
    }

    /// The newest message of the subjects `filter` (of `partition`; it may hold wildcards)
    /// matches.
    async fn last_of(
        &self,
        partition: u16,
        filter: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>> {
        let stream = self
            .js
            .get_stream_no_info(self.layout.name_of(partition))
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(stored) => Ok(Some(stored)),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(Error::unavailable("vote log", err)),
        }
    }

    /// The subjects of every vote of a poll in `partition`.
    fn poll_subjects(poll_id: &str, partition: u16) -> String {
        format!("votes.{partition}.{poll_id}.>")
    }
}

/// [`check_shape`], and for a stream made before its partition count was recorded,
/// [`check_partitions_by_sample`].
async fn check_stream(
    stream: &stream::Stream,
    layout: &StreamLayout,
    index: u16,
    replicas: usize,
) -> Result<()> {
    let info = stream.cached_info();
    check_shape(&info.config, layout, index, replicas)?;
    if !info.config.metadata.contains_key(PARTITIONS_METADATA) && info.state.messages > 0 {
        check_partitions_by_sample(stream, &info.state, layout.partitions()).await?;
    }
    Ok(())
}

/// Refuses stream `stream` of `layout` when its settings break what tally promises, saying
/// how to fix it: one message per subject, new ones refused per subject and nothing
/// expiring (one vote per voter), the vote subjects the layout gives it, at least the
/// configured replicas, and the partition count the votes were written with (a poll's
/// subject depends on it, so a voter moved to another partition could vote again).
pub fn check_shape(
    config: &stream::Config,
    layout: &StreamLayout,
    stream: u16,
    replicas: usize,
) -> Result<()> {
    let name = layout.name(stream);
    let partitions = layout.partitions();
    let refuse = |what: String| {
        Err(Error::failed(
            "vote log",
            format!(
                "the stream {name} {what}. One vote per voter depends on the \
                 stream's shape; see docs/OPERATIONS.md, \"The broker's shape\""
            ),
        ))
    };
    if let Some(written) = config.metadata.get(PARTITIONS_METADATA) {
        if written.parse::<u16>().ok() != Some(partitions) {
            return refuse(format!(
                "holds votes written with {written} partitions (its metadata \
                 `{PARTITIONS_METADATA}`) and this service has TALLY_PARTITIONS={partitions}: \
                 set TALLY_PARTITIONS={written} on every service"
            ));
        }
    }
    let wanted = layout.subjects(stream);
    let subjects_fit = if layout.streams() == 1 {
        config.subjects.iter().any(|s| s == "votes.>")
    } else {
        let mut found = config.subjects.clone();
        found.sort();
        let mut wanted = wanted.clone();
        wanted.sort();
        found == wanted
    };
    if !subjects_fit {
        // Subjects tally gives a stream, with one layout or another.
        let laid_out = !config.subjects.is_empty()
            && config.subjects.iter().all(|subject| {
                subject == "votes.>"
                    || subject
                        .strip_prefix("votes.")
                        .and_then(|rest| rest.strip_suffix(".>"))
                        .is_some_and(|partition| partition.parse::<u16>().is_ok())
            });
        if !laid_out {
            let quoted: Vec<String> = wanted.iter().map(|s| format!("'{s}'")).collect();
            return refuse(format!(
                "takes the subjects {:?}, not {wanted:?}: \
                 `nats stream edit {name} --subjects {}`",
                config.subjects,
                quoted.join(" ")
            ));
        }
        let per_stream = match layout.streams() {
            1 => " unset (one stream)".to_owned(),
            _ => format!("={}", layout.per_stream()),
        };
        return refuse(format!(
            "takes the subjects {:?} where this service, with TALLY_PARTITIONS={partitions} \
             and TALLY_PARTITIONS_PER_STREAM{per_stream}, would put {wanted:?} in it: start \
             every service with the partitions per stream the log was made with, or change \
             them with `tally repartition --to N --partitions-per-stream K` once the log is empty",
            config.subjects
        ));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return refuse(format!(
            "has the retention policy {:?}, which deletes votes once read; tally needs \
             `limits`, which a stream cannot change to: move the votes to a new stream",
            config.retention
        ));
    }
    if config.max_messages_per_subject != 1 {
        return refuse(format!(
            "keeps {} messages per subject where tally needs 1: \
             `nats stream edit {name} --max-msgs-per-subject 1`",
            config.max_messages_per_subject
        ));
    }
    if config.discard != stream::DiscardPolicy::New || !config.discard_new_per_subject {
        return refuse(format!(
            "replaces a voter's stored vote with a new one (discard {:?}, per subject {}) \
             where tally needs new votes refused: \
             `nats stream edit {name} --discard new --discard-per-subject`",
            config.discard, config.discard_new_per_subject
        ));
    }
    if !config.max_age.is_zero() {
        return refuse(format!(
            "lets votes expire after {:?}, after which their voters could vote again: \
             `nats stream edit {name} --max-age 0`",
            config.max_age
        ));
    }
    super::check_replicas("vote log", &name, config.num_replicas, replicas)
}

/// The configuration tally creates stream `stream` of `layout` with.
pub(crate) fn stream_config(layout: &StreamLayout, stream: u16, replicas: usize) -> stream::Config {
    stream::Config {
        name: layout.name(stream),
        subjects: layout.subjects(stream),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        num_replicas: replicas,
        metadata: [(
            PARTITIONS_METADATA.to_owned(),
            layout.partitions().to_string(),
        )]
        .into(),
        ..Default::default()
    }
}

/// The stream `name`, or `None` when the server has no such stream; any other failure is
/// the server's.
pub(crate) async fn existing_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(err)
            if matches!(
                err.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(err) => Err(Error::unavailable("vote log", err)),
    }
}

/// For a stream made before its partition count was recorded: its first and last votes
/// must sit on the partition `partitions` gives their poll. A service that may not read
/// messages back (the processor, under docs/nats' permissions) skips this.
async fn check_partitions_by_sample(
    stream: &stream::Stream,
    state: &stream::State,
    partitions: u16,
) -> Result<()> {
    for seq in [state.first_sequence, state.last_sequence] {
        let message = match stream
            .get_first_raw_message_by_subject("votes.>", seq)
            .await
        {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(seq, error = %err, "cannot read a vote back to check the partition count");
                return Ok(());
            }
        };
        let mut parts = message.subject.splitn(4, '.');
        let (Some(_), Some(stored), Some(poll), Some(key)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let wanted = tally_core::ports::placement(poll, key, partitions);
        if stored.parse::<u16>().ok() != Some(wanted) {
            return Err(Error::failed(
                "vote log",
                format!(
                    "the stream {} holds a vote of poll `{poll}` in partition \
                     {stored}, and TALLY_PARTITIONS={partitions} puts that vote in partition \
                     {wanted}: its voters could vote again. Set TALLY_PARTITIONS to the count \
                     the votes were written with on every service (docs/OPERATIONS.md, \
                     \"The broker's shape\")",
                    stream.cached_info().config.name
                ),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl VoteLog for JetStreamLog {
    fn partitions(&self) -> u16 {
        self.layout.partitions()
    }

    async fn append(&self, vote: &Vote, unique_key: &str) -> Result<Appended> {
        if let Some(why) = self.disconnected() {
            return Err(Error::unavailable("vote log", why));
        }
        let payload = wire::encode(vote).into();
        let ack = self
            .acks
            .publish(self.subject(vote, unique_key), payload, ACK_TIMEOUT)
            .await?;
        match ack {
            Ack::Stored(appended) => Ok(appended),
            Ack::SubjectTaken => self.resolve_conflict(vote, unique_key).await,
        }
    }

    async fn append_many(&self, votes: &[(Vote, String)]) -> Vec<Result<Appended>> {
        if votes.len() == 1 {
            return vec![self.append(&votes[0].0, &votes[0].1).await];
        }
        if let Some(why) = self.disconnected() {
            return votes
                .iter()
                .map(|_| Err(Error::unavailable("vote log", why.clone())))
                .collect();
        }
        let parts = votes
            .chunks(ACKS_PER_SUBSCRIPTION)
            .map(|part| self.publish_votes(part));
        futures::future::join_all(parts)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn find(&self, vote: &Vote, unique_key: &str) -> Result<Option<Appended>> {
        self.held(vote, unique_key).await
    }

    fn retention(&self) -> Option<&dyn LogRetention> {
        Some(self)
    }

    async fn reader(&self, partition: u16, after: u64) -> Result<Box<dyn LogReader>> {
        let stream = self
            .js
            .get_stream(self.layout.name_of(partition))
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        let last = stream.cached_info().state.last_sequence;
        if after > last {
            // Reading on would skip every vote numbered up to `after`.
            return Err(Error::failed(
                "vote log",
                format!(
                    "partition {partition} is counted up to entry {after}, and its stream {} \
                     has numbered only {last}: the stream was made anew (deleted by hand, or \
                     another broker) and its new votes would be passed over. Restore the \
                     stream, or give it a first sequence above {after} (docs/OPERATIONS.md, \
                     \"The broker's shape\")",
                    self.layout.name_of(partition)
                ),
            ));
        }
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
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(2_000)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        Ok(Box::new(JetStreamReader {
            consumer,
            messages,
            last: None,
            last_seq: after,
            last_delivery: 0,
        }))
    }

    async fn check(&self) -> Result<()> {
        for name in self.layout.names() {
            self.js
                .get_stream_no_info(name)
                .await
                .map_err(|e| Error::unavailable("vote log", e))?;
        }
        Ok(())
    }
}

/// The stream keeps an index entry per subject, so every vote ever stored costs the broker
/// memory; a closed poll's subjects are purged once its votes are counted.
#[async_trait]
impl LogRetention for JetStreamLog {
    async fn poll_tip(&self, poll_id: &str, partition: u16) -> Result<Option<u64>> {
        Ok(self
            .last_of(partition, &Self::poll_subjects(poll_id, partition))
            .await?
            .map(|stored| stored.sequence))
    }

    async fn purge_poll(&self, poll_id: &str, partition: u16, through: u64) -> Result<u64> {
        let stream = self
            .js
            .get_stream_no_info(self.layout.name_of(partition))
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        let purged = stream
            .purge()
            .filter(Self::poll_subjects(poll_id, partition))
            // JetStream purges below this sequence.
            .sequence(through + 1)
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        Ok(purged.purged)
    }
}

/// Whether a delivery `(number, entry)` may follow the last one taken: the next delivery
/// number, and an entry after the last one (entries of a filtered consumer may skip).
fn in_order((last_delivery, last_seq): (u64, u64), (delivery, seq): (u64, u64)) -> Result<()> {
    if delivery != last_delivery + 1 || seq <= last_seq {
        return Err(Error::unavailable(
            "vote log",
            format!(
                "delivery {delivery} (entry {seq}) after delivery {last_delivery} (entry \
             {last_seq}): a delivery was lost or repeated; reopening at the watermark"
            ),
        ));
    }
    Ok(())
}

/// Publishes each `(subject, payload)` to JetStream with one reply subscription for all
/// their acks: reply subjects `<inbox>.<index>`, one deadline ([`ACK_TIMEOUT`]) for the lot.
/// The client's request path would create a response channel, two timers and a boxed
/// future per message; here the acks arrive on one stream and are read in place. Returns
/// what the stream answered to each message, in order. Keep a call within
/// [`ACKS_PER_SUBSCRIPTION`] messages, below the client's buffer for one subscription.
pub async fn publish_together(
    client: &async_nats::Client,
    messages: Vec<(String, bytes::Bytes)>,
) -> Vec<Result<Ack>> {
    use std::fmt::Write;
    let mut answers: Vec<Option<Result<Ack>>> = messages.iter().map(|_| None).collect();
    let inbox = client.new_inbox();
    let mut acks = match client.subscribe(format!("{inbox}.*")).await {
        Ok(acks) => acks,
        Err(err) => {
            return messages
                .iter()
                .map(|_| {
                    Err(Error::unavailable(
                        "vote log",
                        format!("subscribe to acks: {err}"),
                    ))
                })
                .collect()
        }
    };
    let mut waiting = 0;
    for (i, (subject, payload)) in messages.into_iter().enumerate() {
        let mut reply = String::with_capacity(inbox.len() + 6);
        reply.push_str(&inbox);
        let _ = write!(reply, ".{i}");
        match client.publish_with_reply(subject, reply, payload).await {
            Ok(()) => waiting += 1,
            Err(err) => {
                answers[i] = Some(Err(Error::unavailable(
                    "vote log",
                    format!("publish: {err}"),
                )))
            }
        }
    }
    let deadline = tokio::time::sleep(ACK_TIMEOUT);
    tokio::pin!(deadline);
    while waiting > 0 {
        let ack = tokio::select! {
            biased;
            ack = acks.next() => match ack {
                Some(ack) => ack,
                None => break,
            },
            () = &mut deadline => break,
        };
        let index = ack.subject.rsplit('.').next().and_then(|i| i.parse().ok());
        let Some(i) = index.filter(|&i: &usize| answers.get(i).is_some_and(Option::is_none)) else {
            continue;
        };
        waiting -= 1;
        answers[i] = Some(read_ack(ack.status, &ack.payload));
    }
    answers
        .into_iter()
        .map(|answer| {
            answer.unwrap_or_else(|| {
                Err(Error::unavailable(
                    "vote log",
                    format!("publish not acknowledged within {ACK_TIMEOUT:?}"),
                ))
            })
        })
        .collect()
}

/// What the stream answered to a publish it took or refused on purpose.
#[derive(Debug, PartialEq)]
pub enum Ack {
    Stored(Appended),
    /// The per-subject limit refused it: the subject already holds a message.
    SubjectTaken,
}

/// Reads a JetStream publish ack: `{"stream":…,"seq":N[,"duplicate":true]}` or
/// `{"error":{"code":…,"err_code":…,"description":…}}`.
pub(crate) fn read_ack(status: Option<async_nats::StatusCode>, payload: &[u8]) -> Result<Ack> {
    #[derive(serde::Deserialize)]
    struct Reply<'a> {
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
        #[serde(borrow)]
        error: Option<ReplyError<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct ReplyError<'a> {
        #[serde(default)]
        err_code: u64,
        #[serde(borrow, default)]
        description: std::borrow::Cow<'a, str>,
    }
    let failed = |why: String| {
        Err(Error::unavailable(
            "vote log",
            format!("publish not acknowledged: {why}"),
        ))
    };
    if status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return failed("no stream takes the vote's subject".to_owned());
    }
    match serde_json::from_slice::<Reply>(payload) {
        Ok(Reply {
            error: Some(error), ..
        }) if error.err_code == ERR_PER_SUBJECT_LIMIT => Ok(Ack::SubjectTaken),
        Ok(Reply {
            error: Some(error), ..
        }) => failed(format!("{} ({})", error.description, error.err_code)),
        Ok(Reply {
            seq: Some(seq),
            duplicate,
            ..
        }) => Ok(Ack::Stored(Appended::Accepted { seq, duplicate })),
        Ok(_) => failed("an ack without a sequence".into()),
        Err(err) => failed(format!("unreadable ack: {err}")),
    }
}

/// How long a batch may keep growing after its first entry.
const BATCH_LINGER: Duration = Duration::from_millis(50);
/// A pause between entries this long ends a batch.
const BATCH_GAP: Duration = Duration::from_millis(5);

struct JetStreamReader {
    /// The consumer itself, asked for its pending counts.
    consumer: consumer::PullConsumer,
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
        let info = message
            .info()
            .map_err(|e| Error::unavailable("vote log", e))?;
        let (seq, delivery) = (info.stream_sequence, info.consumer_sequence);
        in_order((self.last_delivery, self.last_seq), (delivery, seq))?;
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
            Ok(None) => return Err(Error::unavailable("vote log", "consumer stream ended")),
            Ok(Some(Err(err))) => {
                return Err(Error::unavailable("vote log", format!("consumer: {err}")))
            }
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

    /// Not yet delivered, plus delivered and not acked (fetched ahead into the client's
    /// buffer, or processed and not yet committed).
    async fn pending(&mut self) -> Result<u64> {
        let info = self
            .consumer
            .info()
            .await
            .map_err(|e| Error::unavailable("vote log", e))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
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
            .map_err(|e| Error::unavailable("vote log", format!("ack: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_must_come_one_after_another() {
        // The first delivery of a consumer opened after entry 10.
        assert!(in_order((0, 10), (1, 11)).is_ok());
        // Entries of other partitions are filtered out: entry numbers may skip.
        assert!(in_order((1, 11), (2, 15)).is_ok());
        // A delivery lost (say, in flight when the connection dropped).
        let lost = in_order((2, 15), (4, 17)).unwrap_err();
        let lost = lost.chain().to_string();
        assert!(lost.contains("lost or repeated"), "{lost}");
        // A redelivery: the number moves on, the entry does not.
        assert!(in_order((2, 15), (3, 15)).is_err());
        assert!(in_order((2, 15), (3, 12)).is_err());
        // The same delivery twice.
        assert!(in_order((2, 15), (2, 15)).is_err());
    }

    #[test]
    fn reads_publish_acks() {
        assert_eq!(
            read_ack(None, br#"{"stream":"VOTES","seq":42}"#).unwrap(),
            Ack::Stored(Appended::Accepted {
                seq: 42,
                duplicate: false
            })
        );
        assert_eq!(
            read_ack(
                None,
                br#"{"stream":"VOTES","domain":"hub","seq":7,"duplicate":true}"#
            )
            .unwrap(),
            Ack::Stored(Appended::Accepted {
                seq: 7,
                duplicate: true
            })
        );
        assert_eq!(
            read_ack(
                None,
                br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages per subject exceeded"},"stream":"VOTES","seq":0}"#
            )
            .unwrap(),
            Ack::SubjectTaken
        );
        let refused = read_ack(
            None,
            br#"{"error":{"code":503,"err_code":10039,"description":"insufficient resources"}}"#,
        )
        .unwrap_err();
        let refused = refused.chain().to_string();
        assert!(
            refused.ends_with("publish not acknowledged: insufficient resources (10039)"),
            "{refused}"
        );
        assert!(read_ack(Some(async_nats::StatusCode::NO_RESPONDERS), b"").is_err());
        assert!(read_ack(None, b"{}").is_err());
        assert!(read_ack(None, b"not json").is_err());
    }
}
