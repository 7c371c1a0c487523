//! Rate limits (GCRA, via governor) and who the client is.
//!
//! A [`Limit`] counts requests per key and answers 429 with `Retry-After` once a key has
//! spent its quota. Keyed state grows with distinct keys; [`Limit::retain_recent`], called
//! periodically by its owner, drops keys whose limit has fully replenished, so memory
//! returns to a bound after a burst of distinct keys.
//!
//! The client address is the socket's peer. `X-Forwarded-For` counts only when the peer is
//! a configured trusted proxy ([`Proxies`]), and then only up to the first address that is
//! not one, read from the right: a client cannot escape its limit by sending the header
//! itself. IPv6 addresses are limited per /64 ([`limit_key`]), so one host cannot rotate
//! through its prefix.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use tally_core::problem::Problem;

/// A configured rate: `N/s`, `N/min` or `N/h`, or with a multiple such as `N/10min` (a
/// burst of N, replenished over the period), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    pub fn per_second(count: u32) -> Option<Rate> {
        NonZeroU32::new(count).map(|count| Rate {
            count,
            per: Duration::from_secs(1),
        })
    }

    /// Parses a configuration value; `off` (or `0/s`) is `None`.
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let (count, unit) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not a rate like 100/s, 10/min or off"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("`{count}` in `{text}` is not a whole number"))?;
        // The unit may carry a multiple: `10/10min` is a burst of 10 refilled over 10 minutes.
        let unit = unit.trim();
        let digits = unit.bytes().take_while(u8::is_ascii_digit).count();
        let (times, unit) = unit.split_at(digits);
        let times: u32 =
            if times.is_empty() {
                1
            } else {
                times.parse().ok().filter(|t| *t > 0).ok_or_else(|| {
                    format!("`{times}` in `{text}` is not a whole number of units")
                })?
            };
        let per = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("`{other}` in `{text}` is not one of s, min, h")),
        } * times;
        Ok(NonZeroU32::new(count).map(|count| Rate { count, per }))
    }

    fn quota(self) -> Quota {
        let period = self.per / self.count.get();
        Quota::with_period(period.max(Duration::from_nanos(1)))
            .expect("a positive period")
            .allow_burst(self.count)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        Rate::parse(text)?.ok_or_else(|| "the rate is off".to_owned())
    }
}

/// The limits' configuration. `None` turns a limit off.
#[derive(Debug, Clone)]
pub struct LimitConfig {
    pub per_ip: Option<Rate>,
    pub per_voter: Option<Rate>,
    pub per_poll: Option<Rate>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            per_ip: Some(Rate {
                count: NonZeroU32::new(100).expect("non-zero"),
                per: Duration::from_secs(1),
            }),
            per_voter: Some(Rate {
                count: NonZeroU32::new(10).expect("non-zero"),
                per: Duration::from_secs(60),
            }),
            per_poll: None,
            trusted_proxies: Vec::new(),
        }
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One keyed limit.
pub struct Limit<K: Hash + Eq + Clone> {
    what: &'static str,
    rate: Rate,
    limiter: Keyed<K>,
    clock: DefaultClock,
}

/// What a passed check leaves: for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Allowance {
    pub limit: u32,
    pub remaining: u32,
}

