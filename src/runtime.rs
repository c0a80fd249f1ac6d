//! Per-VM runtime state for the CLI verbs (`run --name`, `ls`, `stop`,
//! ...): `$XDG_RUNTIME_DIR/capsule/NAME/` (`/run/capsule/NAME/` as root)
//! holds
//!
//! * `pid`: the capsule process;
//! * `api.sock`: its API socket;
//! * `wait.sock`: `capsule wait` connects here and receives the exit status;
//! * `console.log`, `console.in` (detached VMs): serial output, and a FIFO
//!   feeding serial input.
//!
//! The directory is removed when the VM ends; one whose process is gone (a
//! killed capsule) is stale and is removed by the next verb that sees it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The directory holding all VMs' directories.
pub fn root() -> PathBuf {
    // SAFETY: geteuid has no failure modes or side effects.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return PathBuf::from("/run/capsule");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("capsule"),
        _ => std::env::temp_dir().join(format!("capsule-{euid}")),
    }
}

/// Checks a VM name: 1 to 64 letters, digits, `_`, `-`, `.`, not starting
/// with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid VM name '{name}': use 1 to 64 letters, digits, '_', '-' or '.'"
        ))
    }
}

/// A VM's directory.
pub fn vm_dir(name: &str) -> PathBuf {
    root().join(name)
}

/// Whether `pid` is a live capsule process.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The pid recorded in `dir`, if any.
pub fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A registered VM (this process). Dropping it removes the directory.
pub struct Registration {
    dir: PathBuf,
    waiters: Arc<Mutex<Vec<UnixStream>>>,
    _wait_sock: Option<crate::unixsock::SocketFile>,
}

impl Registration {
    /// Claims `name` for this process: a live VM of that name is an
    /// error, a stale directory is removed.
    pub fn new(name: &str) -> Result<Self, String> {
        check_name(name)?;
        let root = root();
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700));
        let dir = root.join(name);
        if dir.exists() {
            match read_pid(&dir) {
                Some(pid) if pid_alive(pid) => {
                    return Err(format!(
                        "a VM named '{name}' is already running (pid {pid})"
                    ))
                }
                _ => {
                    log::info!("removing stale {}", dir.display());
                    std::fs::remove_dir_all(&dir)
                        .map_err(|e| format!("cannot remove stale {}: {e}", dir.display()))?;
                }
            }
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut reg = Self {
            dir: dir.clone(),
            waiters: Arc::new(Mutex::new(Vec::new())),
            _wait_sock: None,
        };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("pid"))
            .and_then(|mut f| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", dir.join("pid").display()))?;
        let (listener, wait_sock) = crate::unixsock::bind(&dir.join("wait.sock"))
            .map_err(|e| format!("cannot create wait.sock: {e}"))?;
        let waiters = reg.waiters.clone();
        std::thread::Builder::new()
            .name("waiters".into())
            .spawn(move || {
                for s in listener.incoming().flatten() {
                    waiters.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            })
            .map_err(|e| format!("cannot start the waiter thread: {e}"))?;
        reg._wait_sock = Some(wait_sock);
        Ok(reg)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tells every `capsule wait` the exit status; the directory goes when
    /// this is dropped.
    pub fn finish(&self, status: u8) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        for s in w.iter_mut() {
            let _ = s.write_all(format!("{status}\n").as_bytes());
        }
        w.clear();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A VM found in the runtime directory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// Its name.
    pub name: String,
    /// Its capsule process.
    pub pid: i32,
    /// Its directory.
    pub dir: PathBuf,
}

/// The live VMs, by name; stale directories are removed.
pub fn list() -> Vec<Entry> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root()) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if check_name(&name).is_err() || !e.path().is_dir() {
            continue;
        }
        match live(&name) {
            Some(entry) => out.push(entry),
            None => continue,
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The live VM called `name`; a stale directory of that name is removed.
pub fn live(name: &str) -> Option<Entry> {
    check_name(name).ok()?;
    let dir = vm_dir(name);
    if !dir.is_dir() {
        return None;
    }
    match read_pid(&dir) {
        Some(pid) if pid_alive(pid) => Some(Entry {
            name: name.to_string(),
            pid,
            dir,
        }),
        Some(_) => {
            let _ = std::fs::remove_dir_all(&dir);
            None
        }
        // Being created right now (no pid yet): not stale until it is old.
        None => {
            let old = std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|d| d > Duration::from_secs(30));
            if old {
                let _ = std::fs::remove_dir_all(&dir);
            }
            None
        }
    }
}

/// One HTTP request to a VM's API socket; returns status and body.
pub fn api_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("cannot connect to the VM's API: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("API request failed: {e}"))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("no API response: {e}"))?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad API response '{}'", line.trim()))?;
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    let body = rest.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The `fault_message` of an error body, or the body itself.
pub fn fault_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("web-1.test_x").is_ok());
        for bad in ["", ".x", "-x", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dead_pids() {
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
        assert!(pid_alive(std::process::id() as i32));
    }
}
