//! The synthetic vote: indices into the run's polls, options and segment mix, made into
//! JSON only when it goes into a request body. Two renderings agree by test: the fast one
//! into a request buffer, and the typed [`VoteRequest`] the ground truth keeps.

use std::collections::BTreeMap;
use std::io::Write;

use rand::Rng;
use serde_json::Value;
use tally_core::vote::VoteRequest;

use crate::mix::{Pick, SegmentMix};

/// The options of every load poll.
pub const OPTIONS: [&str; 4] = ["red", "green", "blue", "yellow"];

/// One vote: its poll (an index into the run's polls), voter, option and segment values
/// (indices into the mix). `voter` numbers are unique per run unless repeated on purpose;
/// `nonce` makes the `vote_id` of a repeat voter's vote a new one.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticVote {
    pub poll: usize,
    pub voter: u64,
    pub nonce: u32,
    pub choice: usize,
    pub segment: Pick,
}

impl SyntheticVote {
    pub fn random(poll: usize, voter: u64, mix: &SegmentMix) -> SyntheticVote {
        let mut rng = rand::rng();
        SyntheticVote {
            poll,
            voter,
            nonce: rng.random(),
            choice: rng.random_range(0..OPTIONS.len()),
            segment: mix.pick(&mut rng),
        }
    }

    pub fn option(&self) -> &'static str {
        OPTIONS[self.choice]
    }

    pub fn voter_id(&self, run: &str) -> String {
        format!("lg-{run}-{}", self.voter)
    }

    pub fn vote_id(&self, run: &str) -> String {
        format!("lg-{run}-{}-{}", self.voter, self.nonce)
    }

    /// Whether `id` is this vote's [`vote_id`](Self::vote_id), without formatting it (a
    /// batch's answer names each accepted vote; checking them must cost little).
    pub fn is_named_by(&self, run: &str, id: &str) -> bool {
        let numbers = id
            .strip_prefix("lg-")
            .and_then(|rest| rest.strip_prefix(run))
            .and_then(|rest| rest.strip_prefix('-'));
        let Some((voter, nonce)) = numbers.and_then(|numbers| numbers.split_once('-')) else {
            return false;
        };
        decimal(voter) == Some(self.voter) && decimal(nonce) == Some(u64::from(self.nonce))
    }

    /// Appends the vote as the JSON of a [`VoteRequest`] with `poll_id` (a batch line; the
    /// single-vote endpoint takes it too). The hot path of the load: written straight from
    /// the indices, with no intermediate value, so the load generator takes little of a
    /// machine it shares with the deployment.
    pub fn write_json(&self, out: &mut Vec<u8>, poll_id: &str, run: &str, mix: &SegmentMix) {
        out.extend_from_slice(br#"{"poll_id":"#);
        serde_json::to_writer(&mut *out, poll_id).expect("a string serializes");
        let (voter, nonce, choice) = (self.voter, self.nonce, self.option());
        let _ = write!(
            out,
            r#","voter_id":"lg-{run}-{voter}","vote_id":"lg-{run}-{voter}-{nonce}","choice":"{choice}","segment":{{"#
        );
        for (i, (key, value)) in mix.values(&self.segment).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut *out, key).expect("a string serializes");
            out.push(b':');
            serde_json::to_writer(&mut *out, value).expect("a string serializes");
        }
        out.extend_from_slice(b"}}");
    }

    /// The same vote as the API's request type (what `--truth` keeps).
    pub fn to_request(self, poll_id: &str, run: &str, mix: &SegmentMix) -> VoteRequest {
        VoteRequest {
            poll_id: Some(poll_id.to_owned()),
            voter_id: Some(self.voter_id(run)),
            choice: Value::from(self.option()),
            segment: mix
                .values(&self.segment)
                .map(|(key, value)| (key.to_owned(), Value::from(value)))
                .collect::<BTreeMap<_, _>>(),
            vote_id: Some(self.vote_id(run)),
            token: None,
        }
    }
}

/// The number `text` is, when it is written the way `{}` writes one (no sign, no leading 0).
fn decimal(text: &str) -> Option<u64> {
    let canonical =
        text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_is_named_by_its_vote_id_only() {
        let vote = |voter, nonce| SyntheticVote {
            poll: 0,
            voter,
            nonce,
            choice: 0,
            segment: [0; crate::mix::MAX_MIX_KEYS],
        };
        for (voter, nonce) in [(0, 0), (12, 34), (u64::MAX, u32::MAX)] {
            let id = vote(voter, nonce).vote_id("run");
            assert!(vote(voter, nonce).is_named_by("run", &id), "{id}");
        }
        let twelve = vote(12, 34);
        for other in [
            "lg-run-12-35",
            "lg-run-13-34",
            "lg-nur-12-34",
            "lg-run-012-34",
            "lg-run-12-+34",
            "lg-run-12-34-0",
            "lg-run-1234",
            "lg-run-12-",
            "xlg-run-12-34",
        ] {
            assert!(!twelve.is_named_by("run", other), "{other}");
        }
    }

    #[test]
    fn the_fast_json_is_the_vote_request_the_api_takes() {
        let mix: SegmentMix = r#"country=D"E;tier=gold"#.parse().expect("mix");
        let vote = SyntheticVote {
            poll: 0,
            voter: 12,
            nonce: 34,
            choice: 1,
            segment: [0; crate::mix::MAX_MIX_KEYS],
        };
        let mut fast = Vec::new();
        vote.write_json(&mut fast, "p-\"1", "run", &mix);
        // `VoteRequest` refuses unknown fields: the fast path writes nothing the API
        // would refuse, and the typed rendering says the same.
        let parsed: VoteRequest = serde_json::from_slice(&fast).expect("a VoteRequest");
        let typed = vote.to_request("p-\"1", "run", &mix);
        assert_eq!(
            serde_json::to_value(&parsed).expect("json"),
            serde_json::to_value(&typed).expect("json")
        );
        assert_eq!(
            serde_json::to_value(&typed).expect("json"),
            serde_json::json!({
                "poll_id": "p-\"1", "voter_id": "lg-run-12", "vote_id": "lg-run-12-34",
                "choice": "green", "segment": {"country": "D\"E", "tier": "gold"},
            })
        );
    }
}
