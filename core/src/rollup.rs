//! Segment rollups: ballots and answer counts per poll, time bucket and whole segment (every
//! standard key and the poll's own keys). The processor writes them beside the raw votes, so
//! a breakdown reads one row per segment and bucket instead of one row per vote.
//!
//! Rows come at two levels, each a table with its own watermark, like an LSM tree of two
//! layers:
//! - **fresh** rows are written about once a second: one row per (poll, bucket, segment)
//!   seen in that second, stamped with the last log position the write covers;
//! - **settled** rows are written about every half minute, always at the position of a
//!   fresh write, and cover the same votes again in far fewer rows.
//!
//! A breakdown of a poll reads its settled rows up to `S` (the poll's newest settled
//! `last_seq`) and its fresh rows after `S` up to `F` (the newest fresh one): because every
//! settled write ends where a fresh write ends, the fresh rows after `S` hold exactly the
//! poll's votes after `S`. The answer is exact as of `max(S, F)`. Time ranges that cut
//! through a bucket are completed from the raw votes of the bucket's cut part, up to the
//! same position, so the answer is exact at millisecond resolution.
//!
//! # The cube: rows per dimension set
//!
//! One row per whole segment stops helping once a poll has a dimension of thousands of
//! values (a store id, a zip code): there are nearly as many segments as votes, and a
//! breakdown by country would read them all. So every write also holds, in the same
//! insert, rows per *dimension set* ([`RollupRow::dims`]): the poll's totals
//! ([`TOTAL_SET`]), each standard key alone, each pair of standard keys, and each of the
//! poll's own keys alone (only its non-empty values: a warehouse does not know which keys a
//! poll declares, so the votes without the key are the totals less the rest, see
//! [`GroupSums::complete_custom`]). A breakdown whose dimensions (grouped and filtered
//! together) fit one set reads that set's few rows ([`cube_set`]); any other reads the
//! whole segments.
//! The sets are a fixed, small list rather than every combination: a vote adds
//! 1 + 6 + 15 + (its own keys) rows before they are added up per write, and the whole
//! segments still answer every other question exactly.
//!
//! The sets of the poll's own keys are kept per hour ([`CUSTOM_SET_SECONDS`]), not per
//! minute: a key of 10,000 values makes a row per value and bucket of every write, and a
//! breakdown by it reads them all. A time range then takes its whole hours from the set,
//! the whole minutes at its edges from the whole segments, and the rest from the raw votes
//! ([`BreakdownPlan::for_set`]). Rows kept per minute by earlier versions lie inside
//! their hour, so both widths are read alike.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

// Every vote the processor counts is looked up here by poll, bucket and segment, and SipHash
// was most of that. foldhash is only minimally DoS-resistant (seeded at random per process,
// but not made to withstand an attacker who studies a long-running process), so what a
// voter can put in these maps is bounded another way: the processor caps the values of
// each key before counting, which bounds the segments per poll and bucket.
use foldhash::HashMap;

use crate::analytics::BreakdownQuery;
use crate::analytics::{too_many_groups, Breakdown, GroupCounts, MAX_GROUPS};
use crate::segment::{Segment, STANDARD_KEYS};
use crate::vote::Vote;

/// Width of a rollup bucket.
pub const ROLLUP_SECONDS: u32 = 60;

/// Width of the buckets of the sets of the poll's own keys: an hour, so a breakdown by a
/// key of thousands of values reads a row per value and hour, not per value and minute (a
/// poll that votes for a day: 24 rows per value instead of 1,440). A time range takes its
/// whole hours from them and the minutes at its edges from the whole segments.
pub const CUSTOM_SET_SECONDS: u32 = 3600;

/// The two layers of rollup rows (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RollupLevel {
    Fresh,
    Settled,
}

impl RollupLevel {
    pub const ALL: [RollupLevel; 2] = [RollupLevel::Fresh, RollupLevel::Settled];

    /// The warehouse table holding the level's rows.
    pub fn table(self) -> &'static str {
        match self {
            RollupLevel::Fresh => "segment_rollups_fresh",
            RollupLevel::Settled => "segment_rollups",
        }
    }
}

/// The most answer keys a poll has: 50 options, or a rating scale of 101 values.
const MAX_ANSWERS: usize = 101;

/// Rows a part of a breakdown may return: a group has at most one row per answer key plus
/// one for its ballots, so more rows than this means more than [`MAX_GROUPS`] groups.
pub const BREAKDOWN_ROW_LIMIT: usize = (MAX_GROUPS + 1) * (MAX_ANSWERS + 1);

/// Ballots and answer counts of one segment of one poll in one bucket, covering the log up
/// to `last_seq`. The warehouse adds partial rows up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    pub poll_id: String,
    /// The dimension set the row counts (see the module documentation): empty for a whole
    /// segment, otherwise the set's name, and `segment` holds only the set's values.
    pub dims: String,
    /// Bucket start, epoch seconds, a multiple of `bucket_seconds`.
    pub bucket_start: i64,
    pub bucket_seconds: u32,
    pub segment: Segment,
    pub ballots: u64,
    /// Answer keys (option ids or scale values) and their counts, in key order.
    pub answers: Vec<String>,
    pub answer_votes: Vec<u64>,
    pub last_seq: u64,
}

#[derive(Default)]
struct Counts {
    ballots: u64,
    answers: Answers,
}

impl Counts {
    /// `n` more votes for `answer`, allocating the key only the first time it is seen.
    fn count(&mut self, answer: &str, n: u64) {
        self.answers.count(answer, n);
    }

    fn add(&mut self, other: &Counts) {
        self.ballots += other.ballots;
        for (answer, n) in other.answers.iter() {
            self.count(answer, n);
        }
    }
}

/// Votes per answer, in answer order. A group holds a few answers (a poll's options, a
/// scale's values), so a sorted list: one small allocation per group, where a `BTreeMap`
/// took a node of eleven slots (~370 bytes) for the first answer. The processor holds one
/// per segment seen between its writes.
#[derive(Default, Clone)]
struct Answers(Vec<(String, u64)>);

