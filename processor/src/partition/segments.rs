//! The cap on distinct segment values: per poll and dimension, the first
//! [`MAX_SEGMENT_VALUES`] values in log order are counted as they are, every later new
//! value as [`OTHER_VALUE`].
//!
//! # Why a replay maps every vote as the first pass did
//!
//! Write `C(s)` for the values a dimension of a poll kept among the poll's votes up to log
//! position `s`, on the first pass. `C` only grows, and stops growing for good once it holds
//! the cap. Mapping the vote at `s` with any set `S` such that `C(s-1) ⊆ S ⊆ C(∞)` gives the
//! first pass's answer:
//! - a value it kept is in `C(∞)`: either it is in `S`, or `S` lacks one value of `C(∞)` and
//!   so is short of the cap; it is kept again;
//! - a value it replaced came when `C(s-1)` was full, so `C(s-1) = C(∞) = S`: the value is
//!   not in `S`, `S` is full, and it is replaced again.
//!
//! Mapping a vote adds only a kept value to `S`, so `C(s) ⊆ S ⊆ C(∞)` holds for the next.
//!
//! A (re)started worker starts each poll from [`Warehouse::segment_values`]: the values of
//! every row stored for it. Rows hold mapped segments, so those values are within `C(∞)`.
//! The raw votes hold every vote of the partition up to their watermark, and the settled
//! rollups up to theirs, so the values include `C(w)` for `w` either watermark; processing
//! resumes after the lowest watermark, at most either `w`, so `S ⊇ C(s-1)` for the first
//! vote mapped. That covers each way the tables can disagree after a crash: votes ahead of
//! the rollups (replayed votes are mapped again for the rollups only, with a set that
//! already holds their values), fresh rows lost or ahead of the raw votes, settled rows
//! ahead of the rest (the votes between are stored again, with the same values). An insert
//! whose answer was lost is not mapped again: the worker retries with the batch it mapped.
//!
//! Rows written before the cap existed may hold more values than the cap: they are all
//! kept, and every new value is `other` — still the same answer on every pass.
//!
//! A poll spread over N partitions is capped per partition, at `MAX_SEGMENT_VALUES / N`
//! ([`cap_of`]; a poll's spread never changes, so neither does its cap): each partition's
//! worker maps its share in its own log order, so `C` above is the partition's, and a
//! restarted worker starts from the rows of its own partition only
//! ([`Warehouse::segment_values`] takes it). Starting from every partition's rows would
//! break `S ⊆ C(∞)`: a value another partition kept would be kept here on a replay where
//! the first pass made it `other`. The partitions together keep at most the cap, so a
//! breakdown by one dimension still fits in [`tally_core::analytics::MAX_GROUPS`]; past its
//! share, a value may be counted as itself in one partition and as `other` in another.
//!
//! [`Warehouse::segment_values`]: tally_core::ports::Warehouse::segment_values

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tally_core::segment::{Segment, MAX_SEGMENT_VALUES, OTHER_VALUE};

/// The values one partition counts per dimension of a poll spread over `spread` partitions
/// (1 for a poll that is not spread): its share of [`MAX_SEGMENT_VALUES`].
pub(crate) fn cap_of(spread: u16) -> usize {
    MAX_SEGMENT_VALUES / usize::from(spread.max(1))
}

/// The values counted so far for each dimension of one poll.
#[derive(Debug)]
pub(crate) struct SegmentValues {
    counted: HashMap<String, HashSet<String>>,
    /// The most values of a dimension this partition counts as themselves.
    cap: usize,
}

impl Default for SegmentValues {
    fn default() -> Self {
        SegmentValues {
            counted: HashMap::new(),
            cap: MAX_SEGMENT_VALUES,
        }
    }
}

impl SegmentValues {
    /// The values stored for the poll, as [`tally_core::ports::Warehouse::segment_values`]
    /// reads them, with the partition's `cap` ([`cap_of`]). `other` takes no place under
    /// the cap.
    pub(crate) fn from_stored(
        stored: BTreeMap<String, BTreeSet<String>>,
        cap: usize,
    ) -> SegmentValues {
        let counted = stored
            .into_iter()
            .map(|(dimension, values)| {
                let values = values.into_iter().filter(|v| v != OTHER_VALUE).collect();
                (dimension, values)
            })
            .collect();
        SegmentValues { counted, cap }
    }

    /// Replaces each value of `segment` that the cap does not let in by `other`, and notes
    /// the values it lets in.
    pub(crate) fn cap(&mut self, segment: &mut Segment) {
        let Segment {
            campaign,
            channel,
            source,
            medium,
            country,
            device,
            custom,
        } = segment;
        for (dimension, value) in [
            ("campaign", campaign),
            ("channel", channel),
            ("source", source),
            ("medium", medium),
            ("country", country),
            ("device", device),
        ] {
            self.cap_value(dimension, value);
        }
        for (dimension, value) in custom.iter_mut() {
            self.cap_value(dimension, value);
        }
    }