impl<K: Hash + Eq + Clone> Limit<K> {
    pub fn new(what: &'static str, rate: Rate) -> Self {
        let clock = DefaultClock::default();
        Limit {
            what,
            rate,
            limiter: RateLimiter::dashmap_with_clock(rate.quota(), clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
            clock,
        }
    }

    /// Takes one cell for `key`, or answers 429 with when to retry.
    pub fn check(&self, key: &K) -> Result<Allowance, Problem> {
        match self.limiter.check_key(key) {
            Ok(snapshot) => Ok(Allowance {
                limit: self.rate.count.get(),
                remaining: snapshot.remaining_burst_capacity(),
            }),
            Err(not_until) => {
                metrics::counter!("tally_rate_limited_total", "limit" => self.what).increment(1);
                let wait = not_until.wait_time_from(self.clock.now());
                Err(too_many(self.what, self.rate, wait))
            }
        }
    }

    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

fn describe(rate: Rate) -> String {
    match rate.per.as_secs() {
        1 => format!("{} per second", rate.count),
        60 => format!("{} per minute", rate.count),
        3600 => format!("{} per hour", rate.count),
        secs => format!("{} per {secs} s", rate.count),
    }
}

fn too_many(what: &str, rate: Rate, wait: Duration) -> Problem {
    let mut problem = Problem::new(
        429,
        "rate-limited",
        "Too many requests",
        format!(
            "more than {} {what}; retry after the time in Retry-After",
            describe(rate)
        ),
    );
    // Whole seconds, rounded up: a client that waits that long gets through.
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    problem.retry_after = Some(u32::try_from(seconds).unwrap_or(u32::MAX));
    problem.rate_limit = Some(rate.count.get());
    problem
}

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    trusted: Vec<IpNet>,
}

impl Proxies {
    pub fn new(trusted: Vec<IpNet>) -> Proxies {
        Proxies { trusted }
    }

    fn trusted(&self, ip: &IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// Whether `peer` is a configured trusted proxy.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted(&canonical(peer))
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy — the
    /// rightmost `X-Forwarded-For` entry that is not a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusted(&client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .collect();
        for hop in hops.into_iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                // A malformed entry ends what can be believed.
                break;
            };
            client = canonical(ip);
            if !self.trusted(&client) {
                break;
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The key an address is limited under: itself for IPv4, its /64 for IPv6.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_explain_mistakes() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Some(Rate {
                count: NonZeroU32::new(100).unwrap(),
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(Rate::parse("10/min").unwrap().unwrap().per.as_secs(), 60);
        assert_eq!(Rate::parse("off").unwrap(), None);
        assert_eq!(Rate::parse("0/s").unwrap(), None);
        assert!(Rate::parse("fast").unwrap_err().contains("100/s"));
        assert!(Rate::parse("5/day").unwrap_err().contains("day"));
        assert_eq!(
            Rate::parse("10/10min").unwrap().unwrap().per,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn ipv6_hosts_share_their_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(limit_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies() {
        let limits = Proxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "1.2.3.4, 10.0.0.9".parse().unwrap());
        let untrusted: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(limits.client_ip(untrusted, &headers), untrusted);
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            limits.client_ip(proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        // A spoofed leftmost entry does not move the client further left.
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.9".parse().unwrap(),
        );
        assert_eq!(
            limits.client_ip(proxy, &headers),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(limits.client_ip(proxy, &headers), proxy);
    }

    #[test]
    fn a_key_over_its_quota_waits_while_others_pass() {
        let limit: Limit<IpAddr> = Limit::new("requests", Rate::per_second(2).unwrap());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limit.check(&a).unwrap().remaining, 1);
        assert_eq!(limit.check(&a).unwrap().remaining, 0);
        let refused = limit.check(&a).unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.retry_after, Some(1));
        assert!(limit.check(&b).is_ok());
    }

    /// A million distinct keys, as from a botnet or a scan: once their quotas have
    /// replenished, `retain_recent` forgets every one of them.
    #[test]
    fn a_million_keys_are_forgotten_once_replenished() {
        let limit: Limit<IpAddr> = Limit::new(
            "requests",
            Rate {
                count: NonZeroU32::new(1000).unwrap(),
                per: Duration::from_millis(200),
            },
        );
        let rss_kib = || {
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|status| {
                    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
                    line.split_whitespace().nth(1)?.parse::<u64>().ok()
                })
                .unwrap_or(0)
        };
        let before = rss_kib();
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V6(Ipv6Addr::from((u128::from(i) << 64) | 1));
            limit.check(&limit_key(ip)).unwrap();
        }
        assert_eq!(limit.len(), 1_000_000);
        let full = rss_kib();
        std::thread::sleep(Duration::from_millis(300));
        limit.retain_recent();
        assert_eq!(limit.len(), 0, "replenished keys are dropped");
        // For the record (memory is the process's, not asserted): what a million keys cost
        // and what is left once they are forgotten.
        eprintln!(
            "limiter RSS: {before} KiB before, {full} KiB with 1M keys, {} KiB after retain_recent",
            rss_kib()
        );
    }
}