impl Answers {
    fn count(&mut self, answer: &str, n: u64) {
        match self.0.binary_search_by(|(a, _)| a.as_str().cmp(answer)) {
            Ok(at) => self.0[at].1 += n,
            Err(at) => self.0.insert(at, (answer.to_owned(), n)),
        }
    }

    fn get_mut(&mut self, answer: &str) -> Option<&mut u64> {
        let at = self
            .0
            .binary_search_by(|(a, _)| a.as_str().cmp(answer))
            .ok()?;
        Some(&mut self.0[at].1)
    }

    fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(a, n)| (a.as_str(), *n))
    }

    /// The answers and their votes as a row's two lists, in answer order.
    fn into_columns(self) -> (Vec<String>, Vec<u64>) {
        self.0.into_iter().unzip()
    }

    fn retain(&mut self, mut keep: impl FnMut(&str, u64) -> bool) {
        self.0.retain(|(a, n)| keep(a, *n));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn into_map(self) -> BTreeMap<String, u64> {
        self.0.into_iter().collect()
    }
}

/// Counts per poll, bucket start and segment.
type Groups = HashMap<String, HashMap<i64, HashMap<Segment, Counts>>>;

/// Votes not yet written as rollup rows, aggregated as they come.
#[derive(Default)]
pub struct Rollups {
    groups: Groups,
    votes: usize,
    last_seq: u64,
    since: Option<Instant>,
}

impl Rollups {
    /// The counts of one poll, bucket and segment, created empty when missing. Keys are
    /// cloned only the first time they are seen.
    fn counts(&mut self, poll_id: &str, bucket: i64, segment: &Segment) -> &mut Counts {
        if !self.groups.contains_key(poll_id) {
            self.groups.insert(poll_id.to_owned(), HashMap::default());
        }
        let segments = self
            .groups
            .get_mut(poll_id)
            .expect("inserted above")
            .entry(bucket)
            .or_default();
        if !segments.contains_key(segment) {
            segments.insert(segment.clone(), Counts::default());
        }
        segments.get_mut(segment).expect("inserted above")
    }

    /// Adds a vote; `covered` is the log position the pending rows cover once it is in
    /// (the last entry of its batch).
    pub fn add(&mut self, vote: &Vote, covered: u64) {
        let width = i64::from(ROLLUP_SECONDS) * 1000;
        let bucket = vote.received_at.div_euclid(width) * i64::from(ROLLUP_SECONDS);
        let counts = self.counts(&vote.poll_id, bucket, &vote.segment);
        counts.ballots += 1;
        for answer in &vote.choice {
            counts.count(answer, 1);
        }
        self.votes += 1;
        self.last_seq = self.last_seq.max(covered);
        self.since.get_or_insert_with(Instant::now);
    }

