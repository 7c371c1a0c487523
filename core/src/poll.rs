//! Polls: what a marketer creates, and the rules a poll definition must follow.
//!
//! A [`Poll`] is stored by the registry as a versioned JSON record; its `status` is derived
//! from the schedule and explicit close/archive times, so it is computed when read, never
//! stored.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::problem::Problem;
use crate::secrets::PseudonymScheme;
use crate::segment::STANDARD_KEYS;

pub const MAX_OPTIONS: usize = 50;
pub const MAX_DIMENSIONS: usize = 10;
/// Origins one poll may list in `allowed_origins`: the sites that embed its widget.
pub const MAX_ALLOWED_ORIGINS: usize = 50;
/// Version of the stored poll record.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PollKind {
    Single,
    Multi,
    Rating,
    Nps,
}

impl PollKind {
    /// Rating and NPS ballots are a number; the tally keys them by its decimal text.
    pub fn is_scale(self) -> bool {
        matches!(self, PollKind::Rating | PollKind::Nps)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Dedupe {
    /// One vote per voter; the first one wins.
    #[default]
    PerVoter,
    /// Every submission counts; retries with the same vote_id still count once.
    None,
}

/// Who may see a poll's results (results endpoint and live stream). Analyst and admin keys
/// always may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultsVisibility {
    /// Everyone, while votes come in.
    #[default]
    Live,
    /// Whoever voted: the vote's 202 carries a `results_token`.
    AfterVote,
    /// Everyone, once the poll is closed.
    AfterClose,
    /// Only analyst and admin keys.
    Private,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollOption {
    pub id: String,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    pub min: i32,
    pub max: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PollStatus {
    Scheduled,
    Open,
    Closed,
    Archived,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Poll {
    pub id: String,
    pub title: String,
    pub question: String,
    pub kind: PollKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PollOption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_choices: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(default)]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub dedupe: Dedupe,
    #[serde(default)]
    pub require_token: bool,
    #[serde(default)]
    pub results_visibility: ResultsVisibility,
    /// Web origins (`scheme://host[:port]`) whose pages may vote in this poll and read its
    /// public results from the browser (the embedded widget); empty: none but tally's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    #[serde(
        default,
        with = "crate::time::opt_rfc3339_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub opens_at: Option<i64>,
    #[serde(
        default,
        with = "crate::time::opt_rfc3339_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closes_at: Option<i64>,
    /// Set by an explicit close; cleared by reopen.
    #[serde(
        default,
        with = "crate::time::opt_rfc3339_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closed_at: Option<i64>,
    #[serde(
        default,
        with = "crate::time::opt_rfc3339_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub archived_at: Option<i64>,
    /// When the poll's votes left the vote log, counted, after it closed (see
    /// `TALLY_PURGE_CLOSED_AFTER_SECONDS`): the log can no longer refuse a second vote of a
    /// voter, so the poll can never take votes again. Set by the processor.
    #[serde(
        default,
        with = "crate::time::opt_rfc3339_lenient",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub log_purged_at: Option<i64>,
    #[serde(with = "crate::time::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: i64,
    #[serde(with = "crate::time::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: i64,
    /// The registry's revision of this record; a conditional update names it.
    #[serde(default)]
    pub version: u64,
    /// How voter ids become voter keys in this poll: set at creation, never changed.
    /// Records from before per-poll pseudonyms have none and read as scheme 1.
    #[serde(default)]
    #[schema(value_type = u8, minimum = 1, maximum = 2)]
    pub voter_key_scheme: PseudonymScheme,
    /// How many partitions of the vote log the poll's votes are spread over, by voter, so a
    /// hot poll's intake and counting use that many processors (each counts its share, and
    /// results and live totals add the shares up); at most the deployment's partition
    /// count is used. Set at creation, never changed: a voter's partition depends on it.
    /// 1, the default: all its votes in one partition.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    #[schema(minimum = 1, maximum = 64)]
    pub spread: u16,
}

fn one() -> u16 {
    1
}

fn is_one(n: &u16) -> bool {
    *n == 1
}

/// A poll as the API shows it: the record plus its derived status.
#[derive(Debug, Serialize)]
pub struct PollView<'a> {
    #[serde(flatten)]
    pub poll: &'a Poll,
    pub status: PollStatus,
}

impl Poll {
    pub fn status(&self, now_ms: i64) -> PollStatus {
        match self.scheduled_status(now_ms) {
            // Its votes left the log: whatever its dates say, it takes no vote again.
            PollStatus::Open | PollStatus::Scheduled if self.log_purged_at.is_some() => {
                PollStatus::Closed
            }
            status => status,
        }
    }

    /// When it stopped taking votes: the earlier of an explicit close and a scheduled end
    /// that has passed; `None` while neither happened.
    pub fn closed_since(&self, now_ms: i64) -> Option<i64> {
        let ended = self.closes_at.filter(|at| *at <= now_ms);
        match (self.closed_at, ended) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The status its dates, close and archive give it, whether or not its votes left the
    /// log: an edit that would make a purged poll open again is refused by it.
    pub fn scheduled_status(&self, now_ms: i64) -> PollStatus {
        if self.archived_at.is_some() {
            PollStatus::Archived
        } else if self.closed_at.is_some() || self.closes_at.is_some_and(|at| at <= now_ms) {
            PollStatus::Closed
        } else if self.opens_at.is_some_and(|at| at > now_ms) {
            PollStatus::Scheduled
        } else {
            PollStatus::Open
        }
    }

    pub fn view(&self, now_ms: i64) -> PollView<'_> {
        PollView {
            poll: self,
            status: self.status(now_ms),
        }
    }

    /// The scale a rating or NPS ballot must fall in.
    pub fn effective_scale(&self) -> Option<Scale> {
        match self.kind {
            PollKind::Nps => Some(Scale { min: 0, max: 10 }),
            PollKind::Rating => Some(self.scale.unwrap_or(Scale { min: 1, max: 5 })),
            PollKind::Single | PollKind::Multi => None,
        }
    }

    /// The keys a tally counts: option ids, or every value of the scale.
    pub fn answer_keys(&self) -> Vec<(String, String)> {
        match self.effective_scale() {
            Some(scale) => (scale.min..=scale.max)
                .map(|v| (v.to_string(), v.to_string()))
                .collect(),
            None => self
                .options
                .iter()
                .map(|o| (o.id.clone(), o.label.clone()))
                .collect(),
        }
    }

    pub fn option(&self, id: &str) -> Option<&PollOption> {
        self.options.iter().find(|o| o.id == id)
    }

    pub fn encode(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Record<'a> {
            v: u32,
            #[serde(flatten)]
            poll: &'a Poll,
        }
        serde_json::to_vec(&Record {
            v: RECORD_VERSION,
            poll: self,
        })
        .unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> crate::Result<Poll> {
        #[derive(Deserialize)]
        struct Record {
            v: u32,
            #[serde(flatten)]
            poll: Poll,
        }
        let record: Record =
            serde_json::from_slice(bytes).map_err(|e| crate::Error::corrupt("poll record", e))?;
        if record.v != RECORD_VERSION {
            return Err(crate::Error::corrupt(
                "poll record",
                format!("record version {} is not supported", record.v),
            ));
        }
        Ok(record.poll)
    }
}

/// `POST /v1/polls`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPoll {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub title: String,
    pub question: String,
    pub kind: PollKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PollOption>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_choices: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dimensions: Vec<String>,
    #[serde(default)]
    pub dedupe: Dedupe,
    #[serde(default)]
    pub require_token: bool,
    #[serde(default)]
    pub results_visibility: ResultsVisibility,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    #[serde(
        default,
        with = "crate::time::opt_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub opens_at: Option<i64>,
    #[serde(
        default,
        with = "crate::time::opt_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closes_at: Option<i64>,
    /// Partitions of the vote log to spread the poll's votes over, for a poll expected to
    /// take more votes than one processor counts (docs/SCALING.md); `per_voter` polls only.
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 64)]
    pub spread: u16,
}

