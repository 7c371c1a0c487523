//! The ground truth — what the accepted votes add up to — and the check of `/results`
//! against it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tally_core::results::Results;
use tally_core::vote::VoteRequest;

use crate::mix::SegmentMix;
use crate::vote::SyntheticVote;

/// What the accepted votes add up to (`--truth` writes it as JSON).
#[derive(Serialize, Default)]
pub struct Truth {
    pub polls: BTreeMap<String, PollTruth>,
    /// Every accepted vote as it was sent (with `poll_id`), in no particular order; only
    /// kept when `--truth` asks for it.
    pub votes: Vec<VoteRequest>,
}

#[derive(Serialize, Default)]
pub struct PollTruth {
    pub accepted: u64,
    pub options: BTreeMap<String, u64>,
    /// dimension → value → option → votes.
    pub segments: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
}

impl Truth {
    pub fn new(polls: &[String]) -> Truth {
        Truth {
            polls: polls
                .iter()
                .map(|p| (p.clone(), PollTruth::default()))
                .collect(),
            votes: Vec::new(),
        }
    }

    /// Counts an accepted vote of the poll `poll_id`, and keeps it when `keep`. Called once
    /// per accepted vote: keys are allocated only the first time they are seen.
    pub fn add(
        &mut self,
        vote: &SyntheticVote,
        poll_id: &str,
        (run, mix): (&str, &SegmentMix),
        keep: bool,
    ) {
        fn slot<'a, T: Default>(map: &'a mut BTreeMap<String, T>, key: &str) -> &'a mut T {
            if !map.contains_key(key) {
                map.insert(key.to_owned(), T::default());
            }
            map.get_mut(key).expect("inserted above")
        }
        let poll = slot(&mut self.polls, poll_id);
        let option = vote.option();
        poll.accepted += 1;
        *slot(&mut poll.options, option) += 1;
        for (dimension, value) in mix.values(&vote.segment) {
            let options = slot(slot(&mut poll.segments, dimension), value);
            *slot(options, option) += 1;
        }
        if keep {
            self.votes.push(vote.to_request(poll_id, run, mix));
        }
    }

    pub fn merge(&mut self, other: Truth) {
        for (id, theirs) in other.polls {
            let poll = self.polls.entry(id).or_default();
            poll.accepted += theirs.accepted;
            for (option, count) in theirs.options {
                *poll.options.entry(option).or_default() += count;
            }
            for (dimension, values) in theirs.segments {
                let ours = poll.segments.entry(dimension).or_default();
                for (value, options) in values {
                    let ours = ours.entry(value).or_default();
                    for (option, count) in options {
                        *ours.entry(option).or_default() += count;
                    }
                }
            }
        }
        self.votes.extend(other.votes);
    }

    pub fn accepted(&self) -> u64 {
        self.polls.values().map(|poll| poll.accepted).sum()
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let writing = || format!("writing {}", path.display());
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut out, self).with_context(writing)?;
        out.flush().with_context(writing)
    }
}

impl PollTruth {
    /// How the `results` of the poll `poll_id` differ from what was accepted; empty when
    /// they agree. Results that count fewer votes are "not yet", not a difference.
    pub fn differences(&self, poll_id: &str, results: &Results) -> Option<Vec<String>> {
        let counted = results.total_votes;
        if counted < self.accepted {
            return None;
        }
        let mut differences = Vec::new();
        for option in &results.options {
            let want = self.options.get(&option.id).copied().unwrap_or(0);
            if option.count != want {
                differences.push(format!(
                    "{poll_id} option {}: counted {}, accepted {want}",
                    option.id, option.count
                ));
            }
        }
        if counted != self.accepted {
            differences.push(format!(
                "{poll_id}: counted {counted} votes, accepted {}",
                self.accepted
            ));
        }
        Some(differences)
    }
}

/// How the results compared with the truth after the load.
pub struct Counted {
    /// Votes the results counted, over every poll.
    pub counted: u64,
    /// Seconds from the first vote until the results counted every accepted vote.
    pub all_counted_after_s: Option<f64>,
    pub mismatches: Vec<String>,
}

