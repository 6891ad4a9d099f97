//! The per-key rate limit: a token bucket per API key (`rate` tokens a second, holding at most
//! `burst`), answered 429 with `Retry-After` through the core's `Error::RateLimited`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The default: far above what one client (the published one included) sends, low enough
/// that a runaway key cannot monopolise the server.
pub const DEFAULT_RATE: RateLimit = RateLimit {
    per_second: 1000.0,
    burst: 2000.0,
};

/// A rate: `per_second` requests a second sustained, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added a second.
    pub per_second: f64,
    /// The bucket's size.
    pub burst: f64,
}

impl RateLimit {
    /// `n` a second with a burst of `n` (one second's worth).
    pub fn per_second(n: f64) -> RateLimit {
        RateLimit {
            per_second: n,
            burst: n.max(1.0),
        }
    }
}

/// `--rate-limit` refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid rate limit {given:?}: expected N/s (a positive number of requests a second, e.g. 100/s)")]
pub struct BadRate {
    given: String,
}

impl FromStr for RateLimit {
    type Err = BadRate;

    /// `N/s` (or plain `N`), N > 0.
    fn from_str(s: &str) -> Result<RateLimit, BadRate> {
        let n = s.trim().strip_suffix("/s").unwrap_or(s.trim());
        match n.trim().parse::<f64>() {
            Ok(n) if n.is_finite() && n > 0.0 => Ok(RateLimit::per_second(n)),
            _ => Err(BadRate { given: s.into() }),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every key.
#[derive(Debug)]
pub struct Limiter {
    rate: Mutex<RateLimit>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A refused request: when to try again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// Until one token is there.
    pub retry_after: Duration,
}

impl Limiter {
    /// Buckets at `rate`.
    pub fn new(rate: RateLimit) -> Limiter {
        Limiter {
            rate: Mutex::new(rate),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Changes the rate (buckets start full again).
    pub fn set(&self, rate: RateLimit) {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = rate;
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The current rate.
    pub fn rate(&self) -> RateLimit {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a token of `key`'s bucket at `now`: the tokens left, or when to retry.
    pub fn take(&self, key: &str, now: Instant) -> Result<u64, Refused> {
        let rate = self.rate();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(b.tokens.floor() as u64)
        } else {
            let secs = (1.0 - b.tokens) / rate.per_second;
            Err(Refused {
                retry_after: Duration::from_secs_f64(secs.max(0.001)),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            "5/s".parse::<RateLimit>().unwrap(),
            RateLimit::per_second(5.0)
        );
        assert_eq!("0.5/s".parse::<RateLimit>().unwrap().burst, 1.0);
        assert_eq!("7".parse::<RateLimit>().unwrap().per_second, 7.0);
        for bad in ["0/s", "-1/s", "x/s", "", "inf/s", "5/m"] {
            let e = bad.parse::<RateLimit>().unwrap_err().to_string();
            assert!(e.contains("N/s"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_bucket_empties_refills_and_is_per_key() {
        let l = Limiter::new(RateLimit::per_second(2.0));
        let t0 = Instant::now();
        assert_eq!(l.take("a", t0), Ok(1));
        assert_eq!(l.take("a", t0), Ok(0));
        let r = l.take("a", t0).unwrap_err();
        assert!((r.retry_after.as_secs_f64() - 0.5).abs() < 1e-6, "{r:?}");
        // another key has its own bucket
        assert_eq!(l.take("b", t0), Ok(1));
        // half a second later one token is back, not more
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.take("a", t1), Ok(0));
        assert!(l.take("a", t1).is_err());
        // never more than the burst
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(l.take("a", t2), Ok(1));
    }
}
