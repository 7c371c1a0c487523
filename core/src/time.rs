//! Wall-clock helpers. Times on the wire are RFC 3339 UTC strings; inside, milliseconds
//! since the Unix epoch.

use ::time::format_description::well_known::Rfc3339;
use ::time::OffsetDateTime;

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 with millisecond precision and a `Z` suffix.
pub fn format_ms(ms: i64) -> String {
    let Ok(at) = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) else {
        return String::new();
    };
    let ms_part = at.millisecond();
    let base = at
        .replace_millisecond(0)
        .unwrap_or(at)
        .format(&Rfc3339)
        .unwrap_or_default();
    if ms_part == 0 {
        base
    } else {
        // Rfc3339 drops sub-seconds when zero; put the milliseconds before the `Z`.
        let stem = base.trim_end_matches('Z');
        format!("{stem}.{ms_part:03}Z")
    }
}

/// Parses an RFC 3339 time or an integer of epoch milliseconds.
pub fn parse(text: &str) -> Option<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// serde adapter: an optional epoch-ms field written as RFC 3339.
pub mod opt_rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(ms) => serializer.serialize_str(&super::format_ms(*ms)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<i64>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        match text {
            None => Ok(None),
            Some(text) => super::parse(&text).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{text}` is not an RFC 3339 time such as 2027-03-01T10:00:00Z"
                ))
            }),
        }
    }
}

/// serde adapter: a required epoch-ms field written as RFC 3339.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_ms(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not an RFC 3339 time")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_milliseconds() {
        for ms in [0_i64, 1_700_000_000_000, 1_700_000_000_123] {
            assert_eq!(super::parse(&super::format_ms(ms)), Some(ms));
        }
        assert_eq!(super::format_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
