//! OOM kills in the guest, for events watches ([`super::Phase::Watch`]):
//! the kernel's count of processes its OOM killer killed
//! (`oom_kill` in `/proc/vmstat`, Linux 4.13+), compared with what each
//! watch has seen.

use std::time::{Duration, Instant};

use exec_proto::GuestMsg;

use super::{Agent, Phase};

/// How often the watches compare the count.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The kernel's OOM kill count so far (`None` without one).
pub(super) fn kills() -> Option<u64> {
    parse(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

/// `oom_kill`'s value in `/proc/vmstat`'s text.
fn parse(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

impl Agent {
    /// Queues an `Oom` frame on each watch whose count is behind the
    /// kernel's; with `last`, the watches then close (the command ended).
    /// `/proc/vmstat` is read only while a watch is open, at most every
    /// [`CHECK_EVERY`] (a poll round may be much shorter).
    pub(super) fn report_ooms(&mut self, last: bool) {
        if !last && self.oom_checked.elapsed() < CHECK_EVERY {
            return;
        }
        self.oom_checked = Instant::now();
        let watching = self
            .execs
            .iter()
            .any(|e| matches!(e.phase, Phase::Watch { .. }));
        if watching {
            self.report_count(kills(), last);
        }
    }

    /// [`Agent::report_ooms`] with the kernel's count `now`.
    pub(super) fn report_count(&mut self, now: Option<u64>, last: bool) {
        for e in &mut self.execs {
            let Phase::Watch { seen } = &mut e.phase else {
                continue;
            };
            if let Some(n) = now.filter(|n| n > seen) {
                let more = u32::try_from(n - *seen).unwrap_or(u32::MAX);
                e.conn.queue(&GuestMsg::Oom(more));
                *seen = n;
            }
            if last {
                e.phase = Phase::Closing;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_read_from_vmstat() {
        let text = "nr_free_pages 100\noom_kill 3\nnr_foo 9\n";
        assert_eq!(parse(text), Some(3));
        assert_eq!(parse("nr_free_pages 1\n"), None);
        assert_eq!(parse("oom_kill x\n"), None);
        // This kernel's own file has the counter.
        assert!(kills().is_some());
    }
}
