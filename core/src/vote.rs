//! Votes: the request a voter sends, its validation against the poll, and the event that
//! goes on the bus. Raw voter ids never leave this module unhashed.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::poll::{Dedupe, Poll, PollKind};
use crate::problem::Problem;
use crate::segment::Segment;

pub const MAX_VOTER_ID_CHARS: usize = 256;

/// `POST /v1/polls/{id}/votes` (and one NDJSON line of a batch, with `poll_id`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VoteRequest {
    /// Only on batch lines; the path names the poll for single votes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voter_id: Option<String>,
    /// An option id (single), option ids (multi) or a number (rating, NPS).
    #[schema(schema_with = choice_schema)]
    pub choice: serde_json::Value,
    /// Standard keys (`campaign`, `channel`, `source`, `medium`, `country`, `device`) and
    /// the poll's own `dimensions`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub segment: BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vote_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `choice` as the OpenAPI document describes it.
fn choice_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
    let one_of = OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)))
        .item(ObjectBuilder::new().schema_type(Type::Integer))
        .build();
    Schema::OneOf(one_of)
}

/// A validated vote, as it travels on the bus (see [`crate::wire`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub vote_id: String,
    pub poll_id: String,
    /// Keyed hash of the voter id; empty for anonymous votes on `dedupe: none` polls.
    pub voter_key: String,
    /// Option ids (single, multi) or the decimal value (rating, NPS).
    pub choice: Vec<String>,
    /// The number of a rating or NPS ballot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<i32>,
    #[serde(default)]
    pub segment: Segment,
    /// Server time of receipt, epoch ms: the event time of windows.
    pub received_at: i64,
}

impl Vote {
    /// Whether `other` is the same ballot: the same voter, answers and segment. (Its id and
    /// the time it was received may differ: a retry is received again.) A log that finds a
    /// vote id it already holds answers with the original only for the same ballot.
    pub fn same_ballot(&self, other: &Vote) -> bool {
        self.poll_id == other.poll_id
            && self.voter_key == other.voter_key
            && self.choice == other.choice
            && self.value == other.value
            && self.segment == other.segment
    }

    /// The key the vote log keeps at most one entry for: the voter on `per_voter` polls, the
    /// vote id otherwise (so a retry of the same vote finds the original at any age).
    pub fn unique_key(&self, dedupe: Dedupe) -> String {
        match dedupe {
            Dedupe::PerVoter => {
                let mut key = String::with_capacity(1 + self.voter_key.len());
                key.push('v');
                key.push_str(&self.voter_key);
                key
            }
            Dedupe::None => {
                let digest = Sha256::digest(self.vote_id.as_bytes());
                format!("i{}", crate::text::hex(&digest[..16]))
            }
        }
    }
}

/// The uniqueness key of a vote that carries a voter token on a `dedupe: none` poll: the
/// token itself, so one token is one ballot however many vote ids it comes with.
pub fn token_unique_key(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    format!("t{}", crate::text::hex(&digest[..16]))
}

/// Hashes voter ids with a pseudonym key (see [`crate::secrets`]); the hash is the only
/// voter identity stored.
#[derive(Clone)]
pub struct VoterHasher {
    key: Hmac<Sha256>,
}

impl VoterHasher {
    pub fn new(secret: &[u8]) -> Self {
        VoterHasher {
            key: Hmac::new_from_slice(secret).expect("hmac accepts any key length"),
        }
    }

    /// 128 bits of HMAC-SHA256, hex: collision-free for any realistic electorate.
    pub fn voter_key(&self, voter_id: &str) -> String {
        let mut mac = self.key.clone();
        mac.update(b"voter\0");
        mac.update(voter_id.as_bytes());
        crate::text::hex(&mac.finalize().into_bytes()[..16])
    }
}

pub fn check_vote_id(vote_id: &str) -> Result<(), Problem> {
    let valid = !vote_id.is_empty()
        && vote_id.len() <= 64
        && vote_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if valid {
        Ok(())
    } else {
        Err(Problem::invalid(
            "vote_id",
            "vote_id must be 1-64 of A-Z, a-z, 0-9, '-', '_', '.', ':'",
        ))
    }
}

/// Validates a request against its poll and makes the bus event. `vote_id` is the client's
/// idempotency key or a fresh server id.
pub fn build_vote(
    poll: &Poll,
    request: &VoteRequest,
    hasher: &VoterHasher,
    received_at: i64,
) -> Result<Vote, Problem> {
    let vote_id = match &request.vote_id {
        Some(id) => {
            check_vote_id(id)?;
            id.clone()
        }
        None => uuid::Uuid::now_v7().to_string(),
    };
    let voter_key = match request.voter_id.as_deref() {
        Some(id) if id.is_empty() || id.chars().count() > MAX_VOTER_ID_CHARS => {
            return Err(Problem::invalid(
                "voter_id",
                format!("voter_id must be 1-{MAX_VOTER_ID_CHARS} characters"),
            ));
        }
        Some(id) => hasher.voter_key(id),
        None if poll.dedupe == Dedupe::PerVoter => {
            return Err(Problem::invalid(
                "voter_id",
                "this poll counts one vote per voter, so voter_id is required",
            ));
        }
        None => String::new(),
    };
    let (choice, value) = parse_choice(poll, &request.choice)?;
    let segment = Segment::parse(&request.segment, &poll.dimensions, poll.campaign.as_deref())?;
    Ok(Vote {
        vote_id,
        poll_id: poll.id.clone(),
        voter_key,
        choice,
        value,
        segment,
        received_at,
    })
}

