//! Per-VM runtime state for the CLI verbs (`run --name`, `ls`, `stop`,
//! ...): `ROOT/NAME/`, where ROOT is `$CAPSULE_RUNTIME_DIR`, else
//! `/run/capsule` as root, else `$XDG_RUNTIME_DIR/capsule`, else
//! `$TMPDIR/capsule-UID` ([`root`]); it holds
//!
//! * `pid`: the capsule process, as `PID START BOOT_ID` ([`process`]);
//! * `api.sock`: its API socket (a symbolic link to it when `run
//!   --api-sock` put it elsewhere);
//! * `wait.sock`: `capsule wait` connects here and receives the exit status;
//! * `console.log`, `console.in` (detached VMs): serial output, and a FIFO
//!   feeding serial input.
//!
//! The root and each VM directory must be ours alone (owner, mode 0700),
//! or capsule refuses to use them. A VM directory appears complete: it is
//! built under a hidden name and renamed into place, so a visible directory
//! always has its pid file. It is removed when the VM ends; one whose
//! process is gone (a killed capsule) is stale and is removed by the next
//! verb that sees it, under a lock on the root, after checking again.

mod error;
pub mod process;
pub mod root;

pub use error::Error;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use process::Identity;

/// A directory without a pid file is taken for one being set up by hand
/// (capsule's own never lack one) until it is this old.
const UNFINISHED_GRACE: Duration = Duration::from_secs(30);

/// Checks a VM name: 1 to 64 letters, digits, `_`, `-`, `.`, not starting
/// with `.` or `-`.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

/// What a VM directory holds.
enum Found {
    /// A running VM.
    Live(Entry),
    /// Its capsule is gone: the pid is dead or now another process's, or
    /// the pid file cannot be verified (a bare pid from an older capsule).
    Stale,
    /// No pid file yet, and young.
    Unfinished,
    /// Not a private directory of ours: left alone.
    Foreign(Error),
}

fn older_than(p: &Path, age: Duration) -> bool {
    std::fs::symlink_metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|d| d > age)
}

fn examine(name: &str, dir: &Path) -> Found {
    if let Err(e) = root::check_private(dir) {
        return Found::Foreign(e);
    }
    match std::fs::read_to_string(dir.join("pid")) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if older_than(dir, UNFINISHED_GRACE) {
                Found::Stale
            } else {
                Found::Unfinished
            }
        }
        Err(e) => Found::Foreign(Error::io("cannot read", dir.join("pid"))(e)),
        Ok(text) => match Identity::parse(&text) {
            Some(id) if id.is_alive() => Found::Live(Entry {
                name: name.to_string(),
                pid: id.pid,
                dir: dir.to_path_buf(),
                id,
            }),
            _ => Found::Stale,
        },
    }
}

/// Removes `root/name` if, under the lock, it is still stale.
fn remove_stale(root: &Path, name: &str) -> Result<(), Error> {
    let _lock = root::Lock::take(root)?;
    let dir = root.join(name);
    if matches!(examine(name, &dir), Found::Stale) {
        log::info!("removing stale {}", dir.display());
        std::fs::remove_dir_all(&dir).map_err(Error::io("cannot remove stale", &dir))?;
    }
    Ok(())
}

/// A registered VM (this process). Dropping it removes the directory.
pub struct Registration {
    dir: PathBuf,
    waiters: Arc<Mutex<Vec<UnixStream>>>,
}

/// A directory being built before it is renamed into place; removed on
/// drop unless it was.
struct Building(Option<PathBuf>);

