//! The read side of analytics: what a breakdown or a time series asks the warehouse, and
//! what it answers. Shared by the query service, both warehouses and [`crate::rollup`].

use std::collections::BTreeMap;

/// A segment dimension: a standard key or one of the poll's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dimension(pub String);

/// The most groups a breakdown returns; more is refused as a bad request. A breakdown by
/// one dimension always fits: its values are capped ([`crate::segment::MAX_SEGMENT_VALUES`])
/// and `other` and the absent value come on top.
pub const MAX_GROUPS: usize = crate::segment::MAX_SEGMENT_VALUES + 2;

/// The error for a breakdown over more than [`MAX_GROUPS`] groups.
pub fn too_many_groups() -> crate::Error {
    crate::Error::Invalid(crate::problem::Problem::invalid(
        "by",
        format!("the breakdown has more than {MAX_GROUPS} groups; break down by fewer dimensions or add filters"),
    ))
}

#[derive(Debug, Clone, Default)]
pub struct BreakdownQuery {
    pub poll_id: String,
    pub by: Vec<Dimension>,
    /// Each dimension must take one of its listed values.
    pub filters: Vec<(Dimension, Vec<String>)>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCounts {
    /// Values of the `by` dimensions, in their order.
    pub values: Vec<String>,
    pub ballots: u64,
    pub counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Breakdown {
    pub groups: Vec<GroupCounts>,
    pub as_of: u64,
}

#[derive(Debug, Clone)]
pub struct TimeseriesQuery {
    pub poll_id: String,
    pub step_seconds: u32,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimePoint {
    /// Start of the step, epoch seconds.
    pub t: i64,
    pub counts: BTreeMap<String, u64>,
}

impl TimePoint {
    /// Groups `(step start, option, votes)` rows, ordered by step, into points.
    pub fn from_rows(rows: impl IntoIterator<Item = (i64, String, u64)>) -> Vec<TimePoint> {
        let mut points: Vec<TimePoint> = Vec::new();
        for (t, option, votes) in rows {
            match points.last_mut() {
                Some(point) if point.t == t => {
                    point.counts.insert(option, votes);
                }
                _ => points.push(TimePoint {
                    t,
                    counts: [(option, votes)].into(),
                }),
            }
        }
        points
    }
}