/// The poll's option ids for an error message: the first few, and how many there are in
/// all, so an error's size does not grow with the poll (a batch answers one per line).
fn option_list(poll: &Poll) -> String {
    const SHOWN: usize = 8;
    let mut list = poll
        .options
        .iter()
        .take(SHOWN)
        .map(|o| o.id.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if poll.options.len() > SHOWN {
        list.push_str(&format!(", … ({} options in all)", poll.options.len()));
    }
    list
}

fn parse_choice(
    poll: &Poll,
    choice: &serde_json::Value,
) -> Result<(Vec<String>, Option<i32>), Problem> {
    use serde_json::Value;
    let known = |id: &str| -> Result<String, Problem> {
        if poll.option(id).is_some() {
            Ok(id.to_owned())
        } else {
            Err(Problem::invalid(
                "choice",
                format!("option `{id}` is not one of {}", option_list(poll)),
            ))
        }
    };
    match (poll.kind, choice) {
        (PollKind::Single, Value::String(id)) => Ok((vec![known(id)?], None)),
        (PollKind::Single, _) => Err(Problem::invalid(
            "choice",
            format!(
                "choice must be one option id as a string: one of {}",
                option_list(poll)
            ),
        )),
        (PollKind::Multi, Value::Array(items)) => {
            let max = poll.max_choices.unwrap_or(poll.options.len() as u32) as usize;
            if items.is_empty() || items.len() > max {
                return Err(Problem::invalid(
                    "choice",
                    format!("choose between 1 and {max} options"),
                ));
            }
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let Value::String(id) = item else {
                    return Err(Problem::invalid(
                        "choice",
                        "choice must be an array of option ids (strings)",
                    ));
                };
                let id = known(id)?;
                if ids.contains(&id) {
                    return Err(Problem::invalid(
                        "choice",
                        format!("option `{id}` is chosen twice"),
                    ));
                }
                ids.push(id);
            }
            Ok((ids, None))
        }
        (PollKind::Multi, _) => Err(Problem::invalid(
            "choice",
            "choice must be an array of option ids, e.g. [\"red\", \"blue\"]",
        )),
        (PollKind::Rating | PollKind::Nps, value) => {
            let scale = poll.effective_scale().expect("scale polls have a scale");
            let number = value
                .as_i64()
                .filter(|n| (scale.min as i64..=scale.max as i64).contains(n));
            let Some(number) = number else {
                return Err(Problem::invalid(
                    "choice",
                    format!(
                        "choice must be a whole number from {} to {}",
                        scale.min, scale.max
                    ),
                ));
            };
            Ok((vec![number.to_string()], Some(number as i32)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poll::NewPoll;
    use serde_json::json;

    fn poll(json: serde_json::Value) -> Poll {
        let new: NewPoll = serde_json::from_value(json).unwrap();
        new.into_poll(0, || "p".into()).unwrap()
    }

    fn request(json: serde_json::Value) -> VoteRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn validates_choices_per_kind() {
        let hasher = VoterHasher::new(b"secret");
        let single = poll(
            json!({"title":"t","question":"q","kind":"single","options":[{"id":"red","label":"R"},{"id":"blue","label":"B"}]}),
        );
        let vote = build_vote(
            &single,
            &request(json!({"voter_id":"u1","choice":"red"})),
            &hasher,
            5,
        )
        .unwrap();
        assert_eq!(vote.choice, vec!["red"]);
        assert_eq!(vote.voter_key.len(), 32);
        let err = build_vote(
            &single,
            &request(json!({"voter_id":"u1","choice":"green"})),
            &hasher,
            5,
        )
        .unwrap_err();
        assert!(err.detail.contains("red, blue"), "{}", err.detail);
        assert!(
            build_vote(&single, &request(json!({"choice":"red"})), &hasher, 5).is_err(),
            "per_voter needs voter_id"
        );

        let multi = poll(
            json!({"title":"t","question":"q","kind":"multi","max_choices":2,"options":[{"id":"a","label":"A"},{"id":"b","label":"B"},{"id":"c","label":"C"}]}),
        );
        assert!(build_vote(
            &multi,
            &request(json!({"voter_id":"u","choice":["a","b"]})),
            &hasher,
            5
        )
        .is_ok());
        assert!(build_vote(
            &multi,
            &request(json!({"voter_id":"u","choice":["a","b","c"]})),
            &hasher,
            5
        )
        .is_err());
        assert!(build_vote(
            &multi,
            &request(json!({"voter_id":"u","choice":["a","a"]})),
            &hasher,
            5
        )
        .is_err());

        let nps = poll(json!({"title":"t","question":"q","kind":"nps","dedupe":"none"}));
        let vote = build_vote(&nps, &request(json!({"choice":10})), &hasher, 5).unwrap();
        assert_eq!(
            (vote.choice, vote.value, vote.voter_key.as_str()),
            (vec!["10".to_owned()], Some(10), "")
        );
        assert!(build_vote(&nps, &request(json!({"choice":11})), &hasher, 5).is_err());
        assert!(build_vote(&nps, &request(json!({"choice":7.5})), &hasher, 5).is_err());
    }

    #[test]
    fn voter_keys_depend_on_the_secret() {
        let a = VoterHasher::new(b"one").voter_key("u-1");
        assert_eq!(a, VoterHasher::new(b"one").voter_key("u-1"));
        assert_ne!(a, VoterHasher::new(b"two").voter_key("u-1"));
    }
}
