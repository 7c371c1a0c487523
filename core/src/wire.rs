//! The versioned wire format of a vote on the bus: a JSON object whose `v` field names the
//! format version. Decoders reject versions they do not know instead of guessing.

use serde::Deserialize;

use crate::segment::{Segment, STANDARD_KEYS};
use crate::vote::Vote;
use crate::{Error, Result};

pub const VERSION: u32 = 1;

/// The event as written: `v`, then the vote's own fields, in this order; fields of the
/// segment that are empty (and `value` when there is none) are left out. [`encode`] writes
/// it by hand; this derived form is what its bytes are checked against.
#[cfg(test)]
#[derive(serde::Serialize)]
struct EnvelopeRef<'a> {
    v: u32,
    vote_id: &'a str,
    poll_id: &'a str,
    voter_key: &'a str,
    choice: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<i32>,
    segment: &'a Segment,
    received_at: i64,
}

#[derive(Deserialize)]
struct Envelope {
    v: u32,
    vote_id: String,
    poll_id: String,
    voter_key: String,
    choice: Vec<String>,
    #[serde(default)]
    value: Option<i32>,
    #[serde(default)]
    segment: Segment,
    received_at: i64,
}

/// The event of `vote`, the bytes serde_json writes for `EnvelopeRef` (a test holds the
/// two equal), written directly: through serde, each of a vote's ~24 strings (names and
/// values) cost ~150 instructions, most of a single vote's encoding. The fields of [`Vote`]
/// are taken apart by name, so a field added to it does not compile until it is written
/// here; the test builds every field of [`Segment`] by name, so a field added there fails
/// it until it is written here.
pub fn encode(vote: &Vote) -> Vec<u8> {
    let Vote {
        vote_id,
        poll_id,
        voter_key,
        choice,
        value,
        segment,
        received_at,
    } = vote;
    // Sized for a typical vote, so the buffer is not regrown as it fills.
    let mut out = Vec::with_capacity(256);
    let mut numbers = itoa::Buffer::new();
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(numbers.format(VERSION).as_bytes());
    out.extend_from_slice(b",\"vote_id\":");
    string(&mut out, vote_id);
    out.extend_from_slice(b",\"poll_id\":");
    string(&mut out, poll_id);
    out.extend_from_slice(b",\"voter_key\":");
    string(&mut out, voter_key);
    out.extend_from_slice(b",\"choice\":[");
    for (i, option) in choice.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(&mut out, option);
    }
    out.push(b']');
    if let Some(value) = value {
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(numbers.format(*value).as_bytes());
    }
    out.extend_from_slice(b",\"segment\":{");
    let mut first = true;
    // The standard keys are the first fields of `Segment`, in this order.
    for (index, name) in STANDARD_KEYS.iter().enumerate() {
        let value = segment.standard(index);
        if !value.is_empty() {
            field(&mut out, &mut first, name);
            string(&mut out, value);
        }
    }
    if !segment.custom.is_empty() {
        field(&mut out, &mut first, "custom");
        out.push(b'{');
        let mut first = true;
        for (key, value) in &segment.custom {
            field(&mut out, &mut first, key);
            string(&mut out, value);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"},\"received_at\":");
    out.extend_from_slice(numbers.format(*received_at).as_bytes());
    out.push(b'}');
    out
}

/// `"name":` of an object's member, after a comma unless it is the object's first.
fn field(out: &mut Vec<u8>, first: &mut bool, name: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    string(out, name);
    out.push(b':');
}

/// A JSON string as serde_json writes it: as it is when nothing in it needs escaping (no
/// quote, backslash or byte below 0x20; all other text goes as UTF-8), else through
/// serde_json.
fn string(out: &mut Vec<u8>, text: &str) {
    // Without an early exit, so the loop runs many bytes at a time.
    let plain = text.bytes().fold(true, |plain, b| {
        plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, text).expect("a string always serializes");
    }
}

pub fn decode(bytes: &[u8]) -> Result<Vote> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt("vote event", e))?;
    if envelope.v != VERSION {
        return Err(Error::corrupt(
            "vote event",
            format!(
                "event version {} is not supported (this build reads {VERSION})",
                envelope.v
            ),
        ));
    }
    Ok(Vote {
        vote_id: envelope.vote_id,
        poll_id: envelope.poll_id,
        voter_key: envelope.voter_key,
        choice: envelope.choice,
        value: envelope.value,
        segment: envelope.segment,
        received_at: envelope.received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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

        /// The hand-written encoding is byte for byte what serde_json writes for the derived
        /// envelope, whatever the strings hold (quotes, backslashes, control characters,
        /// any Unicode) and whichever fields are set.
        #[test]
        fn writes_what_serde_json_writes(vote_id in "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}\u{7f}a-z]{0,8}",
                       poll in any::<String>(), key in "[0-9a-f]{0,32}|\\PC{0,4}",
                       choice in proptest::collection::vec(any::<String>(), 0..4), value in any::<Option<i32>>(),
                       standard in proptest::collection::vec("|[A-Z]{2}|\\PC{0,6}|[\"\\\\\n\t]{1,3}", 6),
                       custom in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..3),
                       at in any::<i64>()) {
            let segment = Segment {
                campaign: standard[0].clone(), channel: standard[1].clone(), source: standard[2].clone(),
                medium: standard[3].clone(), country: standard[4].clone(), device: standard[5].clone(),
                custom,
            };
            let vote = Vote { vote_id, poll_id: poll, voter_key: key, choice, value, segment, received_at: at };
            let reference = EnvelopeRef {
                v: VERSION,
                vote_id: &vote.vote_id,
                poll_id: &vote.poll_id,
                voter_key: &vote.voter_key,
                choice: &vote.choice,
                value: vote.value,
                segment: &vote.segment,
                received_at: vote.received_at,
            };
            let (written, expected) = (encode(&vote), serde_json::to_vec(&reference).unwrap());
            prop_assert_eq!(String::from_utf8_lossy(&written), String::from_utf8_lossy(&expected));
            prop_assert_eq!(decode(&written).unwrap(), vote);
        }

        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }

    /// The format on the bus: events written by earlier builds must stay readable, so
    /// this pins the exact bytes.
    #[test]
    fn writes_the_pinned_format() {
        let vote = Vote {
            vote_id: "v1".into(),
            poll_id: "p".into(),
            voter_key: "ab".into(),
            choice: vec!["red".into()],
            value: Some(7),
            segment: Segment {
                country: "DE".into(),
                custom: [("plan".to_owned(), "pro".to_owned())].into(),
                ..Segment::default()
            },
            received_at: 5,
        };
        let expected = r#"{"v":1,"vote_id":"v1","poll_id":"p","voter_key":"ab","choice":["red"],"value":7,"segment":{"country":"DE","custom":{"plan":"pro"}},"received_at":5}"#;
        assert_eq!(String::from_utf8(encode(&vote)).unwrap(), expected);
        assert_eq!(decode(expected.as_bytes()).unwrap(), vote);
        // Fields in another order, unknown fields and a missing segment are read as before.
        let other = decode(
            br#"{"received_at":5,"choice":["red"],"later":true,"voter_key":"","poll_id":"p","vote_id":"v2","v":1}"#,
        )
        .unwrap();
        assert_eq!(other.segment, Segment::default());
        assert_eq!(other.value, None);
    }

    #[test]
    fn rejects_unknown_versions() {
        assert!(decode(
            br#"{"v":2,"vote_id":"a","poll_id":"p","voter_key":"","choice":[],"received_at":1}"#
        )
        .is_err());
    }
}