    fn cap_value(&mut self, dimension: &str, value: &mut String) {
        // The absent value and `other` are always counted as they are, and take no place.
        if value.is_empty() || value == OTHER_VALUE {
            return;
        }
        if !self.counted.contains_key(dimension) {
            self.counted.insert(dimension.to_owned(), HashSet::new());
        }
        let counted = self.counted.get_mut(dimension).expect("inserted above");
        if counted.contains(value.as_str()) {
            return;
        }
        if counted.len() < self.cap {
            counted.insert(value.clone());
        } else {
            *value = OTHER_VALUE.to_owned();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn device(value: &str) -> Segment {
        Segment {
            device: value.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_spread_polls_partitions_share_the_cap() {
        assert_eq!(cap_of(0), MAX_SEGMENT_VALUES);
        assert_eq!(cap_of(1), MAX_SEGMENT_VALUES);
        assert_eq!(cap_of(2), MAX_SEGMENT_VALUES / 2);
        for spread in 1..=64u16 {
            // Every partition's share together stays within the cap, so a breakdown by one
            // dimension fits in `MAX_GROUPS`.
            assert!(cap_of(spread) * usize::from(spread) <= MAX_SEGMENT_VALUES);
            assert!(cap_of(spread) > 0);
        }
        let mut values = SegmentValues::from_stored(BTreeMap::new(), 2);
        let devices: Vec<String> = ["a", "b", "c", "a"].map(String::from).to_vec();
        assert_eq!(mapped(&mut values, &devices), ["a", "b", OTHER_VALUE, "a"]);
    }

    /// The devices of `values` mapped in order from `start`.
    fn mapped(start: &mut SegmentValues, values: &[String]) -> Vec<String> {
        values
            .iter()
            .map(|value| {
                let mut segment = device(value);
                start.cap(&mut segment);
                segment.device
            })
            .collect()
    }

    /// The values of mapped devices as the warehouse would answer for them.
    fn stored(devices: &[String]) -> BTreeMap<String, BTreeSet<String>> {
        let values: BTreeSet<String> = devices.iter().filter(|d| !d.is_empty()).cloned().collect();
        if values.is_empty() {
            return BTreeMap::new();
        }
        [("device".to_owned(), values)].into()
    }

    #[test]
    fn values_past_the_cap_become_other_and_known_ones_stay() {
        let mut values = SegmentValues::default();
        let devices: Vec<String> = (0..MAX_SEGMENT_VALUES + 3)
            .map(|i| format!("d{i}"))
            .chain(["d7".to_owned(), String::new(), OTHER_VALUE.to_owned()])
            .collect();
        let got = mapped(&mut values, &devices);
        assert_eq!(got[..MAX_SEGMENT_VALUES], devices[..MAX_SEGMENT_VALUES]);
        assert_eq!(
            got[MAX_SEGMENT_VALUES..MAX_SEGMENT_VALUES + 3],
            [OTHER_VALUE; 3]
        );
        assert_eq!(
            got[MAX_SEGMENT_VALUES + 3..],
            ["d7", "", OTHER_VALUE],
            "a counted value, the absent one and `other` itself pass"
        );
    }

    #[test]
    fn each_dimension_has_a_cap_of_its_own() {
        let mut values = SegmentValues::default();
        for i in 0..MAX_SEGMENT_VALUES {
            let mut segment = device(&format!("d{i}"));
            values.cap(&mut segment);
        }
        let mut segment = Segment {
            device: "new".into(),
            country: "DE".into(),
            custom: [("plan".to_owned(), "pro".to_owned())].into(),
            ..Default::default()
        };
        values.cap(&mut segment);
        assert_eq!(segment.device, OTHER_VALUE);
        assert_eq!(segment.country, "DE");
        assert_eq!(segment.custom["plan"], "pro");
    }

    #[test]
    fn stored_other_takes_no_place() {
        let stored: BTreeMap<String, BTreeSet<String>> = [(
            "device".to_owned(),
            (1..MAX_SEGMENT_VALUES)
                .map(|i| format!("d{i}"))
                .chain([OTHER_VALUE.to_owned()])
                .collect(),
        )]
        .into();
        let mut values = SegmentValues::from_stored(stored, MAX_SEGMENT_VALUES);
        let mut last = device("last");
        values.cap(&mut last);
        assert_eq!(last.device, "last", "one place was left");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// A worker that (re)starts anywhere in the log, from what any table that holds at
        /// least the votes before that point has stored, maps the rest as the first pass did.
        #[test]
        fn a_restart_maps_the_rest_as_the_first_pass_did(
            raw in proptest::collection::vec(0u16..1_000, 1..2_000),
            restart in 0.0f64..1.0,
            ahead in 0.0f64..1.0,
            every in 1usize..10,
        ) {
            let devices: Vec<String> = raw
                .iter()
                .map(|i| if *i == 0 { String::new() } else { format!("d{i}") })
                .collect();
            let first_pass = mapped(&mut SegmentValues::default(), &devices);
            // Processing resumes at `from`; the warehouse holds every mapped vote up to
            // `held`, at or past `from`, and some after it (as fresh rollups may).
            let from = (restart * devices.len() as f64) as usize;
            let held = from + (ahead * (devices.len() - from) as f64) as usize;
            let mut rows: Vec<String> = first_pass[..held].to_vec();
            rows.extend(first_pass[held..].iter().step_by(every).cloned());
            let mut restarted = SegmentValues::from_stored(stored(&rows), MAX_SEGMENT_VALUES);
            let replay = mapped(&mut restarted, &devices[from..]);
            prop_assert_eq!(&replay[..], &first_pass[from..]);
        }
    }
}
