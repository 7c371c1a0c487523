//! Audience segments: the standard keys every vote may carry plus a poll's own dimensions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

pub const STANDARD_KEYS: [&str; 6] = [
    "campaign", "channel", "source", "medium", "country", "device",
];
pub const MAX_VALUE_CHARS: usize = 128;

/// The most distinct values the processor counts for one dimension (a standard key or one
/// of the poll's own) of one poll. A vote bringing a further value is counted, in the raw
/// votes and the rollups alike, with [`OTHER_VALUE`] in its place, so a breakdown by one
/// dimension has at most this many groups plus `other` and the absent value — exactly
/// [`crate::analytics::MAX_GROUPS`] — however many values voters invent. Which values are
/// kept is decided by their order in the log, so a replay keeps the same ones. A poll spread
/// over N partitions shares it: each partition keeps its first `MAX_SEGMENT_VALUES / N`.
pub const MAX_SEGMENT_VALUES: usize = 10_000;

/// The value a vote is counted with when its own would exceed [`MAX_SEGMENT_VALUES`].
/// A voter may send it too; it never counts towards the cap.
pub const OTHER_VALUE: &str = "other";

/// A vote's segment. Absent standard keys are empty strings so the warehouse can group
/// on plain columns; custom keys are only those the poll declares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub campaign: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub medium: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub country: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, String>,
}

