//! OOM kills in the guest, for events watches ([`super::Phase::Watch`]):
//! the kernel's count of processes its OOM killer killed, compared with
//! what each watch has seen. The count is `oom_kill` in `/proc/vmstat`
//! (Linux 4.13+, with `CONFIG_VM_EVENT_COUNTERS`); a kernel without it
//! (capsule's tinyconfig test kernel) is counted from its log instead:
//! the OOM killer's "Killed process" records in `/dev/kmsg` since the
//! first watch.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use exec_proto::GuestMsg;

use super::{Agent, Phase};

/// How often the watches compare the count.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Largest kernel log record read (the kernel's own limit is 8 KiB less
/// its header).
const RECORD: usize = 8192;

/// The kernel's OOM kill count from `/proc/vmstat` (`None` without one).
fn vmstat_kills() -> Option<u64> {
    parse(&std::fs::read_to_string("/proc/vmstat").ok()?)
}

/// `oom_kill`'s value in `/proc/vmstat`'s text.
fn parse(vmstat: &str) -> Option<u64> {
    vmstat
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a `/dev/kmsg` record (`PRIO,SEQ,TIME,FLAGS;TEXT`) is the OOM
/// killer's kill ("Out of memory: Killed process ...", "Memory cgroup
/// out of memory: Killed process ...").
fn is_oom_kill(record: &[u8]) -> bool {
    let text = record
        .iter()
        .position(|&b| b == b';')
        .map_or(record, |i| &record[i + 1..]);
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    line.windows(15).any(|w| w == b"Killed process ")
}

/// Where the count comes from, found at the first watch.
#[derive(Default)]
pub(super) struct OomCounter {
    probed: bool,
    vmstat: bool,
    /// `/dev/kmsg`, read from its end at the first watch.
    kmsg: Option<File>,
    /// Kills seen in `kmsg`.
    logged: u64,
}

impl OomCounter {
    /// The count so far (`None`: neither source is there).
    fn count(&mut self) -> Option<u64> {
        if !self.probed {
            self.probed = true;
            self.vmstat = vmstat_kills().is_some();
            if !self.vmstat {
                self.kmsg = open_kmsg_at_end()
                    .map_err(|e| eprintln!("capsule-init: no OOM events: /dev/kmsg: {e}"))
                    .ok();
            }
        }
        if self.vmstat {
            return vmstat_kills();
        }
        let kmsg = self.kmsg.as_mut()?;
        let mut buf = vec![0u8; RECORD];
        loop {
            match kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.logged += u64::from(is_oom_kill(&buf[..n])),
                // Records overwritten before they were read: go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        Some(self.logged)
    }
}

fn open_kmsg_at_end() -> io::Result<File> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")?;
    f.seek(SeekFrom::End(0))?;
    Ok(f)
}

impl Agent {
    /// Queues an `Oom` frame on each watch whose count is behind the
    /// kernel's; with `last`, the watches then close (the command ended).
    /// The count is read only while a watch is open, at most every
    /// [`CHECK_EVERY`] (a poll round may be much shorter) unless a new
    /// watch needs its start.
    pub(super) fn report_ooms(&mut self, last: bool) {
        let fresh = self
            .execs
            .iter()
            .any(|e| matches!(e.phase, Phase::Watch { seen: None }));
        if !last && !fresh && self.oom_checked.elapsed() < CHECK_EVERY {
            return;
        }
        self.oom_checked = Instant::now();
        let watching = self
            .execs
            .iter()
            .any(|e| matches!(e.phase, Phase::Watch { .. }));
        if watching {
            let now = self.oom.count();
            self.report_count(now, last);
        }
    }

    /// [`Agent::report_ooms`] with the kernel's count `now`: a new watch
    /// starts from it.
    pub(super) fn report_count(&mut self, now: Option<u64>, last: bool) {
        for e in &mut self.execs {
            let Phase::Watch { seen } = &mut e.phase else {
                continue;
            };
            match (now, *seen) {
                (Some(n), None) => *seen = Some(n),
                (Some(n), Some(s)) if n > s => {
                    e.conn
                        .queue(&GuestMsg::Oom(u32::try_from(n - s).unwrap_or(u32::MAX)));
                    *seen = Some(n);
                }
                _ => {}
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
        assert!(vmstat_kills().is_some());
    }

    #[test]
    fn kills_are_recognized_in_kernel_log_records() {
        assert!(is_oom_kill(
            b"3,459,12345678,-;Out of memory: Killed process 77 (awk) total-vm:300000kB\n"
        ));
        assert!(is_oom_kill(
            b"3,460,1,-;Memory cgroup out of memory: Killed process 8 (x)\n SUBSYSTEM=x\n"
        ));
        assert!(!is_oom_kill(
            b"6,461,2,-;awk invoked oom-killer: gfp_mask=0x0\n"
        ));
        assert!(!is_oom_kill(b"6,462,3,-;eth0: link up\n"));
        // The dictionary lines after the text do not count.
        assert!(!is_oom_kill(b"6,463,4,-;hello\n NOTE=Killed process \n"));
    }
}
