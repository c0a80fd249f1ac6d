//! Boot-time marker: a one-byte I/O port the guest writes to say how far
//! it has come (e.g. its init writes 1 when userspace is reached).
//!
//! The first write of each value is logged, at `info` level, with the wall
//! time since the VMM process started and the CPU time the process has used
//! so far:
//!
//! ```text
//! boot marker 1: 812.4 ms since capsule started, 301.2 ms CPU (of which guest 180 ms)
//! ```
//!
//! The CPU time is the sum over the process's threads of the time they
//! were on a CPU (`/proc/self/task/*/schedstat`), so it includes the time
//! vCPU threads ran guest code; the guest part (`guest_time` of
//! `/proc/self/stat`, in clock ticks) is given beside it.

use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// A value the guest writes, with when it was first written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mark {
    /// The byte the guest wrote.
    pub value: u8,
    /// Wall time from the VMM's start to the write.
    pub wall: Duration,
    /// CPU time of the whole VMM process (all threads) at the write, if
    /// the host tells it.
    pub cpu: Option<Duration>,
    /// The part of `cpu` spent running guest code, if the host tells it.
    pub guest: Option<Duration>,
}

/// The boot-time marker device.
#[derive(Debug)]
pub struct BootMarker {
    start: Instant,
    seen: [bool; 256],
    marks: Vec<Mark>,
}

impl BootMarker {
    /// Creates the device; times are measured from `start`, the VMM
    /// process's start.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            seen: [false; 256],
            marks: Vec::new(),
        }
    }

    /// The marks recorded so far, in the order they were written.
    pub fn marks(&self) -> &[Mark] {
        &self.marks
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if std::mem::replace(&mut self.seen[usize::from(value)], true) {
            return;
        }
        let mark = Mark {
            value,
            wall: self.start.elapsed(),
            cpu: process_cpu_time(),
            guest: process_guest_time(),
        };
        log::info!("{}", describe(&mark));
        self.marks.push(mark);
    }
}

/// The log line for `mark`.
pub fn describe(mark: &Mark) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut line = format!(
        "boot marker {}: {:.1} ms since capsule started",
        mark.value,
        ms(mark.wall)
    );
    if let Some(cpu) = mark.cpu {
        line.push_str(&format!(", {:.1} ms CPU", ms(cpu)));
        if let Some(guest) = mark.guest {
            line.push_str(&format!(" (of which guest {:.0} ms)", ms(guest)));
        }
    }
    line
}

/// CPU time of all threads of this process: the sum of the first field of
/// each `/proc/self/task/*/schedstat` (nanoseconds on a CPU).
fn process_cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total = total.saturating_add(stat.split_whitespace().next()?.parse().ok()?);
    }
    Some(Duration::from_nanos(total))
}

/// Time this process's threads spent running guest code: `guest_time` (field
/// 43) of `/proc/self/stat`, in clock ticks of 1/100 s.
fn process_guest_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_guest_ticks(&stat).map(|ticks| Duration::from_millis(ticks.saturating_mul(10)))
}

/// Field 43 of a `/proc/PID/stat` line. The second field (the command name,
/// in parentheses) may contain spaces, so fields are counted after its `)`.
fn parse_guest_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts with field 3.
    rest.split_whitespace().nth(43 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_write_of_each_value_is_recorded() {
        let mut dev = BootMarker::new(Instant::now());
        dev.write(0, &[1]);
        dev.write(0, &[1]);
        dev.write(0, &[2, 9]);
        dev.write(0, &[]);
        let values: Vec<u8> = dev.marks().iter().map(|m| m.value).collect();
        assert_eq!(values, [1, 2]);
        assert!(dev.marks()[0].wall <= dev.marks()[1].wall);
        let mut byte = [0xff];
        dev.read(0, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn cpu_time_is_read_on_linux() {
        // Burn a little CPU so the total cannot be zero.
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert_ne!(x, 1);
        assert!(process_cpu_time().unwrap() > Duration::ZERO);
        assert!(process_guest_time().is_some());
    }

    #[test]
    fn guest_ticks_field() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[43 - 3] = "77".into();
        let line = format!("1234 (a b) c) {}", fields.join(" "));
        assert_eq!(parse_guest_ticks(&line), Some(77));
        assert_eq!(parse_guest_ticks("1 (x) 2"), None);
        assert_eq!(parse_guest_ticks("garbage"), None);
    }

    #[test]
    fn description() {
        let mark = Mark {
            value: 1,
            wall: Duration::from_micros(812_400),
            cpu: Some(Duration::from_micros(301_200)),
            guest: Some(Duration::from_millis(180)),
        };
        assert_eq!(
            describe(&mark),
            "boot marker 1: 812.4 ms since capsule started, 301.2 ms CPU (of which guest 180 ms)"
        );
    }
}
