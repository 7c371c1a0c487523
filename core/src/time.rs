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

/// The earliest time tally accepts: the Unix epoch.
pub const MIN_MS: i64 = 0;
/// The latest time tally accepts: the end of year 9999, the last RFC 3339 can write.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Parses an RFC 3339 time or an integer of epoch milliseconds, within [`MIN_MS`] and
/// [`MAX_MS`]; the error says what is wrong with the text (an integer that is epoch
/// microseconds or nanoseconds is the usual integration bug, so it is named).
pub fn parse(text: &str) -> Result<i64, String> {
    let ms = match text.trim().parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => {
            let at = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|_| {
                format!("`{text}` is not an RFC 3339 time (such as 2027-03-01T10:00:00Z) or epoch milliseconds")
            })?;
            (at.unix_timestamp_nanos() / 1_000_000) as i64
        }
    };
    if (MIN_MS..=MAX_MS).contains(&ms) {
        return Ok(ms);
    }
    let hint = if ms > MAX_MS && ms / 1_000 <= MAX_MS {
        "; it looks like epoch microseconds: divide by 1,000"
    } else if ms > MAX_MS && ms / 1_000_000 <= MAX_MS {
        "; it looks like epoch nanoseconds: divide by 1,000,000"
    } else {
        ""
    };
    Err(format!(
        "`{text}` is outside the times tally accepts (1970-01-01 to 9999-12-31){hint}"
    ))
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
            Some(text) => super::parse(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// serde adapter for stored records: like [`opt_rfc3339`], but a time that cannot be read
/// (an empty string written by an older version, a value out of range) reads as absent
/// rather than making the whole record unreadable — the record can then be seen and
/// repaired through the API.
pub mod opt_rfc3339_lenient {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<i64>, serializer: S) -> Result<S::Ok, S::Error> {
        super::opt_rfc3339::serialize(value, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<i64>, D::Error> {
        let text: Option<serde_json::Value> = Option::deserialize(deserializer)?;
        Ok(match text {
            Some(serde_json::Value::String(text)) => super::parse(&text).ok(),
            _ => None,
        })
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
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_milliseconds() {
        for ms in [0_i64, 1_700_000_000_000, 1_700_000_000_123, super::MAX_MS] {
            assert_eq!(super::parse(&super::format_ms(ms)), Ok(ms));
            assert_eq!(super::parse(&ms.to_string()), Ok(ms));
        }
        assert_eq!(super::format_ms(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn refuses_times_out_of_range_naming_the_likely_unit() {
        let micros = super::parse("1700000000000000").unwrap_err();
        assert!(micros.contains("microseconds"), "{micros}");
        let nanos = super::parse("1700000000000000000").unwrap_err();
        assert!(nanos.contains("nanoseconds"), "{nanos}");
        assert!(super::parse("-1").is_err());
        assert!(super::parse(&i64::MIN.to_string()).is_err());
        assert!(super::parse("1969-12-31T23:59:59Z").is_err());
        assert!(super::parse("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
