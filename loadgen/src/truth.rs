//! The ground truth — what the accepted votes add up to — and the check of `/results`
//! against it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tally_core::results::Results;
use tally_core::vote::VoteRequest;

use crate::mix::SegmentMix;
use crate::vote::{SyntheticVote, OPTIONS};

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

/// What one sender saw accepted, counted by the indices a [`SyntheticVote`] is made of
/// (poll, option, and each segment key's value), one map entry per combination seen: no
/// name is looked up or compared per vote, so the load generator spends little of the
/// machine it shares with the deployment. [`Truth::of`] names the counts once, at
/// the end. (Counting into `Truth`'s maps of names per vote was ~10% of the client's CPU
/// per single vote.)
#[derive(Default)]
pub struct Tally {
    counts: HashMap<u64, u64, BuildHasherDefault<PackedKeyHasher>>,
    /// Accepted votes as they were sent, when asked to keep them (`--truth`).
    kept: Vec<VoteRequest>,
}

impl Tally {
    /// Counts an accepted vote, drawn from `mix`.
    pub fn add(&mut self, vote: &SyntheticVote, mix: &SegmentMix) {
        *self
            .counts
            .entry(pack(vote.poll, vote.choice, 0, 0))
            .or_default() += 1;
        let keys = mix.key_count();
        for (slot, &value) in vote.segment.iter().take(keys).enumerate() {
            let key = pack(vote.poll, vote.choice, slot + 1, value);
            *self.counts.entry(key).or_default() += 1;
        }
    }

    /// Keeps an accepted vote of the poll `poll_id` as it was sent (`--truth`).
    pub fn keep(&mut self, vote: &SyntheticVote, poll_id: &str, run: &str, mix: &SegmentMix) {
        self.kept.push(vote.to_request(poll_id, run, mix));
    }

    pub fn merge(&mut self, other: Tally) {
        for (key, count) in other.counts {
            *self.counts.entry(key).or_default() += count;
        }
        self.kept.extend(other.kept);
    }
}

/// A [`Tally`]'s key: the poll's index (bits 32–63), the option's (24–31), the segment
/// key's slot (16–23: 0 for the poll's own count, 1 + the key's index in the mix) and the
/// value's index (0–15).
fn pack(poll: usize, choice: usize, slot: usize, value: u16) -> u64 {
    ((poll as u64) << 32)
        | ((choice as u64 & 0xff) << 24)
        | ((slot as u64 & 0xff) << 16)
        | u64::from(value)
}

fn unpack(key: u64) -> (usize, usize, usize, u16) {
    (
        (key >> 32) as usize,
        ((key >> 24) & 0xff) as usize,
        ((key >> 16) & 0xff) as usize,
        key as u16,
    )
}

/// Hashes a [`Tally`]'s packed keys: one folded multiplication, which spreads every bit of
/// the key over the hash (the map's keys are the load's own, so no hostile input).
#[derive(Default)]
struct PackedKeyHasher(u64);

