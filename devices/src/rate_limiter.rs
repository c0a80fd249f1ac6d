//! Token-bucket rate limiters with Firecracker's semantics, for devices
//! whose I/O the user caps (`rate_limiter` of a drive, a network
//! interface's `rx_rate_limiter`/`tx_rate_limiter`, the entropy device).
//!
//! A [`TokenBucket`] holds up to `size` tokens (bytes or operations) and
//! refills at `size / refill_time`, continuously; `one_time_burst` tokens
//! are there once on top, used first and never refilled. A
//! [`RateLimiter`] has an optional bandwidth bucket (bytes) and an
//! optional ops bucket (requests); an operation goes ahead only when both
//! have room, and then takes from both.
//!
//! An operation larger than a whole bucket would never fit: it goes ahead
//! once the bucket is full and leaves it in debt (below zero) for the
//! excess, so the average rate still holds. A device that is refused
//! arms the limiter's timer ([`RateLimiter::timer_fd`], in its event loop)
//! for the time the missing tokens take to refill and tries again when it
//! fires: a refill always wakes it, so a limited device never stalls.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// One bucket's configuration (Firecracker's `TokenBucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketConfig {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start.
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens from empty.
    pub refill_time_ms: u64,
}

/// A device's rate limits (token buckets; none: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Bytes.
    pub bandwidth: Option<BucketConfig>,
    /// Operations.
    pub ops: Option<BucketConfig>,
}

/// A token bucket. Time is passed in, so that it can be tested without
/// sleeping.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Tokens now; negative while repaying an operation larger than
    /// the bucket.
    budget: i128,
    burst: u64,
    /// When `budget` was last brought up to date.
    last: Instant,
    /// Nanoseconds of refill time not yet turned into a whole token.
    carry_ns: u128,
}

impl TokenBucket {
    /// A full bucket, or `None` when it would limit nothing (a zero size
    /// or refill time, as in Firecracker).
    pub fn new(config: BucketConfig, now: Instant) -> Option<Self> {
        if config.size == 0 || config.refill_time_ms == 0 {
            return None;
        }
        Some(Self {
            config,
            budget: i128::from(config.size),
            burst: config.one_time_burst,
            last: now,
            carry_ns: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> BucketConfig {
        self.config
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.config.refill_time_ms) * 1_000_000
    }

    /// Adds the tokens that refilled since the last call.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() + self.carry_ns;
        self.last = now;
        let size = u128::from(self.config.size);
        // tokens = elapsed * size / refill_ns, the remainder carried.
        let product = elapsed.saturating_mul(size);
        let tokens = product / self.refill_ns();
        self.carry_ns = (product % self.refill_ns()) / size;
        let full = i128::from(self.config.size);
        self.budget = (self.budget + i128::try_from(tokens).unwrap_or(i128::MAX)).min(full);
        if self.budget == full {
            self.carry_ns = 0;
        }
    }

    /// Whether `n` tokens are there now (all of them, or a full bucket
    /// for an `n` larger than the bucket).
    fn has_room(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let need = n.saturating_sub(self.burst).min(self.config.size);
        n <= self.burst || self.budget >= i128::from(need)
    }

    /// Takes `n` tokens (call after [`Self::has_room`] said yes).
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// How long until `n` tokens are there.
    fn wait(&self, n: u64) -> Duration {
        let need = i128::from(n.saturating_sub(self.burst).min(self.config.size));
        let missing = u128::try_from(need - self.budget).unwrap_or(0);
        let ns = (missing * self.refill_ns())
            .div_ceil(u128::from(self.config.size))
            .saturating_sub(self.carry_ns);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)).max(Duration::from_micros(100))
    }
}

