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
        }
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
}
