//! The vote decoder: any bytes as a single-vote body, validated against polls of every
//! kind, and as a vote event off the bus. Must never panic; accepted votes must satisfy the
//! poll's rules.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tally_core::poll::{NewPoll, Poll};
use tally_core::problem::parse_json;
use tally_core::vote::{build_vote, VoteRequest, VoterHasher};

fn polls() -> &'static Vec<Poll> {
    static POLLS: OnceLock<Vec<Poll>> = OnceLock::new();
    POLLS.get_or_init(|| {
        [
            r#"{"id":"single","title":"t","question":"q","kind":"single","options":[{"id":"a","label":"A"},{"id":"b","label":"B"}],"dimensions":["plan"]}"#,
            r#"{"id":"multi","title":"t","question":"q","kind":"multi","max_choices":2,"options":[{"id":"a","label":"A"},{"id":"b","label":"B"},{"id":"c","label":"C"}],"dedupe":"none"}"#,
            r#"{"id":"stars","title":"t","question":"q","kind":"rating","scale":{"min":1,"max":5}}"#,
            r#"{"id":"nps","title":"t","question":"q","kind":"nps"}"#,
        ]
        .iter()
        .map(|json| {
            let new: NewPoll = serde_json::from_str(json).expect("sample poll");
            new.into_poll(0, || unreachable!()).expect("valid sample poll")
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = tally_core::wire::decode(data);
    let Ok(request) = parse_json::<VoteRequest>(data) else {
        return;
    };
    let hasher = VoterHasher::new(b"a-fuzzing-secret-of-enough-length");
    for poll in polls() {
        if let Ok(vote) = build_vote(poll, &request, &hasher, 1_700_000_000_000) {
            assert!(!vote.choice.is_empty(), "an accepted vote chooses something");
            let decoded = tally_core::wire::decode(&tally_core::wire::encode(&vote))
                .expect("an accepted vote round-trips on the wire");
            assert_eq!(decoded, vote);
        }
    }
});
