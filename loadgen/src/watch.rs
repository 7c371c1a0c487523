//! The load's own live subscribers: one SSE stream per poll for the whole run, opened again
//! whenever it drops. They check that a poll's totals never go back (each reconnect starts
//! with a snapshot, which must not be lower than what came before) and end at the truth,
//! and time how long an accepted vote of the first poll takes to show.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tally_core::results::Results;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::truth::Truth;

/// What the streams showed, over every poll.
#[derive(Serialize, Clone, Default, Debug)]
pub struct LiveSummary {
    pub events: u64,
    /// Streams that dropped and were opened again (each reconnect starts with a snapshot).
    pub reconnects: u64,
    /// Totals lower than one the same poll's stream showed before.
    pub went_backwards: u64,
    pub backwards_examples: Vec<String>,
    /// Every poll's stream ended showing the accepted count.
    pub ended_at_truth: bool,
}

/// What the stream of one poll has shown.
#[derive(Default)]
struct Watched {
    events: u64,
    reconnects: u64,
    went_backwards: u64,
    examples: Vec<String>,
    highest: u64,
    last: u64,
}

impl Watched {
    fn saw(&mut self, url: &str, total: u64) {
        self.events += 1;
        if total < self.highest {
            self.went_backwards += 1;
            if self.examples.len() < 5 {
                self.examples
                    .push(format!("{url}: {total} after {}", self.highest));
            }
        }
        self.highest = self.highest.max(total);
        self.last = total;
    }
}

/// A total the first poll's stream showed, and when it arrived.
type Sighting = (Instant, u64);

/// The subscribers of a run; dropping it ends them.
pub struct Watchers {
    polls: Vec<(String, Arc<Mutex<Watched>>)>,
    seen: mpsc::UnboundedReceiver<Sighting>,
    tasks: JoinSet<()>,
}

impl Watchers {
    /// Subscribes to each poll's live stream; the first poll's sightings are kept for
    /// vote→live latency.
    pub fn start(http: &reqwest::Client, query_url: &str, polls: &[String]) -> Watchers {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        let polls: Vec<_> = polls
            .iter()
            .enumerate()
            .map(|(i, poll)| {
                let state = Arc::new(Mutex::new(Watched::default()));
                tasks.spawn(watch_poll(
                    http.clone(),
                    format!("{query_url}/v1/polls/{poll}/live"),
                    state.clone(),
                    (i == 0).then(|| seen_tx.clone()),
                ));
                (poll.clone(), state)
            })
            .collect();
        Watchers { polls, seen, tasks }
    }