    /// Adds everything `other` holds, as if its votes had been added here.
    pub fn merge(&mut self, other: &Rollups) {
        for (poll_id, buckets) in &other.groups {
            for (bucket, segments) in buckets {
                for (segment, counts) in segments {
                    self.counts(poll_id, *bucket, segment).add(counts);
                }
            }
        }
        self.votes += other.votes;
        self.last_seq = self.last_seq.max(other.last_seq);
        self.since = match (self.since, other.since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Votes pending.
    pub fn votes(&self) -> usize {
        self.votes
    }

    /// How long the oldest pending vote has waited.
    pub fn age(&self) -> Duration {
        self.since.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The log position the pending rows cover.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The pending rows: the whole segments in (poll, bucket) order, then their cube rows.
    pub fn rows(&self) -> Vec<RollupRow> {
        let mut keys: Vec<(&String, i64)> = self
            .groups
            .iter()
            .flat_map(|(poll, buckets)| buckets.keys().map(move |b| (poll, *b)))
            .collect();
        keys.sort();
        let mut rows = Vec::new();
        for (poll_id, bucket) in keys {
            for (segment, counts) in &self.groups[poll_id][&bucket] {
                let (answers, answer_votes) = counts
                    .answers
                    .iter()
                    .map(|(a, n)| (a.to_owned(), n))
                    .unzip();
                rows.push(RollupRow {
                    poll_id: poll_id.clone(),
                    dims: String::new(),
                    bucket_start: bucket,
                    bucket_seconds: ROLLUP_SECONDS,
                    segment: segment.clone(),
                    ballots: counts.ballots,
                    answers,
                    answer_votes,
                    last_seq: self.last_seq,
                });
            }
        }
        // All buckets at once: a set kept per hour adds its minutes up.
        let cube = cube_rows(&rows);
        rows.extend(cube);
        rows
    }

    /// Forgets the pending votes (after they are written, or when processing restarts).
    pub fn clear(&mut self) {
        *self = Rollups::default();
    }
}

/// The name of the dimension set holding a poll's totals per bucket.
pub const TOTAL_SET: &str = "*";

/// The pairs of standard keys the cube keeps, as `(name, first, second)` with the keys'
/// positions in [`STANDARD_KEYS`]; a pair's name is its keys in that order, comma-joined.
fn standard_pairs() -> impl Iterator<Item = (String, usize, usize)> {
    (0..STANDARD_KEYS.len())
        .flat_map(|a| (a + 1..STANDARD_KEYS.len()).map(move |b| (pair_name(a, b), a, b)))
}

/// The name of the set of the standard keys at `a` < `b`.
fn pair_name(a: usize, b: usize) -> String {
    format!("{},{}", STANDARD_KEYS[a], STANDARD_KEYS[b])
}

/// The cube rows of whole-segment rows: per poll, bucket and `last_seq` (one write), the
/// rows of every dimension set, each adding up the whole segments it holds. Rows that are
/// not whole segments are left out. Keys borrow from the rows, so a whole segment costs
/// its sets' hash lookups and nothing is allocated but the rows made.
pub fn cube_rows(whole: &[RollupRow]) -> Vec<RollupRow> {
    let mut writes: HashMap<(&str, i64, u32, u64), Vec<&RollupRow>> = HashMap::default();
    for row in whole.iter().filter(|row| row.dims.is_empty()) {
        writes
            .entry((
                &row.poll_id,
                row.bucket_start,
                row.bucket_seconds,
                row.last_seq,
            ))
            .or_default()
            .push(row);
    }
    let pairs: Vec<(String, usize, usize)> = standard_pairs().collect();
    let mut out = Vec::new();
    // The poll's own keys per write and hour (see [`CUSTOM_SET_SECONDS`]), across the
    // write's minutes.
    let mut custom: HashMap<(&str, i64, u64, &str, &str), Counts> = HashMap::default();
    for ((poll_id, bucket_start, bucket_seconds, last_seq), rows) in writes {
        let mut sets: HashMap<SetValues<'_>, Counts> = HashMap::default();
        let hour =
            bucket_start.div_euclid(i64::from(CUSTOM_SET_SECONDS)) * i64::from(CUSTOM_SET_SECONDS);
        for row in rows {
            let segment = &row.segment;
            add_to_set(&mut sets, (CubeKey::Total, "", ""), row);
            for key in 0..STANDARD_KEYS.len() {
                let value = segment.standard(key);
                add_to_set(&mut sets, (CubeKey::Key(key), value, ""), row);
            }
            for (pair, (_, a, b)) in pairs.iter().enumerate() {
                let values = (segment.standard(*a), segment.standard(*b));
                add_to_set(&mut sets, (CubeKey::Pair(pair), values.0, values.1), row);
            }
            for (key, value) in &segment.custom {
                if !value.is_empty() {
                    let counts = custom
                        .entry((poll_id, hour, last_seq, key, value))
                        .or_default();
                    add_counts(counts, row);
                }
            }
        }
        for ((set, first, second), counts) in sets {
            let mut segment = Segment::default();
            let dims = match set {
                CubeKey::Total => TOTAL_SET.to_owned(),
                CubeKey::Key(key) => {
                    first.clone_into(segment.standard_mut(key));
                    STANDARD_KEYS[key].to_owned()
                }
                CubeKey::Pair(pair) => {
                    let (name, a, b) = &pairs[pair];
                    first.clone_into(segment.standard_mut(*a));
                    second.clone_into(segment.standard_mut(*b));
                    name.clone()
                }
            };
            let (answers, answer_votes) = counts.answers.into_columns();
            out.push(RollupRow {
                poll_id: poll_id.to_owned(),
                dims,
                bucket_start,
                bucket_seconds,
                segment,
                ballots: counts.ballots,
                answers,
                answer_votes,
                last_seq,
            });
        }
    }
    for ((poll_id, hour, last_seq, key, value), counts) in custom {
        let mut segment = Segment::default();
        segment.custom.insert(key.to_owned(), value.to_owned());
        let (answers, answer_votes) = counts.answers.into_columns();
        out.push(RollupRow {
            poll_id: poll_id.to_owned(),
            dims: key.to_owned(),
            bucket_start: hour,
            bucket_seconds: CUSTOM_SET_SECONDS,
            segment,
            ballots: counts.ballots,
            answers,
            answer_votes,
            last_seq,
        });
    }
    out
}

/// The sets of polls' own keys among `rows` (rows of [`cube_rows`] whose segment holds one
/// of the poll's own keys), as distinct `(poll, set)` pairs in order.
pub fn custom_sets(rows: &[RollupRow]) -> Vec<(String, String)> {
    let sets: BTreeSet<(&str, &str)> = rows
        .iter()
        .filter(|row| !row.dims.is_empty() && !row.segment.custom.is_empty())
        .map(|row| (row.poll_id.as_str(), row.dims.as_str()))
        .collect();
    sets.into_iter()
        .map(|(poll, set)| (poll.to_owned(), set.to_owned()))
        .collect()
}

/// A set's values in one write, as [`cube_rows`] adds whole segments up by them.
type SetValues<'a> = (CubeKey, &'a str, &'a str);

fn add_to_set<'a>(sets: &mut HashMap<SetValues<'a>, Counts>, key: SetValues<'a>, row: &RollupRow) {
    add_counts(sets.entry(key).or_default(), row);
}

fn add_counts(counts: &mut Counts, row: &RollupRow) {
    counts.ballots += row.ballots;
    for (answer, votes) in row.answers.iter().zip(&row.answer_votes) {
        counts.count(answer, *votes);
    }
}

/// A dimension set of the cube, as [`cube_rows`] groups by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum CubeKey {
    Total,
    /// A standard key, by its position in [`STANDARD_KEYS`].
    Key(usize),
    /// A pair of standard keys, by its position in [`standard_pairs`].
    Pair(usize),
}

/// Where a breakdown can read its rows from the cube: the set holding every dimension it
/// groups or filters by, and whether that set is one of the poll's own keys (whose rows
/// lack the votes without the key, see [`GroupSums::complete_custom`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CubeSet {
    pub dims: String,
    pub custom: bool,
}

/// The dimension set of the cube that answers `query`, or `None` when only the whole
/// segments do (three dimensions or more, or one of the poll's own keys with another).
pub fn cube_set(query: &BreakdownQuery) -> Option<CubeSet> {
    if query.by.is_empty() {
        return None;
    }
    let mut needed: Vec<&str> = query
        .by
        .iter()
        .chain(query.filters.iter().map(|(dimension, _)| dimension))
        .map(|dimension| dimension.0.as_str())
        .collect();
    needed.sort_unstable();
    needed.dedup();
    let standard = |name: &str| STANDARD_KEYS.iter().position(|key| *key == name);
    match needed.as_slice() {
        [one] => Some(CubeSet {
            dims: (*one).to_owned(),
            custom: standard(one).is_none(),
        }),
        [a, b] => {
            let (a, b) = (standard(a)?, standard(b)?);
            Some(CubeSet {
                dims: pair_name(a.min(b), a.max(b)),
                custom: false,
            })
        }
        _ => None,
    }
}

/// A time range `[from, to)` in epoch ms; `None` is open.
pub type MsRange = (Option<i64>, Option<i64>);

