//! Rate-limited logging for messages a guest can trigger in a loop.
//!
//! A guest that repeats a bad register write or a malformed request
//! millions of times a second must not turn capsule's log into a disk
//! filler. Every such message goes through [`log_ratelimited!`](crate::log_ratelimited) (or its
//! `warn_`/`error_`/... shorthands): each call site has its own
//! [`LogLimit`], which lets [`BURST`] messages through per [`INTERVAL`]
//! and counts the rest. The last message let through in an interval says
//! that more will be suppressed; the first one of a later interval says
//! how many were (`[N more suppressed]`). So a flood costs at most
//! `BURST` lines per interval per call site, and nothing is lost silently.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Messages let through per call site and interval.
pub const BURST: u32 = 10;
/// The length of an interval.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` messages were dropped since the last one let
    /// through; `last` means it is the last one of this interval.
    Log {
        /// Messages suppressed since the previous one logged.
        suppressed: u64,
        /// Later messages in this interval will be suppressed.
        last: bool,
    },
    /// Drop it (and count it).
    Suppress,
}

#[derive(Debug)]
struct State {
    start: Option<Instant>,
    passed: u32,
    suppressed: u64,
}

/// The limit of one call site. `const`, so a `static` per site needs no
/// set-up.
#[derive(Debug)]
pub struct LogLimit {
    state: Mutex<State>,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimit {
    /// A limit that has let nothing through yet.
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(State {
                start: None,
                passed: 0,
                suppressed: 0,
            }),
        }
    }

    /// Decides about a message arriving now.
    pub fn check(&self) -> Verdict {
        self.check_at(Instant::now())
    }

    /// Decides about a message arriving at `now`.
    pub fn check_at(&self, now: Instant) -> Verdict {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = st
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= INTERVAL);
        if expired {
            st.start = Some(now);
            st.passed = 0;
        }
        if st.passed >= BURST {
            st.suppressed += 1;
            return Verdict::Suppress;
        }
        st.passed += 1;
        Verdict::Log {
            suppressed: std::mem::take(&mut st.suppressed),
            last: st.passed == BURST,
        }
    }
}

/// The text appended to a message let through with `verdict`.
pub fn suffix(suppressed: u64, last: bool) -> String {
    let mut s = String::new();
    if suppressed > 0 {
        s.push_str(&format!(" [{suppressed} more suppressed]"));
    }
    if last {
        s.push_str(&format!(
            " [more like this suppressed for up to {} s]",
            INTERVAL.as_secs()
        ));
    }
    s
}

#[doc(hidden)]
pub use log as __log;

/// `log::log!` with a per-call-site rate limit (see the module docs):
/// `log_ratelimited!(log::Level::Warn, "virtio-mmio: {x}")`.
#[macro_export]
macro_rules! log_ratelimited {
    ($lvl:expr, $($arg:tt)+) => {{
        let lvl = $lvl;
        if $crate::ratelimit::__log::log_enabled!(lvl) {
            static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
            if let $crate::ratelimit::Verdict::Log { suppressed, last } = LIMIT.check() {
                $crate::ratelimit::__log::log!(
                    lvl,
                    "{}{}",
                    format_args!($($arg)+),
                    $crate::ratelimit::suffix(suppressed, last)
                );
            }
        }
    }};
}

/// `log::error!`, rate-limited per call site.
#[macro_export]
macro_rules! error_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!($crate::ratelimit::__log::Level::Error, $($arg)+) };
}

/// `log::warn!`, rate-limited per call site.
#[macro_export]
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!($crate::ratelimit::__log::Level::Warn, $($arg)+) };
}

/// `log::info!`, rate-limited per call site.
#[macro_export]
macro_rules! info_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!($crate::ratelimit::__log::Level::Info, $($arg)+) };
}

/// `log::debug!`, rate-limited per call site.
#[macro_export]
macro_rules! debug_ratelimited {
    ($($arg:tt)+) => { $crate::log_ratelimited!($crate::ratelimit::__log::Level::Debug, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports_per_interval() {
        let l = LogLimit::new();
        let t0 = Instant::now();
        let mut logged = Vec::new();
        // 1000 messages per interval over three intervals.
        for i in 0..3000u32 {
            let t = t0 + INTERVAL * (i / 1000) + Duration::from_micros(u64::from(i % 1000));
            if let Verdict::Log { suppressed, last } = l.check_at(t) {
                logged.push((i, suppressed, last));
            }
        }
        assert_eq!(logged.len(), 3 * BURST as usize);
        let b = BURST as usize;
        assert_eq!(logged[0], (0, 0, false));
        assert_eq!(logged[b - 1], (BURST - 1, 0, true));
        // The first message of the next interval reports the rest of the
        // previous one.
        assert_eq!(logged[b], (1000, 1000 - u64::from(BURST), false));
        assert_eq!(logged[2 * b], (2000, 1000 - u64::from(BURST), false));
    }

    #[test]
    fn suffix_text() {
        assert_eq!(suffix(0, false), "");
        assert_eq!(suffix(7, false), " [7 more suppressed]");
        assert!(suffix(0, true).contains("suppressed for up to 5 s"));
    }

    #[test]
    fn each_call_site_has_its_own_limit() {
        // Only checks that the macros expand and run (the logger is not
        // installed in unit tests, so nothing is printed).
        for _ in 0..100 {
            crate::warn_ratelimited!("a {}", 1);
            crate::error_ratelimited!("b");
        }
    }
}