impl NewPoll {
    /// Validates the definition and makes the poll; `make_id` supplies an id when none was given.
    pub fn into_poll(self, now_ms: i64, make_id: impl FnOnce() -> String) -> Result<Poll, Problem> {
        let id = match self.id {
            Some(id) => {
                check_slug("id", &id)?;
                id
            }
            None => make_id(),
        };
        let poll = Poll {
            id,
            title: self.title,
            question: self.question,
            kind: self.kind,
            options: self.options,
            max_choices: self.max_choices,
            scale: self.scale,
            campaign: self.campaign,
            dimensions: self.dimensions,
            dedupe: self.dedupe,
            require_token: self.require_token,
            results_visibility: self.results_visibility,
            allowed_origins: normalize_origins(self.allowed_origins),
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            closed_at: None,
            archived_at: None,
            log_purged_at: None,
            created_at: now_ms,
            updated_at: now_ms,
            version: 0,
            voter_key_scheme: PseudonymScheme::PerPoll,
            spread: self.spread,
        };
        validate(&poll)?;
        Ok(poll)
    }
}

/// `PATCH /v1/polls/{id}`: fields that may change after creation. `null` clears a schedule time.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PollPatch {
    pub title: Option<String>,
    pub question: Option<String>,
    /// The full option list: existing ids keep their place (labels may change), new ids are
    /// added; leaving out an option removes it, which is refused once it has votes.
    pub options: Option<Vec<PollOption>>,
    pub max_choices: Option<u32>,
    pub campaign: Option<String>,
    pub results_visibility: Option<ResultsVisibility>,
    /// The full list: replaces the poll's `allowed_origins` (`[]` removes them all).
    pub allowed_origins: Option<Vec<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub opens_at: Option<Option<i64>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub closes_at: Option<Option<i64>>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<i64>>, D::Error> {
    crate::time::opt_rfc3339::deserialize(deserializer).map(Some)
}