/// Where each part of a breakdown over a time range is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakdownPlan {
    /// Rollup buckets whose start lies in `[from, to)` (epoch seconds), if any are whole
    /// inside the range: read from the set the breakdown reads (or the whole segments).
    pub buckets: Option<(Option<i64>, Option<i64>)>,
    /// Bucket ranges (epoch seconds, whole minutes) read from the whole segments: those a
    /// set kept per hour ([`CUSTOM_SET_SECONDS`]) cannot answer, at the range's edges.
    pub segments: Vec<(Option<i64>, Option<i64>)>,
    /// Ranges read from the raw votes: the parts of cut buckets.
    pub raw: Vec<MsRange>,
}

/// The whole widths inside a range, if any, and the parts of cut ones.
type Split = (Option<(Option<i64>, Option<i64>)>, Vec<MsRange>);

/// `[from, to)` split at multiples of `width`: the whole widths inside it, if any, and the
/// parts of cut ones (none when the range is empty, all of it when no width is whole).
fn split(from: Option<i64>, to: Option<i64>, width: i64) -> Split {
    if let (Some(from), Some(to)) = (from, to) {
        if from >= to {
            return (None, Vec::new());
        }
    }
    // The whole widths: from `from` rounded up to `to` rounded down.
    let inner_from = from.map(|f| -(-f).div_euclid(width) * width);
    let inner_to = to.map(|t| t.div_euclid(width) * width);
    if let (Some(a), Some(b)) = (inner_from, inner_to) {
        if a >= b {
            return (None, vec![(from, to)]);
        }
    }
    let mut cut = Vec::new();
    if let (Some(from), Some(a)) = (from, inner_from) {
        if from < a {
            cut.push((Some(from), Some(a)));
        }
    }
    if let (Some(b), Some(to)) = (inner_to, to) {
        if b < to {
            cut.push((Some(b), Some(to)));
        }
    }
    (Some((inner_from, inner_to)), cut)
}

impl BreakdownPlan {
    /// Whole minutes from the rollups, the rest from the raw votes.
    pub fn new(from_ms: Option<i64>, to_ms: Option<i64>) -> BreakdownPlan {
        let (minutes, raw) = split(from_ms, to_ms, i64::from(ROLLUP_SECONDS) * 1000);
        BreakdownPlan {
            buckets: minutes.map(|(a, b)| (a.map(|a| a / 1000), b.map(|b| b / 1000))),
            segments: Vec::new(),
            raw,
        }
    }

    /// The plan of `query` read from `set` (`None`: the whole segments): when the set is
    /// one of the poll's own keys, kept per hour, the whole hours from it, the other whole
    /// minutes from the whole segments and the rest from the raw votes; otherwise
    /// [`BreakdownPlan::new`].
    pub fn for_set(query: &BreakdownQuery, set: Option<&CubeSet>) -> BreakdownPlan {
        let mut plan = BreakdownPlan::new(query.from_ms, query.to_ms);
        if !set.is_some_and(|set| set.custom) {
            return plan;
        }
        if let Some((from, to)) = plan.buckets {
            let (hours, minutes) = split(from, to, i64::from(CUSTOM_SET_SECONDS));
            plan.buckets = hours;
            plan.segments = minutes;
        }
        plan
    }
}

/// One `(group values, answer, count)` row of a part of a breakdown; the answer `""`
/// carries the group's ballots.
pub type BreakdownRow = (Vec<String>, String, u64);

/// One `(group values, ballots, answers, votes per answer)` row of a part of a breakdown:
/// some of a group's rows added up (a group may come in several).
pub type BreakdownListRow = (Vec<String>, u64, Vec<String>, Vec<u64>);

/// The groups of a breakdown, added up as their rows come (from any number of parts and in
/// any order): at most [`MAX_GROUPS`], each found by its values with one hash lookup and
/// nothing allocated once it exists.
#[derive(Default)]
pub struct GroupSums {
    /// The groups' values, encoded as one string (see [`GroupSums::group`]), to their place
    /// in `groups`.
    index: HashMap<String, usize>,
    groups: Vec<(Vec<String>, Counts)>,
    /// The key being looked up, kept to reuse its allocation.
    key: String,
}

/// One group's ballots and votes per answer, as [`GroupSums`] holds them.
pub struct GroupSum<'a>(&'a mut Counts);

impl GroupSum<'_> {
    /// `n` more for `answer`; answer `""` is the group's ballots.
    pub fn add(&mut self, answer: &str, n: u64) {
        if answer.is_empty() {
            self.0.ballots += n;
        } else {
            self.0.count(answer, n);
        }
    }
}

/// Writes `values` as one key into `key`: one value is its own key; several are each
/// written after their length, so no two lists of values share a key whatever they hold.
fn encode_key<S: AsRef<str>>(key: &mut String, values: &[S]) {
    key.clear();
    if let [one] = values {
        key.push_str(one.as_ref());
    } else {
        for value in values {
            let value = value.as_ref();
            let _ = write!(key, "{}:{value}", value.len());
        }
    }
}

