//! `stats`: what a container's microVM costs the host, from `/proc`: the
//! `capsule exec` process and its descendants (its virtiofsd): CPU time
//! (user, system, and that of children it has waited for), resident
//! memory (guest RAM the guest touched included) and process count.
//!
//! Returned as containerd's cgroups `v1.Metrics` (`cpu.usage` in
//! nanoseconds, `memory.usage.usage` and `memory.rss` in bytes,
//! `pids.current`): the only metrics type `containerd-shim-protos` 0.10
//! generates, and the one its own cgroup collector fills on cgroup v2
//! hosts too. The VM does not run in a cgroup of its own (it shares the
//! shim's), so the cgroup's figures would be those of every container of
//! the shim; these are the VM's alone.

use std::fs;

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};

/// One process's figures, from `/proc/PID/stat` and `statm`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ProcFigures {
    ppid: u32,
    /// Clock ticks.
    user: u64,
    system: u64,
    /// Of waited-for children, clock ticks.
    children_user: u64,
    children_system: u64,
}

/// Parses a `/proc/PID/stat` line (the command name may hold spaces and
/// parentheses: the fields start after the last `)`).
fn parse_stat(line: &str) -> Option<ProcFigures> {
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field N of proc(5) is f[N - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcFigures {
        ppid: u32::try_from(num(4)?).ok()?,
        user: num(14)?,
        system: num(15)?,
        children_user: num(16)?,
        children_system: num(17)?,
    })
}

fn figures(pid: u32) -> Option<ProcFigures> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Resident bytes of `pid` (`statm`'s second field, in pages).
fn resident(pid: u32) -> u64 {
    let pages = fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// `root` and its live descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(f) = figures(pid) {
                all.push((pid, f.ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// The figures of the microVM run by `capsule exec` process `pid`;
/// `None` if that process is gone.
pub fn collect(pid: u32) -> Option<Metrics> {
    let root = figures(pid)?;
    // SAFETY: sysconf has no memory arguments.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let ns = |ticks: u64| ticks.saturating_mul(1_000_000_000 / hz.max(1));
    let pids = tree(pid);
    let (mut user, mut system) = (root.children_user, root.children_system);
    let mut rss = 0;
    for &p in &pids {
        if let Some(f) = figures(p) {
            user += f.user;
            system += f.system;
        }
        rss += resident(p);
    }
    let mut usage = CPUUsage::new();
    usage.user = ns(user);
    usage.kernel = ns(system);
    usage.total = ns(user + system);
    let mut cpu = CPUStat::new();
    cpu.usage = Some(usage).into();
    let mut entry = MemoryEntry::new();
    entry.usage = rss;
    let mut memory = MemoryStat::new();
    memory.rss = rss;
    memory.usage = Some(entry).into();
    let mut p = PidsStat::new();
    p.current = pids.len() as u64;
    let mut m = Metrics::new();
    m.cpu = Some(cpu).into();
    m.memory = Some(memory).into();
    m.pids = Some(p).into();
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_after_the_last_parenthesis() {
        let line = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 1 2 3 4 250 75 6 9 20 0 3 0 1000 1 1";
        assert_eq!(
            parse_stat(line),
            Some(ProcFigures {
                ppid: 17,
                user: 250,
                system: 75,
                children_user: 6,
                children_system: 9,
            })
        );
        assert_eq!(parse_stat("1 (x) S 0 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    /// This test process and a child it started: the child is counted,
    /// memory is this process's resident size at least, CPU adds up.
    #[test]
    fn a_live_process_tree_is_measured() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        // Some CPU time of our own.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert_ne!(x, 1);
        let m = collect(me).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(m.pids.current >= 2, "{}", m.pids.current);
        assert!(m.memory.rss >= resident(me), "{}", m.memory.rss);
        assert_eq!(m.memory.usage.usage, m.memory.rss);
        let cpu = &m.cpu.usage;
        assert!(cpu.total > 0);
        assert_eq!(cpu.total, cpu.user + cpu.kernel);
        assert!(collect(u32::MAX).is_none());
    }
}
