//! Rate limits of vote intake: per client address (the service's [`Guard`]), per voter,
//! per poll, and on new browser identities per address (the limiter itself is
//! `tally_service::limits`).
//!
//! [`Guard`]: tally_service::http::Guard

use std::net::IpAddr;

use ipnet::IpNet;
use tally_core::problem::Problem;
pub use tally_service::limits::{limit_key, Allowance, Limit, Proxies, Rate};

/// The limits' configuration. `None` turns a limit off.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    /// Requests per client address (IPv6: per /64), before a body is read.
    pub per_ip: Option<Rate>,
    /// Votes per voter.
    pub per_voter: Option<Rate>,
    /// Votes per poll.
    pub per_poll: Option<Rate>,
    /// Browser identities (`tally_voter` cookies) made per client address: a browser that
    /// drops its cookie is a new voter, so new voters from one address are what is limited.
    pub new_voters_per_ip: Option<Rate>,
    /// Failed authentications (unknown keys on the batch route) per client address.
    pub auth_failures: Option<Rate>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// The default request rate per client address.
pub const DEFAULT_RATE_PER_IP: &str = "100/s";
/// The default vote rate per voter.
pub const DEFAULT_RATE_PER_VOTER: &str = "10/min";
/// The default vote rate per poll.
pub const DEFAULT_RATE_PER_POLL: &str = "off";
/// The default rate of new browser voters per client address.
pub const DEFAULT_RATE_NEW_VOTERS_PER_IP: &str = "60/h";

fn rate(text: &str) -> Option<Rate> {
    Rate::parse(text).expect("a valid default rate")
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            per_ip: rate(DEFAULT_RATE_PER_IP),
            per_voter: rate(DEFAULT_RATE_PER_VOTER),
            per_poll: rate(DEFAULT_RATE_PER_POLL),
            new_voters_per_ip: rate(DEFAULT_RATE_NEW_VOTERS_PER_IP),
            auth_failures: tally_service::http::guard::default_auth_failures(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// The per-vote limits of one ingest process.
pub struct Limits {
    pub per_voter: Option<Limit<String>>,
    pub per_poll: Option<Limit<String>>,
    pub new_voters: Option<Limit<IpAddr>>,
}

impl Limits {
    pub fn new(config: &LimitConfig) -> Limits {
        Limits {
            per_voter: config
                .per_voter
                .map(|rate| Limit::new("votes from one voter", rate)),
            per_poll: config
                .per_poll
                .map(|rate| Limit::new("votes to this poll", rate)),
            new_voters: config
                .new_voters_per_ip
                .map(|rate| Limit::new("new browser voters from one client address", rate)),
        }
    }

    /// Checks the per-voter (when the vote has a voter) and per-poll limits of one vote.
    pub fn check_vote(&self, poll_id: &str, voter_key: &str) -> Result<(), Problem> {
        if let (Some(limit), false) = (&self.per_voter, voter_key.is_empty()) {
            limit.check(&voter_key.to_owned())?;
        }
        if let Some(limit) = &self.per_poll {
            limit.check(&poll_id.to_owned())?;
        }
        Ok(())
    }

    /// Takes one new browser identity for the client at `ip`.
    pub fn check_new_voter(&self, ip: IpAddr) -> Result<(), Problem> {
        match &self.new_voters {
            Some(limit) => limit.check(&limit_key(ip)).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Forgets keys whose limits have replenished.
    pub fn retain_recent(&self) {
        if let Some(limit) = &self.per_voter {
            limit.retain_recent();
        }
        if let Some(limit) = &self.per_poll {
            limit.retain_recent();
        }
        if let Some(limit) = &self.new_voters {
            limit.retain_recent();
        }
    }
}