impl Drop for Building {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Registration {
    /// Claims `name` for this process: a live VM of that name is an
    /// error, a stale directory is removed.
    pub fn new(name: &str) -> Result<Self, Error> {
        check_name(name)?;
        let root = root::ensure()?;
        let _lock = root::Lock::take(&root)?;
        let dir = root.join(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            match examine(name, &dir) {
                Found::Live(e) => {
                    return Err(Error::Running {
                        name: name.to_string(),
                        pid: e.pid,
                    })
                }
                Found::Unfinished => return Err(Error::Unfinished(dir)),
                Found::Foreign(e) => return Err(e),
                Found::Stale => {
                    log::info!("removing stale {}", dir.display());
                    std::fs::remove_dir_all(&dir)
                        .map_err(Error::io("cannot remove stale", &dir))?;
                }
            }
        }
        let me = Identity::current().ok_or(Error::NoIdentity)?;
        // Built under a hidden name (skipped by `list`), then renamed into
        // place: the directory is never visible without its pid file.
        let tmp = root.join(format!(".new-{name}-{}", me.pid));
        let _ = std::fs::remove_dir_all(&tmp);
        let mut building = Building(Some(tmp.clone()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)))
            .map_err(Error::io("cannot create", &tmp))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(tmp.join("pid"))
            .and_then(|mut f| f.write_all(me.to_pid_file().as_bytes()))
            .map_err(Error::io("cannot write", tmp.join("pid")))?;
        let (listener, wait_sock) =
            crate::unixsock::bind(&tmp.join("wait.sock")).map_err(Error::WaitSocket)?;
        std::fs::rename(&tmp, &dir).map_err(Error::io("cannot create", &dir))?;
        building.0 = None;
        // The socket file moved with its directory; the guard's (old) path
        // is gone, so dropping it removes nothing. The directory's removal
        // takes the socket with it.
        drop(wait_sock);
        // The VM's files (logs rotate, sockets) and, at the end, the
        // directory itself go after setup.
        crate::landlock::allow(&dir, crate::landlock::Reach::ReadWrite);
        if let Some(root) = dir.parent() {
            crate::landlock::allow(root, crate::landlock::Reach::RemoveEntries);
        }
        let reg = Self {
            dir,
            waiters: Arc::new(Mutex::new(Vec::new())),
        };
        let waiters = reg.waiters.clone();
        std::thread::Builder::new()
            .name("waiters".into())
            .spawn(move || {
                if let Err(e) = crate::confine::helper_thread(crate::seccomp::ThreadKind::Waiters) {
                    log::error!("{e}; `capsule wait` will not be answered");
                    return;
                }
                for s in listener.incoming().flatten() {
                    waiters.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            })
            .map_err(Error::Thread)?;
        Ok(reg)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the directory's `api.sock` a symbolic link to `socket`, for a
    /// VM whose API is served elsewhere (`run --name N --api-sock PATH`),
    /// so that the verbs (`ls`, `stop`, `pause`, ...) reach it there.
    pub fn link_api_socket(&self, socket: &Path) -> Result<(), Error> {
        let target = std::path::absolute(socket).map_err(Error::io("resolve", socket))?;
        let link = self.dir.join("api.sock");
        std::os::unix::fs::symlink(&target, &link).map_err(Error::io("create", link))
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
    /// Who its capsule process is.
    #[serde(skip)]
    pub id: Identity,
}

impl Entry {
    /// Whether its capsule still runs.
    pub fn is_alive(&self) -> bool {
        self.id.is_alive()
    }

    /// Sends `sig` to its capsule, never to a process that took over its
    /// pid; `Ok(false)` if it is gone.
    pub fn signal(&self, sig: i32) -> std::io::Result<bool> {
        self.id.signal(sig)
    }
}

/// The live VMs, by name; stale directories are removed. An error if the
/// runtime root is not ours alone.
pub fn list() -> Result<Vec<Entry>, Error> {
    let mut out = Vec::new();
    let Some(root) = root::existing()? else {
        return Ok(out);
    };
    let rd = std::fs::read_dir(&root).map_err(Error::io("cannot read", &root))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".new-") && older_than(&e.path(), UNFINISHED_GRACE) {
            // Left by a capsule killed while registering.
            let _lock = root::Lock::take(&root)?;
            let _ = std::fs::remove_dir_all(e.path());
            continue;
        }
        if check_name(&name).is_err() {
            continue;
        }
        match examine(&name, &e.path()) {
            Found::Live(entry) => out.push(entry),
            Found::Stale => remove_stale(&root, &name)?,
            Found::Unfinished => {}
            Found::Foreign(why) => log::warn!("skipping {}: {why}", e.path().display()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The live VM called `name` (`None`: there is none; a stale directory of
/// that name is removed). An error if the runtime root or the VM's
/// directory is not ours alone.
pub fn live(name: &str) -> Result<Option<Entry>, Error> {
    check_name(name)?;
    let Some(root) = root::existing()? else {
        return Ok(None);
    };
    let dir = root.join(name);
    if std::fs::symlink_metadata(&dir).is_err() {
        return Ok(None);
    }
    match examine(name, &dir) {
        Found::Live(e) => Ok(Some(e)),
        Found::Stale => remove_stale(&root, name).map(|()| None),
        Found::Unfinished => Ok(None),
        Found::Foreign(why) => Err(why),
    }
}

/// One HTTP request to a VM's API socket; returns status and body.
pub fn api_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), Error> {
    let mut s = UnixStream::connect(sock).map_err(Error::ApiConnect)?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(Error::ApiConnect)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(Error::ApiSend)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(Error::ApiNoResponse)?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::ApiBadResponse(line.trim().to_string()))?;
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
}