/// Whether `c` is a format character (Unicode general category Cf: zero-width spaces and
/// joiners, bidi embeddings, overrides and isolates, the byte-order mark, invisible
/// operators, tags…) or another character that renders as nothing (Hangul fillers, the
/// braille blank). Such characters make values that look alike but group apart, and bidi
/// overrides make a value display as another; none belongs in a segment value.
fn invisible(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x115F..=0x1160
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0x2800
            | 0x3164
            | 0xFEFF
            | 0xFFA0
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// A segment value as it is stored: Unicode NFC (so one text is one group however it was
/// typed), trimmed, without control or invisible characters, at most [`MAX_VALUE_CHARS`].
/// The error completes "segment value `key` …".
pub fn clean_value(value: &str) -> Result<String, String> {
    use unicode_normalization::UnicodeNormalization;
    // ASCII, as most values are: one pass over the bytes. ASCII text is NFC, holds no
    // invisible character (see `invisible`), and its control characters are the Cc ones.
    if value.is_ascii() {
        if value.bytes().any(|b| b.is_ascii_control()) {
            return Err(CONTROL.to_owned());
        }
        let value = value.trim();
        if value.len() > MAX_VALUE_CHARS {
            return Err(too_long());
        }
        return Ok(value.to_owned());
    }
    if value.chars().any(char::is_control) {
        return Err(CONTROL.to_owned());
    }
    if value.chars().any(invisible) {
        return Err(
            "contains invisible formatting characters (zero-width, bidi or byte-order marks)"
                .to_owned(),
        );
    }
    let value: String = value.trim().nfc().collect();
    if value.chars().count() > MAX_VALUE_CHARS {
        return Err(too_long());
    }
    Ok(value)
}

const CONTROL: &str = "contains control characters";

fn too_long() -> String {
    format!("is longer than {MAX_VALUE_CHARS} characters")
}

impl Segment {
    /// Validates a request's segment against the keys the poll accepts.
    pub fn parse(
        raw: &BTreeMap<String, serde_json::Value>,
        dimensions: &[String],
        default_campaign: Option<&str>,
    ) -> Result<Segment, Problem> {
        let mut segment = Segment::default();
        for (key, value) in raw {
            // Named only in errors: built when one is returned, not for every value.
            let field = || format!("segment.{key}");
            let serde_json::Value::String(value) = value else {
                return Err(Problem::invalid(
                    field(),
                    format!("segment value `{key}` must be a string"),
                ));
            };
            let value = clean_value(value)
                .map_err(|why| Problem::invalid(field(), format!("segment value `{key}` {why}")))?;
            match key.as_str() {
                "campaign" => segment.campaign = value,
                "channel" => segment.channel = value,
                "source" => segment.source = value,
                "medium" => segment.medium = value,
                "device" => segment.device = value,
                "country" => {
                    let code = value.to_ascii_uppercase();
                    if !(code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase())) {
                        return Err(Problem::invalid(
                            field(),
                            format!(
                                "country `{value}` is not an ISO 3166-1 alpha-2 code such as DE"
                            ),
                        ));
                    }
                    segment.country = code;
                }
                custom if dimensions.iter().any(|d| d == custom) => {
                    segment.custom.insert(custom.to_owned(), value);
                }
                unknown => {
                    let mut accepted: Vec<&str> = STANDARD_KEYS.to_vec();
                    accepted.extend(dimensions.iter().map(String::as_str));
                    return Err(Problem::invalid(
                        field(),
                        format!(
                            "segment key `{unknown}` is not accepted by this poll; use one of {}",
                            accepted.join(", ")
                        ),
                    ));
                }
            }
        }
        if segment.campaign.is_empty() {
            if let Some(campaign) = default_campaign {
                segment.campaign = campaign.to_owned();
            }
        }
        Ok(segment)
    }

    pub fn get(&self, key: &str) -> &str {
        match STANDARD_KEYS.iter().position(|standard| *standard == key) {
            Some(index) => self.standard(index),
            None => self.custom.get(key).map(String::as_str).unwrap_or(""),
        }
    }

    /// The value of the standard key at `index` in [`STANDARD_KEYS`].
    pub fn standard(&self, index: usize) -> &str {
        match index {
            0 => &self.campaign,
            1 => &self.channel,
            2 => &self.source,
            3 => &self.medium,
            4 => &self.country,
            5 => &self.device,
            _ => panic!("no standard segment key at {index}"),
        }
    }

    /// The standard key at `index` in [`STANDARD_KEYS`], to set.
    pub fn standard_mut(&mut self, index: usize) -> &mut String {
        match index {
            0 => &mut self.campaign,
            1 => &mut self.channel,
            2 => &mut self.source,
            3 => &mut self.medium,
            4 => &mut self.country,
            5 => &mut self.device,
            _ => panic!("no standard segment key at {index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: serde_json::Value) -> BTreeMap<String, serde_json::Value> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn accepts_standard_and_declared_keys() {
        let dims = vec!["plan".to_owned()];
        let segment = Segment::parse(
            &raw(json!({"country": "de", "plan": "pro"})),
            &dims,
            Some("spring"),
        )
        .unwrap();
        assert_eq!(segment.country, "DE");
        assert_eq!(segment.get("plan"), "pro");
        assert_eq!(segment.campaign, "spring");
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let err = Segment::parse(&raw(json!({"colour": "red"})), &[], None).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("segment.colour"));
        assert!(Segment::parse(&raw(json!({"country": "Germany"})), &[], None).is_err());
        assert!(Segment::parse(&raw(json!({"device": 3})), &[], None).is_err());
        assert!(Segment::parse(&raw(json!({"device": "x".repeat(129)})), &[], None).is_err());
    }

    /// ASCII values take a shorter path: it must refuse and keep what the general one does.
    #[test]
    fn ascii_values_follow_the_same_rules() {
        for c in (0u8..128).map(char::from) {
            assert!(!invisible(c), "{c:?}");
            let cleaned = clean_value(&format!(" a{c}b "));
            if c.is_control() {
                assert_eq!(cleaned, Err(CONTROL.to_owned()), "{c:?}");
            } else {
                assert_eq!(cleaned.as_deref(), Ok(format!("a{c}b").as_str()), "{c:?}");
            }
        }
        for (one, max) in [("x", "x"), ("\u{e9}", "\u{e9}")] {
            let longest = one.repeat(MAX_VALUE_CHARS);
            assert_eq!(
                clean_value(&format!("  {longest}\t")),
                Err(CONTROL.to_owned())
            );
            assert_eq!(
                clean_value(&format!("  {longest} ")).as_deref(),
                Ok(longest.as_str())
            );
            assert_eq!(clean_value(&(longest + max)), Err(too_long()));
        }
    }

    #[test]
    fn values_are_normalised_and_invisible_characters_refused() {
        // "é" typed as e + combining acute and as one code point group together.
        let decomposed = Segment::parse(&raw(json!({"device": "cafe\u{301}"})), &[], None).unwrap();
        let composed = Segment::parse(&raw(json!({"device": "caf\u{e9}"})), &[], None).unwrap();
        assert_eq!(decomposed.device, composed.device);
        for sneaky in [
            "mo\u{200b}bile",
            "\u{feff}mobile",
            "\u{202e}elibom",
            "mobile\u{2066}",
            "a\u{e0041}",
        ] {
            let err = Segment::parse(&raw(json!({"device": sneaky})), &[], None).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("segment.device"), "{sneaky:?}");
        }
        assert_eq!(
            Segment::parse(&raw(json!({"device": "  mobile "})), &[], None)
                .unwrap()
                .device,
            "mobile"
        );
    }
}