impl Hasher for PackedKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, key: u64) {
        let product = u128::from(self.0 ^ key) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Truth {
    /// The truth a load's merged [`Tally`] adds up to: every one of `polls` (those with no
    /// accepted vote too), named by `polls` and `mix`, with the votes it kept.
    pub fn of(tally: Tally, polls: &[String], mix: &SegmentMix) -> Truth {
        let mut truth = Truth {
            polls: polls
                .iter()
                .map(|p| (p.clone(), PollTruth::default()))
                .collect(),
            votes: tally.kept,
        };
        for (key, count) in tally.counts {
            let (poll, choice, slot, value) = unpack(key);
            let poll = truth.polls.entry(polls[poll].clone()).or_default();
            let option = OPTIONS[choice];
            if slot == 0 {
                poll.accepted += count;
                *poll.options.entry(option.to_owned()).or_default() += count;
            } else {
                let (dimension, value) = mix.value(slot - 1, value);
                *poll
                    .segments
                    .entry(dimension.to_owned())
                    .or_default()
                    .entry(value.to_owned())
                    .or_default()
                    .entry(option.to_owned())
                    .or_default() += count;
            }
        }
        truth
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

    /// The truth of `votes` counted by one tally per share, merged; the votes for which
    /// `keep` says so kept.
    fn truth_of(
        shares: &[&[SyntheticVote]],
        polls: &[String],
        mix: &SegmentMix,
        keep: impl Fn(&SyntheticVote) -> bool,
    ) -> Truth {
        let mut tally = Tally::default();
        for share in shares {
            let mut counted = Tally::default();
            for vote in *share {
                counted.add(vote, mix);
                if keep(vote) {
                    counted.keep(vote, &polls[vote.poll], "run", mix);
                }
            }
            tally.merge(counted);
        }
        Truth::of(tally, polls, mix)
    }

    #[test]
    fn workers_shares_add_up_per_option_and_segment() {
        let mix: SegmentMix = "country=US,DE".parse().expect("mix");
        let polls = ["p".to_owned()];
        let one = [vote(1, 0, 0), vote(2, 1, 1)];
        let two = [vote(3, 0, 1)];
        let truth = truth_of(&[&one, &two], &polls, &mix, |vote| vote.voter < 3);
        let poll = &truth.polls["p"];
        assert_eq!(poll.accepted, 3);
        assert_eq!(
            poll.options,
            [("red".into(), 2), ("green".into(), 1)].into()
        );
        assert_eq!(poll.segments["country"]["DE"]["red"], 1);
        assert_eq!(poll.segments["country"]["DE"]["green"], 1);
        assert_eq!(poll.segments["country"]["US"]["red"], 1);
        assert_eq!(poll.segments.len(), 1, "only the mix's keys");
        assert_eq!(truth.votes.len(), 2, "only the votes asked to be kept");
        assert_eq!(
            truth.votes[1].voter_id.as_deref(),
            Some("lg-run-2"),
            "kept as sent"
        );
    }

    #[test]
    fn a_tally_names_every_poll_option_key_and_value_as_counting_by_name_would() {
        use rand::Rng;
        let mix: SegmentMix = "country=US,DE:3,GB;device=mobile,desktop;store=*1000;plan=a,b,c"
            .parse()
            .expect("mix");
        let polls: Vec<String> = (0..3).map(|i| format!("p-{i}")).collect();
        let mut rng = rand::rng();
        let votes: Vec<SyntheticVote> = (0..5_000)
            .map(|voter| SyntheticVote::random(rng.random_range(0..polls.len()), voter, &mix))
            .collect();
        let (first, rest) = votes.split_at(1_234);
        let truth = truth_of(&[first, rest], &polls, &mix, |_| false);
        // Counted by name, vote by vote.
        let mut want: BTreeMap<String, PollTruth> = BTreeMap::new();
        for vote in &votes {
            let poll = want.entry(polls[vote.poll].clone()).or_default();
            poll.accepted += 1;
            *poll.options.entry(vote.option().into()).or_default() += 1;
            for (key, value) in mix.values(&vote.segment) {
                *poll
                    .segments
                    .entry(key.into())
                    .or_default()
                    .entry(value.into())
                    .or_default()
                    .entry(vote.option().into())
                    .or_default() += 1;
            }
        }
        assert_eq!(truth.accepted(), 5_000);
        for (id, poll) in &want {
            let got = &truth.polls[id];
            assert_eq!(got.accepted, poll.accepted, "{id}");
            assert_eq!(got.options, poll.options, "{id}");
            assert_eq!(got.segments, poll.segments, "{id}");
        }
    }

    #[test]
    fn results_are_compared_once_they_count_every_accepted_vote() {
        let mix: SegmentMix = "country=US".parse().expect("mix");
        let votes = [vote(1, 0, 0), vote(2, 1, 0)];
        let truth = truth_of(&[&votes], &["p".to_owned()], &mix, |_| false);
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