impl GroupSums {
    /// The group of `values`, made when first seen; an error once there would be more than
    /// [`MAX_GROUPS`].
    pub fn group<S: AsRef<str>>(&mut self, values: &[S]) -> crate::Result<GroupSum<'_>> {
        encode_key(&mut self.key, values);
        let at = match self.index.get(self.key.as_str()) {
            Some(at) => *at,
            None => {
                if self.groups.len() >= MAX_GROUPS {
                    return Err(too_many_groups());
                }
                let values = values.iter().map(|v| v.as_ref().to_owned()).collect();
                self.groups.push((values, Counts::default()));
                self.index.insert(self.key.clone(), self.groups.len() - 1);
                self.groups.len() - 1
            }
        };
        Ok(GroupSum(&mut self.groups[at].1))
    }

    /// Adds rows that each hold a group's ballots and answers; a group may come in any
    /// number of them. Their number says nothing of the groups': an error only once there
    /// would be more than [`MAX_GROUPS`].
    pub fn add_list_rows(&mut self, rows: Vec<BreakdownListRow>) -> crate::Result<()> {
        for (values, ballots, answers, votes) in rows {
            let mut group = self.group(&values)?;
            group.add("", ballots);
            for (answer, n) in answers.iter().zip(votes) {
                group.add(answer, n);
            }
        }
        Ok(())
    }

    /// Adds the rows of one part. A part read with the limit [`BREAKDOWN_ROW_LIMIT`] that
    /// came back full has more than [`MAX_GROUPS`] groups.
    pub fn add_rows(&mut self, rows: Vec<BreakdownRow>) -> crate::Result<()> {
        if rows.len() >= BREAKDOWN_ROW_LIMIT {
            return Err(too_many_groups());
        }
        for (values, answer, count) in rows {
            self.group(&values)?.add(&answer, count);
        }
        Ok(())
    }

    /// The ballots and answers of every group together.
    fn sum(&self) -> Counts {
        let mut all = Counts::default();
        for (_, counts) in &self.groups {
            all.add(counts);
        }
        all
    }

    /// Completes a breakdown by one of the poll's own keys read from its cube rows: these
    /// sums hold the groups of the key's non-empty values (the key as many times as `by`
    /// names it), and `totals` the poll's totals over the same buckets (grouped by nothing).
    /// Adds the group of the votes without the key — the totals less every other group —
    /// and keeps only the groups whose value the query's filters allow; an error when that
    /// group would be one more than [`MAX_GROUPS`].
    pub fn complete_custom(
        &mut self,
        query: &BreakdownQuery,
        totals: GroupSums,
    ) -> crate::Result<()> {
        let mut absent = totals.sum();
        let seen = self.sum();
        absent.ballots = absent.ballots.saturating_sub(seen.ballots);
        for (answer, count) in seen.answers.iter() {
            if let Some(left) = absent.answers.get_mut(answer) {
                *left = left.saturating_sub(count);
            }
        }
        absent.answers.retain(|_, count| count > 0);
        let allowed = |value: &str| {
            query
                .filters
                .iter()
                .all(|(_, values)| values.iter().any(|v| v == value))
        };
        self.groups
            .retain(|(values, _)| values.first().is_none_or(|v| allowed(v)));
        self.index.clear();
        for (at, (values, _)) in self.groups.iter().enumerate() {
            let mut key = String::new();
            encode_key(&mut key, values);
            self.index.insert(key, at);
        }
        let votes_without = absent.ballots > 0 || !absent.answers.is_empty();
        if votes_without && allowed("") {
            self.group(&vec![""; query.by.len()])?.0.add(&absent);
        }
        Ok(())
    }

    /// The breakdown: groups with ballots, largest first.
    pub fn into_breakdown(self, as_of: u64) -> Breakdown {
        let mut groups: Vec<GroupCounts> = self
            .groups
            .into_iter()
            .filter(|(_, c)| c.ballots > 0)
            .map(|(values, c)| GroupCounts {
                values,
                ballots: c.ballots,
                counts: c.answers.into_map(),
            })
            .collect();
        groups.sort_unstable_by(|a, b| {
            b.ballots
                .cmp(&a.ballots)
                .then_with(|| a.values.cmp(&b.values))
        });
        Breakdown { groups, as_of }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_counts_keep_answer_order_and_add_up() {
        let mut answers = Answers::default();
        for (answer, n) in [("c", 1), ("a", 2), ("b", 3), ("a", 4), ("", 5), ("c", 6)] {
            answers.count(answer, n);
        }
        assert_eq!(
            answers.iter().collect::<Vec<_>>(),
            [("", 5), ("a", 6), ("b", 3), ("c", 7)]
        );
        *answers.get_mut("b").unwrap() -= 3;
        assert_eq!(answers.get_mut("d"), None);
        answers.retain(|_, n| n > 0);
        let map = answers.clone().into_map();
        assert_eq!(
            map.into_iter().collect::<Vec<_>>(),
            [("".into(), 5), ("a".into(), 6), ("c".into(), 7)]
        );
        let (names, votes) = answers.into_columns();
        assert_eq!(names, ["", "a", "c"]);
        assert_eq!(votes, [5, 6, 7]);
    }

    /// A breakdown from the rows of its parts.
    fn assemble(parts: Vec<Vec<BreakdownRow>>, as_of: u64) -> crate::Result<Breakdown> {
        let mut sums = GroupSums::default();
        for part in parts {
            sums.add_rows(part)?;
        }
        Ok(sums.into_breakdown(as_of))
    }

    fn vote(poll: &str, at: i64, country: &str, choice: &[&str]) -> Vote {
        Vote {
            vote_id: format!("{poll}-{at}"),
            poll_id: poll.into(),
            voter_key: String::new(),
            choice: choice.iter().map(|c| (*c).to_owned()).collect(),
            value: None,
            segment: Segment {
                country: country.into(),
                ..Default::default()
            },
            received_at: at,
        }
    }

    #[test]
    fn rollups_count_ballots_and_answers_per_bucket_and_segment() {
        let mut rollups = Rollups::default();
        let t = 1_700_000_040_000; // a multiple of 60 s
        rollups.add(&vote("p", t, "DE", &["a"]), 5);
        rollups.add(&vote("p", t + 59_999, "DE", &["a", "b"]), 5);
        rollups.add(&vote("p", t + 60_000, "DE", &["b"]), 9);
        rollups.add(&vote("p", t, "FR", &["b"]), 9);
        assert_eq!(rollups.votes(), 4);
        let all = rollups.rows();
        let rows: Vec<&RollupRow> = all.iter().filter(|r| r.dims.is_empty()).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.last_seq == 9));
        let de_first = rows
            .iter()
            .find(|r| r.bucket_start == t / 1000 && r.segment.country == "DE")
            .unwrap();
        assert_eq!(de_first.ballots, 2);
        assert_eq!(de_first.answers, ["a", "b"]);
        assert_eq!(de_first.answer_votes, [2, 1]);
        rollups.clear();
        assert!(rollups.rows().is_empty());
    }

    #[test]
    fn merging_equals_adding_the_votes_in_one_place() {
        let t = 1_700_000_040_000;
        let votes = [
            vote("p", t, "DE", &["a"]),
            vote("p", t + 1, "DE", &["a", "b"]),
            vote("p", t + 60_000, "FR", &["b"]),
            vote("q", t, "DE", &["a"]),
        ];
        let mut all = Rollups::default();
        for (i, v) in votes.iter().enumerate() {
            all.add(v, i as u64 + 1);
        }
        let (mut first, mut second) = (Rollups::default(), Rollups::default());
        first.add(&votes[0], 1);
        first.add(&votes[2], 3);
        second.add(&votes[1], 2);
        second.add(&votes[3], 4);
        first.merge(&second);
        let sorted = |r: &Rollups| {
            let mut rows = r.rows();
            rows.sort_by_key(|row| {
                (
                    row.poll_id.clone(),
                    row.bucket_start,
                    row.dims.clone(),
                    format!("{:?}", row.segment),
                )
            });
            rows
        };
        assert_eq!(sorted(&first), sorted(&all));
        assert_eq!((first.votes(), first.last_seq()), (4, 4));
    }

    fn custom(country: &str, device: &str, store: Option<&str>) -> Segment {
        Segment {
            country: country.into(),
            device: device.into(),
            custom: store
                .map(|s| [("store".to_owned(), s.to_owned())].into())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn every_write_holds_its_cube_rows_each_set_adding_up_to_the_totals() {
        let t = 1_700_000_040_000;
        let mut rollups = Rollups::default();
        let segments = [
            custom("DE", "mobile", Some("s1")),
            custom("DE", "mobile", Some("s2")),
            custom("DE", "desktop", None),
            custom("FR", "mobile", Some("s1")),
        ];
        for (i, segment) in segments.iter().enumerate() {
            let mut v = vote("p", t + i as i64, "", &["a", "b"][..1 + i % 2]);
            v.segment = segment.clone();
            rollups.add(&v, 10);
        }
        let rows = rollups.rows();
        assert!(rows.iter().all(|r| r.last_seq == 10));
        let set =
            |dims: &str| -> Vec<&RollupRow> { rows.iter().filter(|r| r.dims == dims).collect() };
        assert_eq!(set("").len(), 4, "whole segments");
        let totals = set(TOTAL_SET);
        assert_eq!(totals.len(), 1);
        assert_eq!(
            (totals[0].ballots, totals[0].segment.clone()),
            (4, Segment::default())
        );
        assert_eq!(totals[0].answers, ["a", "b"]);
        assert_eq!(totals[0].answer_votes, [4, 2]);
        // 1 + 6 + 15 standard sets and the poll's own key.
        let sets: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.dims.as_str()).collect();
        assert_eq!(sets.len(), 1 + 1 + 6 + 15 + 1, "{sets:?}");
        for dims in sets.iter().filter(|d| !d.is_empty()) {
            let ballots: u64 = set(dims).iter().map(|r| r.ballots).sum();
            let expected = if *dims == "store" { 3 } else { 4 };
            assert_eq!(ballots, expected, "{dims}");
        }
        let country: BTreeMap<&str, u64> = set("country")
            .iter()
            .map(|r| (r.segment.country.as_str(), r.ballots))
            .collect();
        assert_eq!(country, [("DE", 3), ("FR", 1)].into());
        let pairs: BTreeMap<(&str, &str), u64> = set("country,device")
            .iter()
            .map(|r| {
                (
                    (r.segment.country.as_str(), r.segment.device.as_str()),
                    r.ballots,
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                (("DE", "desktop"), 1),
                (("DE", "mobile"), 2),
                (("FR", "mobile"), 1)
            ]
            .into()
        );
        let stores: BTreeMap<&str, u64> = set("store")
            .iter()
            .map(|r| (r.segment.custom["store"].as_str(), r.ballots))
            .collect();
        assert_eq!(stores, [("s1", 2), ("s2", 1)].into());
        // Only the set's own values are kept.
        assert!(set("country")
            .iter()
            .all(|r| r.segment.device.is_empty() && r.segment.custom.is_empty()));
        // Cube rows made later from the stored whole segments are the same rows.
        let mut again = cube_rows(&rows);
        let mut cube: Vec<RollupRow> = rows
            .iter()
            .filter(|r| !r.dims.is_empty())
            .cloned()
            .collect();
        let key = |r: &RollupRow| (r.dims.clone(), format!("{:?}", r.segment));
        again.sort_by_key(key);
        cube.sort_by_key(key);
        assert_eq!(again, cube);
    }

    #[test]
    fn the_sets_of_a_polls_own_keys_are_kept_per_hour_and_write() {
        let hour = 1_699_999_200_000; // a whole hour, in ms
        let minute = 60_000;
        let mut rollups = Rollups::default();
        // Two minutes of one hour, and the next hour, in one write.
        for (i, at) in [hour + minute, hour + 30 * minute, hour + 60 * minute]
            .into_iter()
            .enumerate()
        {
            let mut v = vote("p", at + i as i64, "DE", &["a"]);
            v.segment = custom("DE", "mobile", Some("s1"));
            rollups.add(&v, 10);
        }
        let rows = rollups.rows();
        let stores: Vec<(i64, u32, u64)> = {
            let mut stores: Vec<_> = rows
                .iter()
                .filter(|r| r.dims == "store")
                .map(|r| (r.bucket_start, r.bucket_seconds, r.ballots))
                .collect();
            stores.sort_unstable();
            stores
        };
        let h = hour / 1000;
        assert_eq!(stores, [(h, 3600, 2), (h + 3600, 3600, 1)]);
        // The standard sets keep their minutes.
        let countries = rows.iter().filter(|r| r.dims == "country").count();
        assert_eq!(countries, 3);
        assert!(rows
            .iter()
            .filter(|r| r.dims == "country")
            .all(|r| r.bucket_seconds == ROLLUP_SECONDS));
        // A second write of the same hour is a row of its own, at its own position.
        let mut later = Rollups::default();
        let mut v = vote("p", hour + 2 * minute, "DE", &["a"]);
        v.segment = custom("DE", "mobile", Some("s1"));
        later.add(&v, 11);
        let later: Vec<RollupRow> = later
            .rows()
            .into_iter()
            .filter(|r| r.dims == "store")
            .collect();
        assert_eq!(later.len(), 1);
        assert_eq!((later[0].bucket_start, later[0].last_seq), (h, 11));
    }

    #[test]
    fn a_breakdown_by_a_polls_own_key_takes_whole_hours_from_its_set() {
        let (h, m) = (3_600_000, 60_000);
        let query = |by: &str, from: Option<i64>, to: Option<i64>| BreakdownQuery {
            poll_id: "p".into(),
            by: vec![crate::analytics::Dimension(by.into())],
            from_ms: from,
            to_ms: to,
            ..Default::default()
        };
        let plan_of =
            |query: BreakdownQuery| BreakdownPlan::for_set(&query, cube_set(&query).as_ref());
        // The whole poll: all from the set.
        assert_eq!(
            plan_of(query("store", None, None)),
            BreakdownPlan::new(None, None)
        );
        // Hours 2 and 3 from the set; the whole minutes of hour 1 and 4 from the whole
        // segments; the cut minutes from the raw votes.
        let plan = plan_of(query(
            "store",
            Some(h + 10 * m + 5),
            Some(3 * h + 20 * m + 7),
        ));
        assert_eq!(
            plan,
            BreakdownPlan {
                buckets: Some((Some(7200), Some(10800))),
                segments: vec![(Some(4260), Some(7200)), (Some(10800), Some(12000))],
                raw: vec![
                    (Some(h + 10 * m + 5), Some(h + 11 * m)),
                    (Some(3 * h + 20 * m), Some(3 * h + 20 * m + 7))
                ],
            }
        );
        // Open at one end: the set from the first whole hour on.
        let plan = plan_of(query("store", Some(h + 10 * m), None));
        assert_eq!(plan.buckets, Some((Some(7200), None)));
        assert_eq!(plan.segments, [(Some(4200), Some(7200))]);
        assert!(plan.raw.is_empty());
        // No whole hour inside: whole segments only.
        let plan = plan_of(query("store", Some(h + 10 * m), Some(h + 50 * m)));
        assert_eq!(plan.buckets, None);
        assert_eq!(plan.segments, [(Some(4200), Some(6600))]);
        // A standard key's set keeps its minutes.
        let range = (Some(h + 10 * m), Some(3 * h));
        assert_eq!(
            plan_of(query("country", range.0, range.1)),
            BreakdownPlan::new(range.0, range.1)
        );
        // The key read from the whole segments (a poll the cube does not cover): minutes.
        assert_eq!(
            BreakdownPlan::for_set(&query("store", range.0, range.1), None),
            BreakdownPlan::new(range.0, range.1)
        );
    }

    #[test]
    fn a_breakdown_reads_the_cube_when_one_set_holds_all_its_dimensions() {
        let query = |by: &[&str], filters: &[&str]| BreakdownQuery {
            poll_id: "p".into(),
            by: by
                .iter()
                .map(|d| crate::analytics::Dimension((*d).into()))
                .collect(),
            filters: filters
                .iter()
                .map(|d| (crate::analytics::Dimension((*d).into()), vec!["x".into()]))
                .collect(),
            ..Default::default()
        };
        let set = |dims: &str, custom: bool| {
            Some(CubeSet {
                dims: dims.into(),
                custom,
            })
        };
        assert_eq!(cube_set(&query(&["country"], &[])), set("country", false));
        assert_eq!(
            cube_set(&query(&["country"], &["country"])),
            set("country", false)
        );
        assert_eq!(
            cube_set(&query(&["device"], &["country"])),
            set("country,device", false)
        );
        assert_eq!(
            cube_set(&query(&["device", "country"], &[])),
            set("country,device", false)
        );
        assert_eq!(cube_set(&query(&["store"], &["store"])), set("store", true));
        assert_eq!(cube_set(&query(&["store"], &["country"])), None);
        assert_eq!(
            cube_set(&query(&["country", "device", "source"], &[])),
            None
        );
        assert_eq!(cube_set(&query(&["country", "device"], &["source"])), None);
        assert_eq!(cube_set(&query(&[], &["country"])), None);
    }

    #[test]
    fn the_votes_without_a_custom_key_are_the_totals_less_the_rest() {
        let row = |g: &[&str], answer: &str, n: u64| -> BreakdownRow {
            (
                g.iter().map(|v| (*v).to_owned()).collect(),
                answer.to_owned(),
                n,
            )
        };
        let groups = vec![
            row(&["s1"], "", 3),
            row(&["s1"], "a", 3),
            row(&["s2"], "", 1),
            row(&["s2"], "b", 1),
        ];
        let totals = vec![row(&[], "", 6), row(&[], "a", 4), row(&[], "b", 2)];
        let mut query = BreakdownQuery {
            poll_id: "p".into(),
            by: vec![crate::analytics::Dimension("store".into())],
            ..Default::default()
        };
        let complete = |query: &BreakdownQuery| {
            let mut sums = GroupSums::default();
            sums.add_rows(groups.clone()).unwrap();
            let mut all = GroupSums::default();
            all.add_rows(totals.clone()).unwrap();
            sums.complete_custom(query, all).unwrap();
            let mut rows: Vec<BreakdownRow> = Vec::new();
            for group in sums.into_breakdown(0).groups {
                rows.push((group.values.clone(), String::new(), group.ballots));
                for (answer, n) in group.counts {
                    rows.push((group.values.clone(), answer, n));
                }
            }
            rows.sort();
            rows
        };
        let mut want = groups.clone();
        want.extend([row(&[""], "", 2), row(&[""], "a", 1), row(&[""], "b", 1)]);
        want.sort();
        assert_eq!(complete(&query), want);
        query.filters = vec![(
            crate::analytics::Dimension("store".into()),
            vec!["".into(), "s2".into()],
        )];
        let mut want = vec![
            row(&["s2"], "", 1),
            row(&["s2"], "b", 1),
            row(&[""], "", 2),
            row(&[""], "a", 1),
            row(&[""], "b", 1),
        ];
        want.sort();
        assert_eq!(complete(&query), want);
        query.filters = vec![(
            crate::analytics::Dimension("store".into()),
            vec!["s1".into()],
        )];
        assert_eq!(complete(&query).len(), 2);
        // `by` naming the key twice groups by it twice.
        query.filters.clear();
        query.by.push(crate::analytics::Dimension("store".into()));
        let mut sums = GroupSums::default();
        sums.group(&["s1", "s1"]).unwrap().add("", 3);
        let mut all = GroupSums::default();
        all.group::<&str>(&[]).unwrap().add("", 5);
        sums.complete_custom(&query, all).unwrap();
        let groups = sums.into_breakdown(0).groups;
        assert_eq!(groups[1].values, ["", ""]);
        assert_eq!(groups[1].ballots, 2);
    }

    #[test]
    fn the_group_without_a_custom_key_counts_against_the_cap() {
        let query = BreakdownQuery {
            poll_id: "p".into(),
            by: vec![crate::analytics::Dimension("store".into())],
            ..Default::default()
        };
        let full = |votes_without: u64| {
            let mut sums = GroupSums::default();
            for i in 0..MAX_GROUPS {
                sums.group(&[format!("s{i}")]).unwrap().add("", 1);
            }
            let mut totals = GroupSums::default();
            totals
                .group::<&str>(&[])
                .unwrap()
                .add("", MAX_GROUPS as u64 + votes_without);
            sums.complete_custom(&query, totals).map(|()| sums)
        };
        // Every vote has the key: no group is added, and the cap is not passed.
        assert_eq!(full(0).unwrap().into_breakdown(0).groups.len(), MAX_GROUPS);
        // Votes without it make one group more than the cap: refused, not left out.
        assert!(full(3).is_err());
    }

    #[test]
    fn group_sums_give_each_group_the_answers_its_rows_gave_it() {
        let mut sums = GroupSums::default();
        let mut a = sums.group(&["a"]).unwrap();
        a.add("", 5);
        a.add("yes", 3);
        a.add("no", 2);
        // Answers first seen in another order, one with no votes, one another group has.
        let mut b = sums.group(&["b"]).unwrap();
        b.add("", 1);
        b.add("maybe", 0);
        b.add("yes", 1);
        sums.group(&["a"]).unwrap().add("yes", 4);
        let groups = sums.into_breakdown(7);
        assert_eq!(groups.as_of, 7);
        let group = |values: &str, ballots: u64, counts: &[(&str, u64)]| GroupCounts {
            values: vec![values.to_owned()],
            ballots,
            counts: counts.iter().map(|(a, n)| (a.to_string(), *n)).collect(),
        };
        assert_eq!(
            groups.groups,
            [
                group("a", 5, &[("no", 2), ("yes", 7)]),
                group("b", 1, &[("maybe", 0), ("yes", 1)]),
            ]
        );
    }

    #[test]
    fn group_sums_tell_apart_values_that_join_alike() {
        let mut sums = GroupSums::default();
        sums.group(&["a:b", "c"]).unwrap().add("", 1);
        sums.group(&["a", "b:c"]).unwrap().add("", 2);
        sums.group(&["a", "b:c"]).unwrap().add("x", 2);
        let groups = sums.into_breakdown(0).groups;
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].values, ["a", "b:c"]);
        assert_eq!(groups[0].counts, [("x".to_owned(), 2)].into());
    }

    #[test]
    fn plans_read_whole_buckets_from_rollups_and_cut_ones_from_votes() {
        let m = 60_000;
        assert_eq!(
            BreakdownPlan::new(None, None),
            BreakdownPlan {
                buckets: Some((None, None)),
                segments: vec![],
                raw: vec![]
            }
        );
        assert_eq!(
            BreakdownPlan::new(Some(10 * m), Some(20 * m)),
            BreakdownPlan {
                buckets: Some((Some(600), Some(1200))),
                segments: vec![],
                raw: vec![]
            }
        );
        assert_eq!(
            BreakdownPlan::new(Some(10 * m + 5), Some(20 * m + 7)),
            BreakdownPlan {
                buckets: Some((Some(660), Some(1200))),
                segments: vec![],
                raw: vec![
                    (Some(10 * m + 5), Some(11 * m)),
                    (Some(20 * m), Some(20 * m + 7))
                ]
            }
        );
        assert_eq!(
            BreakdownPlan::new(Some(10 * m + 5), None),
            BreakdownPlan {
                buckets: Some((Some(660), None)),
                segments: vec![],
                raw: vec![(Some(10 * m + 5), Some(11 * m))]
            }
        );
        // Inside one bucket, or across one boundary without a whole bucket: all raw.
        assert_eq!(
            BreakdownPlan::new(Some(10 * m + 5), Some(11 * m + 5)),
            BreakdownPlan {
                buckets: None,
                segments: vec![],
                raw: vec![(Some(10 * m + 5), Some(11 * m + 5))]
            }
        );
        assert_eq!(
            BreakdownPlan::new(Some(5), Some(5)),
            BreakdownPlan {
                buckets: None,
                segments: vec![],
                raw: vec![]
            }
        );
    }

    #[test]
    fn assembly_sums_parts_and_orders_groups() {
        let g = |v: &str| vec![v.to_owned()];
        let rows = [
            (g("FR"), String::new(), 2),
            (g("FR"), "a".to_owned(), 2),
            (g("DE"), String::new(), 2),
            (g("DE"), "b".to_owned(), 2),
            (g("DE"), String::new(), 1),
            (g("DE"), "a".to_owned(), 1),
        ];
        let (first, second) = rows.split_at(4);
        let breakdown = assemble(vec![first.to_vec(), second.to_vec()], 7).unwrap();
        assert_eq!(breakdown.as_of, 7);
        assert_eq!(breakdown.groups[0].values, ["DE"]);
        assert_eq!(breakdown.groups[0].ballots, 3);
        assert_eq!(
            breakdown.groups[0].counts,
            [("a".to_owned(), 1), ("b".to_owned(), 2)].into()
        );
        assert_eq!(breakdown.groups[1].values, ["FR"]);
        let many: Vec<BreakdownRow> = (0..=MAX_GROUPS)
            .map(|i| (vec![i.to_string()], String::new(), 1))
            .collect();
        assert!(assemble(vec![many], 0).is_err(), "too many groups");
        let full = vec![(vec!["DE".to_owned()], String::new(), 1); BREAKDOWN_ROW_LIMIT];
        assert!(
            assemble(vec![full], 0).is_err(),
            "a part that hit its limit"
        );
    }
}