/// Reads every poll's results until they count at least the accepted votes (then compares
/// them) or `settle` runs out.
pub async fn wait_until_counted(
    http: &reqwest::Client,
    query_url: &str,
    truth: &Truth,
    settle: Duration,
    load_started: Instant,
) -> Counted {
    let settle_until = Instant::now() + settle;
    loop {
        let mut counted = 0;
        let mut all_there = true;
        let mut mismatches = Vec::new();
        for (poll_id, expected) in &truth.polls {
            let results = results(http, query_url, poll_id).await;
            counted += results.as_ref().map_or(0, |r| r.total_votes);
            match results.and_then(|results| expected.differences(poll_id, &results)) {
                Some(differences) => mismatches.extend(differences),
                None => all_there = false,
            }
        }
        if all_there {
            return Counted {
                counted,
                all_counted_after_s: Some(load_started.elapsed().as_secs_f64()),
                mismatches,
            };
        }
        if Instant::now() > settle_until {
            mismatches.push(format!(
                "only {counted} of {} accepted votes counted within {}s",
                truth.accepted(),
                settle.as_secs()
            ));
            return Counted {
                counted,
                all_counted_after_s: None,
                mismatches,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A poll's results; `None` while the deployment does not answer with them (one that is
/// still coming back counts as "not yet").
async fn results(http: &reqwest::Client, query_url: &str, poll_id: &str) -> Option<Results> {
    let response = http
        .get(format!("{query_url}/v1/polls/{poll_id}/results"))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::MAX_MIX_KEYS;

    fn vote(voter: u64, choice: usize, segment: u16) -> SyntheticVote {
        let mut pick = [0; MAX_MIX_KEYS];
        pick[0] = segment;
        SyntheticVote {
            poll: 0,
            voter,
            nonce: 1,
            choice,
            segment: pick,
        }
    }

    fn results(counts: &[(&str, u64)]) -> Results {
        serde_json::from_value(serde_json::json!({
            "poll_id": "p", "kind": "single", "status": "open",
            "total_votes": counts.iter().map(|(_, c)| c).sum::<u64>(), "unique_voters": 0,
            "options": counts.iter().map(|(id, count)| serde_json::json!(
                {"id": id, "label": id, "count": count, "share": 0.0})).collect::<Vec<_>>(),
            "as_of": 1, "updated_at": "2025-01-01T00:00:00Z",
        }))
        .expect("results")
    }

    #[test]
    fn workers_shares_add_up_per_option_and_segment() {
        let mix: SegmentMix = "country=US,DE".parse().expect("mix");
        let polls = ["p".to_owned()];
        let (mut one, mut two) = (Truth::new(&polls), Truth::new(&polls));
        one.add(&vote(1, 0, 0), "p", ("run", &mix), true);
        one.add(&vote(2, 1, 1), "p", ("run", &mix), true);
        two.add(&vote(3, 0, 1), "p", ("run", &mix), false);
        one.merge(two);
        let poll = &one.polls["p"];
        assert_eq!(poll.accepted, 3);
        assert_eq!(
            poll.options,
            [("red".into(), 2), ("green".into(), 1)].into()
        );
        assert_eq!(poll.segments["country"]["DE"]["red"], 1);
        assert_eq!(poll.segments["country"]["DE"]["green"], 1);
        assert_eq!(poll.segments["country"]["US"]["red"], 1);
        assert_eq!(one.votes.len(), 2, "only the votes asked to be kept");
    }

    #[test]
    fn results_are_compared_once_they_count_every_accepted_vote() {
        let mix: SegmentMix = "country=US".parse().expect("mix");
        let mut truth = Truth::new(&["p".to_owned()]);
        truth.add(&vote(1, 0, 0), "p", ("run", &mix), false);
        truth.add(&vote(2, 1, 0), "p", ("run", &mix), false);
        let poll = &truth.polls["p"];
        assert_eq!(poll.differences("p", &results(&[("red", 1)])), None);
        assert_eq!(
            poll.differences("p", &results(&[("red", 1), ("green", 1)])),
            Some(vec![])
        );
        assert_eq!(
            poll.differences("p", &results(&[("red", 2), ("green", 1)])),
            Some(vec![
                "p option red: counted 2, accepted 1".to_owned(),
                "p: counted 3 votes, accepted 2".to_owned()
            ])
        );
    }
}