    /// Waits (up to `wait`) until every stream shows its poll's accepted count, then ends
    /// the streams. `acks` are the times the first poll's votes were acknowledged; each
    /// is matched with the first total that included it.
    pub async fn finish(
        mut self,
        truth: &Truth,
        mut acks: Vec<Instant>,
        wait: Duration,
    ) -> (LiveSummary, Vec<u64>) {
        let until = Instant::now() + wait;
        let ended_at_truth = loop {
            let at_truth = self.polls.iter().all(|(poll, state)| {
                let want = truth.polls.get(poll).map_or(0, |p| p.accepted);
                state.lock().expect("watch").last == want
            });
            if at_truth || Instant::now() > until {
                break at_truth;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Give the first stream a moment past the final count before it ends.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.tasks.shutdown().await;

        let mut live = LiveSummary {
            ended_at_truth,
            ..Default::default()
        };
        for (_, state) in &self.polls {
            let state = state.lock().expect("watch");
            live.events += state.events;
            live.reconnects += state.reconnects;
            live.went_backwards += state.went_backwards;
            live.backwards_examples
                .extend(state.examples.iter().cloned());
        }
        let mut seen = Vec::new();
        while let Ok(sighting) = self.seen.try_recv() {
            seen.push(sighting);
        }
        acks.sort_unstable();
        (live, visible_after_us(&acks, &seen))
    }
}

/// Microseconds from each acknowledgement (`acks`, sorted) until the stream showed a total
/// that includes it: the i-th acknowledged vote is in the first total of at least i + 1.
/// Sorted; votes never seen are left out.
fn visible_after_us(acks: &[Instant], seen: &[Sighting]) -> Vec<u64> {
    let mut seen = seen.to_vec();
    // A reconnect replays a snapshot: keep each total's first sighting only.
    seen.dedup_by_key(|sighting| sighting.1);
    let mut visible = Vec::with_capacity(acks.len());
    let mut next = 0;
    for (i, acked) in acks.iter().enumerate() {
        while next < seen.len() && seen[next].1 < i as u64 + 1 {
            next += 1;
        }
        let Some((arrived, _)) = seen.get(next) else {
            break;
        };
        visible.push(arrived.saturating_duration_since(*acked).as_micros() as u64);
    }
    visible.sort_unstable();
    visible
}

/// Follows one poll's live stream until the task is ended, opening it again whenever it
/// drops.
async fn watch_poll(
    http: reqwest::Client,
    url: String,
    state: Arc<Mutex<Watched>>,
    seen: Option<mpsc::UnboundedSender<Sighting>>,
) {
    let mut connected_before = false;
    loop {
        let response = http
            .get(&url)
            .timeout(Duration::from_secs(86_400))
            .send()
            .await;
        if let Ok(response) = response.and_then(|r| r.error_for_status()) {
            if connected_before {
                state.lock().expect("watch").reconnects += 1;
            }
            connected_before = true;
            let mut body = response.bytes_stream();
            let mut events = EventReader::default();
            while let Some(Ok(chunk)) = body.next().await {
                let arrived = Instant::now();
                for total in events.totals(&chunk) {
                    state.lock().expect("watch").saw(&url, total);
                    if let Some(seen) = &seen {
                        let _ = seen.send((arrived, total));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Splits an SSE byte stream into events and reads the poll totals out of their data.
#[derive(Default)]
struct EventReader {
    /// Bytes of an event whose end has not arrived yet.
    pending: Vec<u8>,
}

impl EventReader {
    /// The `total_votes` of every [`Results`] event (`snapshot`, `totals`) the chunk
    /// completes; other events (`closed`) and heartbeats are passed over.
    fn totals(&mut self, chunk: &[u8]) -> Vec<u64> {
        self.pending.extend_from_slice(chunk);
        let mut totals = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                if let Ok(results) = serde_json::from_str::<Results>(data.trim()) {
                    totals.push(results.total_votes);
                }
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results_event(kind: &str, total: u64) -> String {
        let results = serde_json::json!({
            "poll_id": "p", "kind": "single", "status": "open", "total_votes": total,
            "unique_voters": total, "options": [], "as_of": total,
            "updated_at": "2025-01-01T00:00:00Z",
        });
        format!("event: {kind}\nid: {total}\ndata: {results}\n\n")
    }

    #[test]
    fn totals_are_read_from_events_split_anywhere() {
        let stream = [
            results_event("snapshot", 3),
            ": heartbeat\n\n".to_owned(),
            "event: closed\ndata: {\"poll_id\":\"p\",\"status\":\"closed\"}\n\n".to_owned(),
            results_event("totals", 7),
        ]
        .concat();
        for cut in [1, 10, stream.len() / 2, stream.len() - 1] {
            let mut reader = EventReader::default();
            let (head, tail) = stream.as_bytes().split_at(cut);
            let mut totals = reader.totals(head);
            totals.extend(reader.totals(tail));
            assert_eq!(totals, [3, 7], "cut at {cut}");
        }
    }

    #[test]
    fn a_total_lower_than_one_shown_before_counts_as_going_back() {
        let mut watched = Watched::default();
        for total in [5, 9, 9, 7, 10] {
            watched.saw("url", total);
        }
        assert_eq!(watched.events, 5);
        assert_eq!(watched.went_backwards, 1);
        assert_eq!(watched.examples, ["url: 7 after 9"]);
        assert_eq!(watched.last, 10);
    }

    #[test]
    fn each_vote_is_visible_with_the_first_total_that_includes_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let acks = [at(0), at(10), at(20)];
        // A reconnect replays 2 (its later sighting does not count); the third vote is
        // never shown.
        let seen = [(at(5), 1), (at(30), 2), (at(40), 2)];
        assert_eq!(visible_after_us(&acks, &seen), [5_000, 20_000]);
    }
}
