//! The bodies of the HTTP API (v1), as types: the services answer with them and clients
//! (the load generator, the end-to-end tests) read them, so both sides agree by
//! construction. Requests that are domain rules live beside their rules
//! ([`crate::poll::NewPoll`], [`crate::poll::PollPatch`], [`crate::vote::VoteRequest`]);
//! results are [`crate::results::Results`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::poll::{Poll, PollStatus};

/// `status` of an accepted vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VoteStatus {
    Accepted,
}

/// `202` to `POST /v1/polls/{id}/votes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub vote_id: String,
    pub status: VoteStatus,
    /// On `after_vote` polls: shows the voter the results (`?results_token=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_token: Option<String>,
}

/// The problem of one line of a batch: the problem+json fields without `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LineProblem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The outcome of one line of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LineResult {
    /// The line's number in the body, from 1.
    pub line: usize,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vote_id: Option<String>,
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub problem: Option<LineProblem>,
}

/// `200` to `POST /v1/votes:batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchResult {
    pub accepted: usize,
    pub rejected: usize,
    pub results: Vec<LineResult>,
}

/// A poll as the API shows it: the record and its derived status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PollDoc {
    #[serde(flatten)]
    pub poll: Poll,
    pub status: PollStatus,
}

/// `GET /v1/polls`: a page of polls and the cursor of the next (`?after=`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PollPage {
    pub polls: Vec<PollDoc>,
    pub next: Option<String>,
}

/// `POST /v1/polls/{id}/tokens` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub voter_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `201` to `POST /v1/polls/{id}/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenIssued {
    pub token: String,
    pub poll_id: String,
    pub voter_id: String,
    pub expires_at: String,
}

/// One answer of one group of a breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GroupOption {
    pub id: String,
    pub count: u64,
    pub share: f64,
    /// Wilson 95% interval of the share; none for an empty group.
    #[schema(value_type = Option<Vec<f64>>, min_items = 2, max_items = 2)]
    pub ci95: Option<[f64; 2]>,
}

/// One segment group of a breakdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BreakdownGroup {
    /// The group's value of each `by` dimension.
    pub segment: BTreeMap<String, String>,
    pub total_votes: u64,
    pub options: Vec<GroupOption>,
    /// Whether the group answered differently from the rest: `p_adjusted` below 0.05.
    pub differs: bool,
    /// The p-value of the group's own test against the rest of the selection; none for a
    /// group below the minimum size or without anything to test.
    pub p_value: Option<f64>,
    /// `p_value` corrected for testing every group of the breakdown at once
    /// (Benjamini–Hochberg: the false discovery rate across the groups).
    pub p_adjusted: Option<f64>,
    /// Too few votes for the test to be trusted: the group has fewer than the minimum
    /// (10 votes; its test is not reported) or an expected count below 5.
    pub small_sample: bool,
}

/// `GET /v1/polls/{id}/breakdown`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BreakdownDoc {
    pub poll_id: String,
    pub by: Vec<String>,
    pub total_votes: u64,
    /// The test behind `differs` and `p_value`.
    pub test: String,
    pub groups: Vec<BreakdownGroup>,
    pub as_of: u64,
}

/// One step of a time series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimeseriesPoint {
    /// Start of the step, RFC 3339.
    pub t: String,
    /// Votes per option (every option of the poll, zeros included).
    pub options: BTreeMap<String, u64>,
}

/// `GET /v1/polls/{id}/timeseries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimeseriesDoc {
    pub poll_id: String,
    pub step_seconds: u32,
    pub points: Vec<TimeseriesPoint>,
}

/// `GET /readyz`: each dependency's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub checks: BTreeMap<String, String>,
}
