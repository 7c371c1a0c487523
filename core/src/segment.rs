//! Audience segments: the standard keys every vote may carry plus a poll's own dimensions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::problem::Problem;

pub const STANDARD_KEYS: [&str; 6] = [
    "campaign", "channel", "source", "medium", "country", "device",
];
pub const MAX_VALUE_CHARS: usize = 128;

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
            if value.chars().count() > MAX_VALUE_CHARS {
                return Err(Problem::invalid(
                    field(),
                    format!("segment value `{key}` is longer than {MAX_VALUE_CHARS} characters"),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(Problem::invalid(
                    field(),
                    format!("segment value `{key}` contains control characters"),
                ));
            }
            let value = value.trim().to_owned();
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
        match key {
            "campaign" => &self.campaign,
            "channel" => &self.channel,
            "source" => &self.source,
            "medium" => &self.medium,
            "country" => &self.country,
            "device" => &self.device,
            custom => self.custom.get(custom).map(String::as_str).unwrap_or(""),
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
}