/// A device's limiter: bandwidth and ops buckets and the timer that wakes
/// the device when a refused operation would fit.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter with the given buckets (either may be absent).
    pub fn new(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> std::io::Result<Self> {
        let now = Instant::now();
        Ok(Self {
            bandwidth: bandwidth.and_then(|c| TokenBucket::new(c, now)),
            ops: ops.and_then(|c| TokenBucket::new(c, now)),
            timer: TimerFd::new().map_err(std::io::Error::from)?,
            blocked: false,
        })
    }

    /// Whether the limiter limits anything.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// The bucket configurations (bandwidth, ops).
    pub fn configs(&self) -> (Option<BucketConfig>, Option<BucketConfig>) {
        (
            self.bandwidth.as_ref().map(TokenBucket::config),
            self.ops.as_ref().map(TokenBucket::config),
        )
    }

    /// Replaces the buckets (a `PATCH` of the device): the new ones start
    /// full. A device waiting on the old ones is woken now.
    pub fn update(&mut self, bandwidth: Option<BucketConfig>, ops: Option<BucketConfig>) {
        let now = Instant::now();
        self.bandwidth = bandwidth.and_then(|c| TokenBucket::new(c, now));
        self.ops = ops.and_then(|c| TokenBucket::new(c, now));
        if self.blocked {
            let _ = self.timer.reset(Duration::from_micros(1), None);
        }
    }

    /// Whether the device is waiting for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Asks for one operation of `bytes` bytes at `now`. If both buckets
    /// have room the tokens are taken and it may go ahead (true); if not,
    /// nothing is taken, the timer is armed for when it would fit and the
    /// device must wait for it (false).
    pub fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        let bw_ok = self
            .bandwidth
            .as_mut()
            .is_none_or(|b| b.has_room(bytes, now));
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.has_room(1, now));
        if bw_ok && ops_ok {
            if let Some(b) = &mut self.bandwidth {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(1);
            }
            return true;
        }
        let wait = [
            self.bandwidth
                .as_ref()
                .filter(|_| !bw_ok)
                .map(|b| b.wait(bytes)),
            self.ops.as_ref().filter(|_| !ops_ok).map(|b| b.wait(1)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.blocked = true,
            Err(e) => {
                // Without a timer nothing would wake the device: let the
                // operation through rather than stall.
                crate::error_ratelimited!("rate limiter: cannot arm its timer: {e}");
                return true;
            }
        }
        false
    }

    /// [`Self::consume_at`] now.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    /// The timer fired (call when [`Self::timer_fd`] is readable): the
    /// device may try again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    /// The timer's descriptor, for the device's event loop.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, burst: u64, ms: u64) -> BucketConfig {
        BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        }
    }

    #[test]
    fn zero_size_or_refill_limits_nothing() {
        let t = Instant::now();
        assert!(TokenBucket::new(cfg(0, 5, 100), t).is_none());
        assert!(TokenBucket::new(cfg(5, 0, 0), t).is_none());
        let l = RateLimiter::new(Some(cfg(0, 0, 0)), None).unwrap();
        assert!(!l.is_limiting());
    }

    /// Consumes `per_op` tokens as fast as the bucket allows over
    /// `secs` of simulated time; returns the tokens taken.
    fn drain(b: &mut TokenBucket, start: Instant, per_op: u64, secs: u64) -> u64 {
        let mut now = start;
        let end = start + Duration::from_secs(secs);
        let mut taken = 0;
        while now < end {
            if b.has_room(per_op, now) {
                b.take(per_op);
                taken += per_op;
            } else {
                now += b.wait(per_op);
            }
        }
        taken
    }

    #[test]
    fn the_rate_is_size_per_refill_time_plus_the_bursts() {
        let t = Instant::now();
        // 1000 tokens per 100 ms = 10 000 per second; full at the start.
        let mut b = TokenBucket::new(cfg(1000, 0, 100), t).unwrap();
        let got = drain(&mut b, t, 100, 10);
        assert!((100_000..=101_100).contains(&got), "{got}");
        // The one-time burst comes once, on top.
        let mut b = TokenBucket::new(cfg(1000, 5000, 100), t).unwrap();
        let got = drain(&mut b, t, 100, 10);
        assert!((105_000..=106_100).contains(&got), "{got}");
        // Odd sizes: no tokens lost to rounding.
        let mut b = TokenBucket::new(cfg(7, 0, 3), t).unwrap();
        let got = drain(&mut b, t, 1, 3);
        assert!((7000..=7008).contains(&got), "{got}");
    }

    #[test]
    fn an_operation_larger_than_the_bucket_goes_and_is_repaid() {
        let t = Instant::now();
        let mut b = TokenBucket::new(cfg(1000, 0, 100), t).unwrap();
        assert!(b.has_room(5000, t));
        b.take(5000);
        // 4000 in debt: the next 1000 take 500 ms to come.
        assert!(!b.has_room(1000, t + Duration::from_millis(400)));
        let w = b.wait(1000);
        assert!(
            w <= Duration::from_millis(100) + Duration::from_micros(100),
            "{w:?}"
        );
        assert!(b.has_room(1000, t + Duration::from_millis(500)));
        // And over time the average still holds.
        let got = drain(&mut b, t + Duration::from_millis(500), 5000, 10);
        assert!((100_000..=106_000).contains(&got), "{got}");
    }

    #[test]
    fn both_buckets_must_have_room_and_a_refusal_arms_the_timer() {
        let t = Instant::now();
        let mut l = RateLimiter::new(Some(cfg(1000, 0, 1000)), Some(cfg(2, 0, 1000))).unwrap();
        assert!(l.consume_at(100, t));
        assert!(l.consume_at(100, t));
        // The ops bucket is empty: refused, nothing taken, timer armed.
        assert!(!l.consume_at(1, t));
        assert!(l.is_blocked());
        assert!(
            !l.consume_at(1, t + Duration::from_secs(5)),
            "blocked until the timer fires"
        );
        // The timer fires in about 500 ms (one op at 2 per second).
        assert!(
            crate::test_fd::readable_within(l.timer_fd(), 2000),
            "the timer never fired"
        );
        l.timer_fired();
        assert!(l.consume_at(100, t + Duration::from_millis(600)));
        // The ops bucket is empty again (0.3 of an op refilled).
        assert!(!l.consume_at(2000, t + Duration::from_millis(700)));
    }
}