impl PollPatch {
    /// Applies the patch; returns the option ids it removes so the caller can check they
    /// have no votes.
    pub fn apply(self, poll: &mut Poll, now_ms: i64) -> Result<Vec<String>, Problem> {
        let mut removed = Vec::new();
        if let Some(title) = self.title {
            poll.title = title;
        }
        if let Some(question) = self.question {
            poll.question = question;
        }
        if let Some(visibility) = self.results_visibility {
            poll.results_visibility = visibility;
        }
        if let Some(origins) = self.allowed_origins {
            poll.allowed_origins = normalize_origins(origins);
        }
        if let Some(options) = self.options {
            if poll.kind.is_scale() {
                return Err(Problem::invalid(
                    "options",
                    "rating and NPS polls have no options",
                ));
            }
            removed = poll
                .options
                .iter()
                .filter(|old| !options.iter().any(|new| new.id == old.id))
                .map(|o| o.id.clone())
                .collect();
            poll.options = options;
        }
        if let Some(max_choices) = self.max_choices {
            poll.max_choices = Some(max_choices);
        }
        if let Some(campaign) = self.campaign {
            poll.campaign = Some(campaign);
        }
        if let Some(opens_at) = self.opens_at {
            poll.opens_at = opens_at;
        }
        if let Some(closes_at) = self.closes_at {
            poll.closes_at = closes_at;
        }
        poll.updated_at = now_ms;
        validate(poll)?;
        Ok(removed)
    }
}

fn check_slug(field: &str, id: &str) -> Result<(), Problem> {
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_lowercase() || b.is_ascii_digit() || (i > 0 && b == b'-'));
    if valid {
        Ok(())
    } else {
        Err(Problem::invalid(field, format!("`{id}` is not a valid id: use 1-64 of a-z, 0-9 and '-', starting with a letter or digit")))
    }
}

/// Origins as browsers write them in `Origin`: scheme and host in lower case, without the
/// scheme's default port. What cannot be read as an origin is kept as given, for
/// [`validate`] to refuse by name.
fn normalize_origins(origins: Vec<String>) -> Vec<String> {
    origins
        .into_iter()
        .map(|origin| parse_origin(&origin).unwrap_or(origin))
        .collect()
}

