//! The versioned wire format of a vote on the bus: a JSON object whose `v` field names the
//! format version. Decoders reject versions they do not know instead of guessing.

use serde::{Deserialize, Serialize};

use crate::vote::Vote;
use crate::{Error, Result};

pub const VERSION: u32 = 1;

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u32,
    #[serde(flatten)]
    vote: &'a Vote,
}

#[derive(Deserialize)]
struct Envelope {
    v: u32,
    #[serde(flatten)]
    vote: Vote,
}

pub fn encode(vote: &Vote) -> Vec<u8> {
    // Sized for a typical vote, so the buffer is not regrown as it fills.
    let mut out = Vec::with_capacity(256);
    serde_json::to_writer(&mut out, &EnvelopeRef { v: VERSION, vote })
        .expect("votes always serialize");
    out
}

pub fn decode(bytes: &[u8]) -> Result<Vote> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("vote event: {e}")))?;
    if envelope.v != VERSION {
        return Err(Error::Corrupt(format!(
            "vote event version {} is not supported (this build reads {VERSION})",
            envelope.v
        )));
    }
    Ok(envelope.vote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Segment;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(vote_id in "[a-z0-9-]{1,40}", poll in "[a-z0-9]{1,20}", key in "[0-9a-f]{0,32}",
                       choice in proptest::collection::vec("\\PC{0,10}", 1..4), value in proptest::option::of(-1000i32..1000),
                       country in "[A-Z]{2}", custom in proptest::collection::btree_map("[a-z]{1,5}", "\\PC{0,20}", 0..3),
                       at in 0i64..4_000_000_000_000) {
            let vote = Vote { vote_id, poll_id: poll, voter_key: key, choice, value,
                segment: Segment { country, custom, ..Segment::default() }, received_at: at };
            prop_assert_eq!(decode(&encode(&vote)).unwrap(), vote);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn rejects_unknown_versions() {
        assert!(decode(
            br#"{"v":2,"vote_id":"a","poll_id":"p","voter_key":"","choice":[],"received_at":1}"#
        )
        .is_err());
    }
}
