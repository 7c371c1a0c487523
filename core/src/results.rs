//! Exact poll results. A [`Tally`] is what the processor and the warehouse count; [`Results`]
//! is the document the API serves (also the data of the SSE `snapshot` and `totals` events),
//! made from a tally and the poll in one place so every path shows the same numbers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::poll::{Poll, PollKind, PollStatus};
use crate::vote::Vote;

/// Counts of one poll up to a position of the vote log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Counted ballots.
    pub ballots: u64,
    /// Distinct non-empty voter keys among them.
    pub unique_voters: u64,
    /// Ballots per option id (single, multi) or per value (rating, NPS).
    pub counts: BTreeMap<String, u64>,
    /// Log sequence of the last vote counted; 0 before the first.
    pub as_of: u64,
}

impl Tally {
    /// A poll's tally from its shares, one per partition of the log its votes come from
    /// (see [`crate::ports::Warehouse::tally_by_partition`]): everything added up, `as_of`
    /// the sum of theirs ([`crate::ports::poll_as_of`]). Voters add up because a voter's
    /// votes go to one partition (only `per_voter` polls are spread over several).
    pub fn merged<'a>(shares: impl IntoIterator<Item = &'a Tally>) -> Tally {
        let mut whole = Tally::default();
        for share in shares {
            whole.ballots += share.ballots;
            whole.unique_voters += share.unique_voters;
            whole.as_of = whole.as_of.saturating_add(share.as_of);
            for (answer, count) in &share.counts {
                *whole.counts.entry(answer.clone()).or_default() += count;
            }
        }
        whole
    }

    /// Counts one vote. `new_voter` says whether its voter key was not seen before.
    pub fn add(&mut self, vote: &Vote, seq: u64, new_voter: bool) {
        debug_assert!(seq > self.as_of, "votes are counted in log order");
        self.ballots += 1;
        if new_voter {
            self.unique_voters += 1;
        }
        for key in &vote.choice {
            *self.counts.entry(key.clone()).or_default() += 1;
        }
        self.as_of = seq;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OptionResult {
    pub id: String,
    pub label: String,
    pub count: u64,
    /// Share of ballots that chose it (multi-choice shares may add up to more than 1).
    pub share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RatingResult {
    pub mean: Option<f64>,
    pub distribution: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NpsResult {
    pub score: Option<f64>,
    pub promoters: u64,
    pub passives: u64,
    pub detractors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Results {
    pub poll_id: String,
    pub kind: PollKind,
    pub status: PollStatus,
    pub total_votes: u64,
    pub unique_voters: u64,
    pub options: Vec<OptionResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rating: Option<RatingResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nps: Option<NpsResult>,
    pub as_of: u64,
    pub updated_at: String,
    /// The partition of the log these totals count, when they are one partition's share of
    /// a poll's votes (what a processor counts and publishes; the warehouse reads them per
    /// partition too): [`Results::merge`] adds a poll's shares up. `None` for a whole poll,
    /// as the API serves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub partition: Option<u16>,
}

pub fn share(count: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        count as f64 / total as f64
    }
}

impl Results {
    pub fn new(poll: &Poll, tally: &Tally, now_ms: i64) -> Results {
        let total = tally.ballots;
        let mut options: Vec<OptionResult> = poll
            .answer_keys()
            .into_iter()
            .map(|(id, label)| {
                let count = tally.counts.get(&id).copied().unwrap_or(0);
                OptionResult {
                    id,
                    label,
                    count,
                    share: share(count, total),
                }
            })
            .collect();
        // Counts for keys the poll no longer lists are still shown: nothing counted disappears.
        for (id, count) in &tally.counts {
            if !options.iter().any(|o| &o.id == id) {
                options.push(OptionResult {
                    id: id.clone(),
                    label: id.clone(),
                    count: *count,
                    share: share(*count, total),
                });
            }
        }
        let distribution: BTreeMap<String, u64> =
            options.iter().map(|o| (o.id.clone(), o.count)).collect();
        let rating = poll.kind.is_scale().then(|| {
            let sum: i64 = tally
                .counts
                .iter()
                .map(|(value, count)| value.parse::<i64>().unwrap_or(0) * *count as i64)
                .sum();
            RatingResult {
                mean: (total > 0).then(|| sum as f64 / total as f64),
                distribution,
            }
        });
        let nps = (poll.kind == PollKind::Nps).then(|| {
            let count_where = |pred: fn(i64) -> bool| -> u64 {
                tally
                    .counts
                    .iter()
                    .filter(|(value, _)| value.parse::<i64>().map(pred).unwrap_or(false))
                    .map(|(_, c)| *c)
                    .sum()
            };
            let promoters = count_where(|v| v >= 9);
            let passives = count_where(|v| (7..=8).contains(&v));
            let detractors = count_where(|v| v <= 6);
            let score =
                (total > 0).then(|| (promoters as f64 - detractors as f64) * 100.0 / total as f64);
            NpsResult {
                score,
                promoters,
                passives,
                detractors,
            }
        });
        Results {
            poll_id: poll.id.clone(),
            kind: poll.kind,
            status: poll.status(now_ms),
            total_votes: total,
            unique_voters: tally.unique_voters,
            options,
            rating,
            nps,
            as_of: tally.as_of,
            updated_at: crate::time::format_ms(now_ms),
            partition: None,
        }
    }

    /// A poll's totals from its shares, one per partition of the log its votes come from:
    /// the counts added up (ballots, voters, each answer, and the rating and NPS counts),
    /// shares of ballots, the mean and the score computed again, `as_of` the sum of theirs
    /// (see [`crate::ports::poll_as_of`]), the newest share's `updated_at` and status.
    /// Voters add up because a voter's votes go to one partition. `None` without shares.
    pub fn merge<'a>(shares: impl IntoIterator<Item = &'a Results>) -> Option<Results> {
        let mut shares = shares.into_iter();
        let first = shares.next()?;
        let mut merged = first.clone();
        merged.partition = None;
        for share in shares {
            merged.total_votes += share.total_votes;
            merged.unique_voters += share.unique_voters;
            merged.as_of = merged.as_of.saturating_add(share.as_of);
            if share.updated_at > merged.updated_at {
                merged.updated_at.clone_from(&share.updated_at);
                merged.status = share.status;
            }
            for option in &share.options {
                match merged.options.iter_mut().find(|o| o.id == option.id) {
                    Some(held) => held.count += option.count,
                    None => merged.options.push(option.clone()),
                }
            }
            if let (Some(held), Some(nps)) = (&mut merged.nps, &share.nps) {
                held.promoters += nps.promoters;
                held.passives += nps.passives;
                held.detractors += nps.detractors;
            }
        }
        let total = merged.total_votes;
        for option in &mut merged.options {
            option.share = share(option.count, total);
        }
        if let Some(rating) = &mut merged.rating {
            rating.distribution = merged
                .options
                .iter()
                .map(|o| (o.id.clone(), o.count))
                .collect();
            let sum: i64 = rating
                .distribution
                .iter()
                .map(|(value, count)| value.parse::<i64>().unwrap_or(0) * *count as i64)
                .sum();
            rating.mean = (total > 0).then(|| sum as f64 / total as f64);
        }
        if let Some(nps) = &mut merged.nps {
            nps.score = (total > 0)
                .then(|| (nps.promoters as f64 - nps.detractors as f64) * 100.0 / total as f64);
        }
        Some(merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poll::NewPoll;

    #[test]
    fn nps_score_and_mean() {
        let new: NewPoll =
            serde_json::from_str(r#"{"title":"t","question":"q","kind":"nps"}"#).unwrap();
        let poll = new.into_poll(0, || "p".into()).unwrap();
        let tally = Tally {
            ballots: 4,
            unique_voters: 4,
            counts: [
                ("10".to_owned(), 2),
                ("7".to_owned(), 1),
                ("0".to_owned(), 1),
            ]
            .into(),
            as_of: 9,
        };
        let results = Results::new(&poll, &tally, 0);
        let nps = results.nps.unwrap();
        assert_eq!((nps.promoters, nps.passives, nps.detractors), (2, 1, 1));
        assert_eq!(nps.score, Some(25.0));
        assert_eq!(results.rating.unwrap().mean, Some(27.0 / 4.0));
        assert_eq!(results.options.len(), 11);
    }

    /// A poll's shares add up to the results of all its votes counted at once.
    #[test]
    fn shares_merge_into_the_whole() {
        let tally = |counts: &[(&str, u64)], voters: u64, as_of: u64| Tally {
            ballots: counts.iter().map(|(_, n)| n).sum(),
            unique_voters: voters,
            counts: counts.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect(),
            as_of,
        };
        for kind in ["nps", "rating", "single"] {
            let body = match kind {
                "single" => r#"{"title":"t","question":"q","kind":"single","options":[{"id":"a","label":"A"},{"id":"b","label":"B"}]}"#.to_owned(),
                "rating" => r#"{"title":"t","question":"q","kind":"rating","scale":{"min":1,"max":5}}"#.to_owned(),
                _ => r#"{"title":"t","question":"q","kind":"nps"}"#.to_owned(),
            };
            let new: NewPoll = serde_json::from_str(&body).unwrap();
            let poll = new.into_poll(0, || "p".into()).unwrap();
            let (one, two) = match kind {
                "single" => (
                    tally(&[("a", 3), ("b", 1)], 4, 7),
                    tally(&[("b", 2), ("gone", 1)], 3, 5),
                ),
                "rating" => (tally(&[("1", 2), ("5", 1)], 3, 7), tally(&[("4", 2)], 2, 5)),
                _ => (
                    tally(&[("10", 2), ("7", 1)], 3, 7),
                    tally(&[("0", 3), ("9", 1)], 4, 5),
                ),
            };
            let mut whole = one.clone();
            whole.ballots += two.ballots;
            whole.unique_voters += two.unique_voters;
            whole.as_of += two.as_of;
            for (key, n) in &two.counts {
                *whole.counts.entry(key.clone()).or_default() += n;
            }
            let mut first = Results::new(&poll, &one, 1_000);
            first.partition = Some(0);
            let mut second = Results::new(&poll, &two, 2_000);
            second.partition = Some(3);
            let merged = Results::merge([&first, &second]).unwrap();
            let expected = Results::new(&poll, &whole, 2_000);
            assert_eq!(merged, expected, "{kind}");
            assert_eq!(Results::merge([&first]).unwrap().partition, None);
        }
        assert_eq!(Results::merge([]), None);
    }
}