/// `origin` in its canonical form (see [`normalize_origins`]), or why it is not a web origin.
pub fn parse_origin(origin: &str) -> Result<String, String> {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return Err(format!(
            "`{origin}` is not an origin: write scheme://host[:port], e.g. https://www.example.com"
        ));
    };
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => "443",
        "http" => "80",
        _ => {
            return Err(format!(
                "`{origin}` is not an origin: the scheme must be http or https"
            ))
        }
    };
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "`{origin}` has a path; an origin is scheme://host[:port] alone, as a browser sends it in the Origin header"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{origin}` has user information; an origin has none"
        ));
    }
    // The port follows the last `:` that is not inside an IPv6 literal's brackets.
    let (host, port) = match authority.rfind(':') {
        Some(at) if !authority[at..].contains(']') => {
            (&authority[..at], Some(&authority[at + 1..]))
        }
        _ => (authority, None),
    };
    let host = host.to_ascii_lowercase();
    let valid_host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if !valid_host {
        return Err(format!("`{origin}` does not name a valid host"));
    }
    match port {
        None => Ok(format!("{scheme}://{host}")),
        Some(port) => {
            let number = port
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0 && port.bytes().all(|b| b.is_ascii_digit()));
            match number {
                None => Err(format!("`{origin}` has an invalid port")),
                Some(_) if port == default_port => Ok(format!("{scheme}://{host}")),
                Some(number) => Ok(format!("{scheme}://{host}:{number}")),
            }
        }
    }
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), Problem> {
    let len = text.chars().count();
    if text.trim().is_empty() {
        return Err(Problem::invalid(
            field,
            format!("`{field}` must not be empty"),
        ));
    }
    if len > max {
        return Err(Problem::invalid(
            field,
            format!("`{field}` is {len} characters long; the limit is {max}"),
        ));
    }
    Ok(())
}

/// Every rule of a poll definition, for creation and for patches.
pub fn validate(poll: &Poll) -> Result<(), Problem> {
    check_text("title", &poll.title, 200)?;
    if !(1..=crate::ports::MAX_SPREAD).contains(&poll.spread) {
        return Err(Problem::invalid(
            "spread",
            format!(
                "a poll's votes are spread over 1 to {} partitions; {} given",
                crate::ports::MAX_SPREAD,
                poll.spread
            ),
        ));
    }
    if poll.spread > 1 && poll.dedupe != Dedupe::PerVoter {
        return Err(Problem::invalid(
            "spread",
            "only a poll with one vote per voter (`dedupe: per_voter`) is spread over \
             partitions: a voter's votes must meet in one partition to be counted once",
        ));
    }
    check_text("question", &poll.question, 1000)?;
    if let Some(campaign) = &poll.campaign {
        check_text("campaign", campaign, 128)?;
    }
    match poll.kind {
        PollKind::Single | PollKind::Multi => {
            let count = poll.options.len();
            if !(2..=MAX_OPTIONS).contains(&count) {
                return Err(Problem::invalid(
                    "options",
                    format!(
                        "a {} poll needs 2 to {MAX_OPTIONS} options; {count} given",
                        kind_name(poll.kind)
                    ),
                ));
            }
            for (i, option) in poll.options.iter().enumerate() {
                let field = format!("options[{i}].id");
                let valid_id = !option.id.is_empty()
                    && option.id.len() <= 64
                    && option
                        .id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !valid_id {
                    return Err(Problem::invalid(
                        field,
                        format!(
                            "option id `{}` must be 1-64 of A-Z, a-z, 0-9, '-' and '_'",
                            option.id
                        ),
                    ));
                }
                if poll.options[..i].iter().any(|o| o.id == option.id) {
                    return Err(Problem::invalid(
                        field,
                        format!("option id `{}` is used twice", option.id),
                    ));
                }
                check_text(&format!("options[{i}].label"), &option.label, 200)?;
            }
            if poll.scale.is_some() {
                return Err(Problem::invalid("scale", "only rating polls have a scale"));
            }
            match (poll.kind, poll.max_choices) {
                (PollKind::Single, Some(_)) => {
                    return Err(Problem::invalid(
                        "max_choices",
                        "only multi polls take max_choices",
                    ))
                }
                (PollKind::Multi, Some(max)) if max == 0 || max as usize > count => {
                    return Err(Problem::invalid(
                        "max_choices",
                        format!(
                            "max_choices must be between 1 and the number of options ({count})"
                        ),
                    ));
                }
                _ => {}
            }
        }
        PollKind::Rating | PollKind::Nps => {
            if !poll.options.is_empty() {
                return Err(Problem::invalid(
                    "options",
                    "rating and NPS polls have no options; their answers are numbers",
                ));
            }
            if poll.max_choices.is_some() {
                return Err(Problem::invalid(
                    "max_choices",
                    "only multi polls take max_choices",
                ));
            }
            if poll.kind == PollKind::Nps && poll.scale.is_some() {
                return Err(Problem::invalid("scale", "the NPS scale is fixed at 0-10"));
            }
            if let Some(scale) = poll.scale {
                if scale.min >= scale.max
                    || scale.max - scale.min > 100
                    || scale.min < -1000
                    || scale.max > 1000
                {
                    return Err(Problem::invalid(
                        "scale",
                        "scale needs min < max, at most 100 steps, within -1000..1000",
                    ));
                }
            }
        }
    }
    if poll.dimensions.len() > MAX_DIMENSIONS {
        return Err(Problem::invalid(
            "dimensions",
            format!("at most {MAX_DIMENSIONS} custom dimensions"),
        ));
    }
    for (i, key) in poll.dimensions.iter().enumerate() {
        let field = format!("dimensions[{i}]");
        let valid = !key.is_empty()
            && key.len() <= 32
            && key.as_bytes()[0].is_ascii_lowercase()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(Problem::invalid(
                field,
                format!(
                    "dimension `{key}` must be 1-32 of a-z, 0-9 and '_', starting with a letter"
                ),
            ));
        }
        if STANDARD_KEYS.contains(&key.as_str()) {
            return Err(Problem::invalid(
                field,
                format!("`{key}` is a standard segment key; list only extra keys"),
            ));
        }
        if poll.dimensions[..i].contains(key) {
            return Err(Problem::invalid(
                field,
                format!("dimension `{key}` is listed twice"),
            ));
        }
    }
    if poll.allowed_origins.len() > MAX_ALLOWED_ORIGINS {
        return Err(Problem::invalid(
            "allowed_origins",
            format!(
                "at most {MAX_ALLOWED_ORIGINS} allowed origins; {} given",
                poll.allowed_origins.len()
            ),
        ));
    }
    for (i, origin) in poll.allowed_origins.iter().enumerate() {
        let field = format!("allowed_origins[{i}]");
        match parse_origin(origin) {
            Ok(canonical) if canonical == *origin => {}
            Ok(canonical) => {
                return Err(Problem::invalid(
                    field,
                    format!("write `{origin}` as `{canonical}`, as browsers send it"),
                ))
            }
            Err(detail) => return Err(Problem::invalid(field, detail)),
        }
        if poll.allowed_origins[..i].contains(origin) {
            return Err(Problem::invalid(
                field,
                format!("origin `{origin}` is listed twice"),
            ));
        }
    }
    if let (Some(opens), Some(closes)) = (poll.opens_at, poll.closes_at) {
        if opens >= closes {
            return Err(Problem::invalid(
                "closes_at",
                "closes_at must be after opens_at",
            ));
        }
    }
    Ok(())
}

pub fn kind_name(kind: PollKind) -> &'static str {
    match kind {
        PollKind::Single => "single",
        PollKind::Multi => "multi",
        PollKind::Rating => "rating",
        PollKind::Nps => "nps",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_poll(json: &str) -> Result<Poll, Problem> {
        let new: NewPoll = crate::problem::parse_json(json.as_bytes())?;
        new.into_poll(1_000, || "generated".into())
    }

    #[test]
    fn accepts_every_kind() {
        new_poll(r#"{"title":"t","question":"q","kind":"single","options":[{"id":"a","label":"A"},{"id":"b","label":"B"}]}"#).unwrap();
        new_poll(r#"{"title":"t","question":"q","kind":"multi","max_choices":2,"options":[{"id":"a","label":"A"},{"id":"b","label":"B"}]}"#).unwrap();
        let rating = new_poll(
            r#"{"id":"r-1","title":"t","question":"q","kind":"rating","scale":{"min":1,"max":7}}"#,
        )
        .unwrap();
        assert_eq!(rating.answer_keys().len(), 7);
        let nps = new_poll(r#"{"title":"t","question":"q","kind":"nps"}"#).unwrap();
        assert_eq!(nps.id, "generated");
        assert_eq!(nps.answer_keys().len(), 11);
    }

    #[test]
    fn rejects_bad_definitions_naming_the_field() {
        let cases = [
            (
                r#"{"id":"Bad Id","title":"t","question":"q","kind":"nps"}"#,
                "id",
            ),
            (
                r#"{"title":"t","question":"q","kind":"single","options":[{"id":"a","label":"A"}]}"#,
                "options",
            ),
            (
                r#"{"title":"t","question":"q","kind":"single","options":[{"id":"a","label":"A"},{"id":"a","label":"B"}]}"#,
                "options[1].id",
            ),
            (r#"{"title":"","question":"q","kind":"nps"}"#, "title"),
            (
                r#"{"title":"t","question":"q","kind":"rating","scale":{"min":5,"max":1}}"#,
                "scale",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","dimensions":["country"]}"#,
                "dimensions[0]",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","colour":"red"}"#,
                "colour",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","spread":0}"#,
                "spread",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","spread":65}"#,
                "spread",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","spread":4,"dedupe":"none"}"#,
                "spread",
            ),
            (
                r#"{"title":"t","question":"q","kind":"nps","spread":70000}"#,
                "spread",
            ),
        ];
        for (json, field) in cases {
            let problem = new_poll(json).unwrap_err();
            assert_eq!(problem.field.as_deref(), Some(field), "{json}: {problem:?}");
        }
    }

    /// A spread is kept with the poll, and only shown when it is more than one partition;
    /// a patch cannot change it.
    #[test]
    fn a_spread_is_kept_and_never_patched() {
        let spread = new_poll(r#"{"title":"t","question":"q","kind":"nps","spread":8}"#).unwrap();
        assert_eq!(spread.spread, 8);
        let stored = serde_json::to_value(&spread).unwrap();
        assert_eq!(stored["spread"], 8);
        let plain = new_poll(r#"{"title":"t","question":"q","kind":"nps"}"#).unwrap();
        assert_eq!(plain.spread, 1);
        assert!(serde_json::to_value(&plain)
            .unwrap()
            .get("spread")
            .is_none());
        let read: Poll = serde_json::from_value(serde_json::to_value(&plain).unwrap()).unwrap();
        assert_eq!(
            read.spread, 1,
            "a record without one reads as one partition"
        );
        let patch: Result<PollPatch, _> = crate::problem::parse_json(br#"{"spread":2}"#);
        assert_eq!(patch.unwrap_err().field.as_deref(), Some("spread"));
    }

    #[test]
    fn status_follows_schedule_and_close() {
        let mut poll = new_poll(r#"{"title":"t","question":"q","kind":"nps","opens_at":"1970-01-01T00:00:02Z","closes_at":"1970-01-01T00:00:04Z"}"#).unwrap();
        assert_eq!(poll.status(1_000), PollStatus::Scheduled);
        assert_eq!(poll.status(3_000), PollStatus::Open);
        assert_eq!(poll.status(4_000), PollStatus::Closed);
        poll.closed_at = Some(2_500);
        assert_eq!(poll.status(3_000), PollStatus::Closed);
        poll.archived_at = Some(3_000);
        assert_eq!(poll.status(3_000), PollStatus::Archived);
    }

    #[test]
    fn a_purged_poll_stays_closed_whatever_its_dates_say() {
        let mut poll = new_poll(
            r#"{"title":"t","question":"q","kind":"nps","closes_at":"1970-01-01T00:00:04Z"}"#,
        )
        .unwrap();
        poll.log_purged_at = Some(5_000);
        assert_eq!(poll.status(6_000), PollStatus::Closed);
        // An edit moved the end later: it would be open again, and stays closed.
        poll.closes_at = Some(9_000);
        assert_eq!(poll.scheduled_status(6_000), PollStatus::Open);
        assert_eq!(poll.status(6_000), PollStatus::Closed);
        poll.archived_at = Some(7_000);
        assert_eq!(poll.status(8_000), PollStatus::Archived);
    }

    #[test]
    fn refuses_schedule_times_out_of_range() {
        let problem =
            new_poll(r#"{"title":"t","question":"q","kind":"nps","closes_at":"1767225600000000"}"#)
                .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("closes_at"), "{problem:?}");
        assert!(
            problem.detail.contains("microseconds"),
            "{}",
            problem.detail
        );
    }

    #[test]
    fn a_stored_time_that_cannot_be_read_reads_as_absent() {
        // An older version stored `""` for a time it could not format.
        let mut record: serde_json::Value = serde_json::from_slice(
            &new_poll(r#"{"title":"t","question":"q","kind":"nps"}"#)
                .unwrap()
                .encode(),
        )
        .unwrap();
        record["closes_at"] = serde_json::json!("");
        record["opens_at"] = serde_json::json!("not a time");
        let poll = Poll::decode(&serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!((poll.opens_at, poll.closes_at), (None, None));
    }

    #[test]
    fn allowed_origins_are_stored_as_browsers_send_them() {
        let poll = new_poll(
            r#"{"title":"t","question":"q","kind":"nps","allowed_origins":["HTTPS://Shop.Example.com:443","http://127.0.0.2:8080","http://[::1]:3000"]}"#,
        )
        .unwrap();
        assert_eq!(
            poll.allowed_origins,
            [
                "https://shop.example.com",
                "http://127.0.0.2:8080",
                "http://[::1]:3000"
            ]
        );
        assert_eq!(Poll::decode(&poll.encode()).unwrap(), poll);
        let mut patched = poll.clone();
        let patch: PollPatch =
            serde_json::from_str(r#"{"allowed_origins":["https://a.example"]}"#).unwrap();
        patch.apply(&mut patched, 2_000).unwrap();
        assert_eq!(patched.allowed_origins, ["https://a.example"]);
        let clear: PollPatch = serde_json::from_str(r#"{"allowed_origins":[]}"#).unwrap();
        clear.apply(&mut patched, 3_000).unwrap();
        assert!(patched.allowed_origins.is_empty());
    }

    #[test]
    fn refuses_what_is_not_an_origin_naming_the_entry() {
        for (origin, says) in [
            ("https://example.com/page", "path"),
            ("example.com", "scheme://host"),
            ("ftp://example.com", "http or https"),
            ("https://exa mple.com", "valid host"),
            ("https://example.com:99999", "port"),
            ("https://user@example.com", "user information"),
            ("null", "scheme://host"),
            ("*", "scheme://host"),
        ] {
            let json = format!(
                r#"{{"title":"t","question":"q","kind":"nps","allowed_origins":["https://ok.example",{}]}}"#,
                serde_json::to_string(origin).unwrap()
            );
            let problem = new_poll(&json).unwrap_err();
            assert_eq!(
                problem.field.as_deref(),
                Some("allowed_origins[1]"),
                "{origin}"
            );
            assert!(
                problem.detail.contains(says),
                "{origin}: {}",
                problem.detail
            );
        }
        let twice = new_poll(r#"{"title":"t","question":"q","kind":"nps","allowed_origins":["https://a.example","https://A.example:443"]}"#).unwrap_err();
        assert!(twice.detail.contains("twice"), "{}", twice.detail);
        let many: Vec<String> = (0..=MAX_ALLOWED_ORIGINS)
            .map(|i| format!("https://s{i}.example"))
            .collect();
        let json = serde_json::json!({"title": "t", "question": "q", "kind": "nps", "allowed_origins": many});
        let problem = new_poll(&json.to_string()).unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("allowed_origins"));
    }

    #[test]
    fn record_round_trips_with_version() {
        let poll = new_poll(r#"{"title":"t","question":"q","kind":"nps","campaign":"c"}"#).unwrap();
        assert_eq!(Poll::decode(&poll.encode()).unwrap(), poll);
        assert!(Poll::decode(br#"{"v":9}"#).is_err());
    }
}
