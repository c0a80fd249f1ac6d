//! The CLI verbs that act on named VMs: `run -d`, `ls`, `stop`, `kill`,
//! `pause`, `resume`, `wait`, `logs`, `console`. They find a VM through
//! its runtime directory (`capsule::runtime`) and talk to its API socket.
//!
//! Exit statuses: 0 done; 1 failed (one `capsule: error:` line); 2 bad
//! usage; 4 no VM of that name is running. `wait` exits with the VM's own
//! `capsule run` status.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsule::builder::Console;
use capsule::logfile::{self, RotatingFile};
use capsule::runtime::{self, api_request, fault_message, Entry};

use crate::status;

const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The console detach key: Ctrl-].
const DETACH_KEY: u8 = 0x1d;

pub(crate) fn err(msg: impl std::fmt::Display) -> u8 {
    eprintln!("capsule: error: {msg}");
    status::ERROR
}

pub(crate) fn find(name: &str) -> Result<Entry, u8> {
    if let Err(e) = runtime::check_name(name) {
        eprintln!("capsule: error: {e}");
        return Err(status::USAGE);
    }
    match runtime::live(name) {
        Ok(Some(e)) => Ok(e),
        Ok(None) => {
            eprintln!("capsule: error: no VM named '{name}' is running");
            Err(status::NO_SUCH_VM)
        }
        Err(e) => Err(err(e)),
    }
}

/// Why [`detached_console`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// `console.log` could not be created.
    #[error("cannot create console.log: {0}")]
    Log(#[source] std::io::Error),
    /// The runtime directory's path has a NUL byte.
    #[error("bad runtime path")]
    Path(#[source] std::ffi::NulError),
    /// The FIFO `console.in` could not be created.
    #[error("cannot create console.in: {0}")]
    MakeFifo(#[source] std::io::Error),
    /// The FIFO `console.in` could not be opened.
    #[error("cannot open console.in: {0}")]
    OpenFifo(#[source] std::io::Error),
}

/// The console of a detached VM: output appended to `console.log`
/// (rotated to `console.log.1` at `logfile::max_size()`), input from the
/// FIFO `console.in`.
pub fn detached_console(dir: &Path) -> Result<Console, ConsoleError> {
    let log = RotatingFile::open(&dir.join("console.log"), logfile::max_size())
        .map_err(ConsoleError::Log)?;
    let fifo = dir.join("console.in");
    let c =
        std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).map_err(ConsoleError::Path)?;
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(ConsoleError::MakeFifo(std::io::Error::last_os_error()));
    }
    // Read-write, so the FIFO never reports end-of-file when a console
    // client goes away.
    let input = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .map_err(ConsoleError::OpenFifo)?;
    Ok(Console {
        out: Box::new(log),
        input: Some(Box::new(input)),
        raw_terminal: false,
    })
}

/// Points this process's stderr at `path`, rotated like `console.log`
/// (the detached child, once its VM runs: its parent sees end-of-file on
/// the pipe and returns).
pub fn redirect_stderr(path: &Path) {
    let _ = logfile::redirect_stderr(path, logfile::max_size());
}

/// `run -d --name NAME ...`: starts this command again in the background
/// and returns once its VM runs.
pub fn detach(name: &str) -> u8 {
    if let Err(e) = runtime::check_name(name) {
        return err(e);
    }
    match runtime::live(name) {
        Ok(Some(e)) => {
            return err(format!(
                "a VM named '{name}' is already running (pid {})",
                e.pid
            ))
        }
        Ok(None) => {}
        Err(e) => return err(e),
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return err(format!("cannot find the capsule binary: {e}")),
    };
    let args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "-d" && a != "--detach")
        .chain(std::iter::once("--detached-child".into()))
        .collect();
    let mut child = match Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return err(format!("cannot start the VM process: {e}")),
    };
    // The child's stderr closes when its VM runs (or when it fails).
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    eprint!("{text}");
    match child.try_wait() {
        Ok(Some(st)) => {
            let code = st.code().map_or(1, |c| u8::try_from(c).unwrap_or(1));
            if code == 0 {
                println!("{name}");
            }
            code
        }
        _ => {
            println!("{name}");
            status::OK
        }
    }
}

fn state_of(e: &Entry) -> String {
    match api_request(
        &e.dir.join("api.sock"),
        "GET",
        "/",
        None,
        Duration::from_secs(2),
    ) {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_else(|| "Unknown".into()),
        _ => "Unknown".into(),
    }
}

/// `ls [--json]`.
pub fn ls(json: bool) -> u8 {
    let vms = match runtime::list() {
        Ok(v) => v,
        Err(e) => return err(e),
    };
    if json {
        let list: Vec<_> = vms
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "pid": e.pid,
                    "state": state_of(e),
                    "api_socket": e.dir.join("api.sock"),
                    "dir": e.dir,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        println!("{:<24} {:>8}  STATE", "NAME", "PID");
        for e in &vms {
            println!("{:<24} {:>8}  {}", e.name, e.pid, state_of(e));
        }
    }
    status::OK
}

fn wait_gone(e: &Entry, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !e.is_alive() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    !e.is_alive()
}

/// Sends `sig` to the VM's capsule (only if it still is that process);
/// `Err` with the exit status if that failed.
fn signal(e: &Entry, sig: i32) -> Result<(), u8> {
    match e.signal(sig) {
        Ok(_) => Ok(()),
        Err(er) => Err(err(format!(
            "cannot signal VM '{}' (pid {}): {er}",
            e.name, e.pid
        ))),
    }
}

fn force_kill(e: &Entry) -> u8 {
    if let Err(c) = signal(e, libc::SIGKILL) {
        return c;
    }
    if !wait_gone(e, Duration::from_secs(5)) {
        return err(format!("VM '{}' (pid {}) did not die", e.name, e.pid));
    }
    let _ = std::fs::remove_dir_all(&e.dir);
    status::OK
}

/// Asks the VM's capsule to stop it with SIGTERM (devices closed, runtime
/// directory removed); kills it if it has not ended 5 s later.
fn terminate(e: &Entry) -> u8 {
    if let Err(c) = signal(e, libc::SIGTERM) {
        return c;
    }
    if wait_gone(e, Duration::from_secs(5)) {
        let _ = std::fs::remove_dir_all(&e.dir);
        return status::OK;
    }
    eprintln!(
        "capsule: VM '{}' did not end 5 s after SIGTERM: killing it",
        e.name
    );
    force_kill(e)
}

/// `stop NAME [--timeout S]`.
pub fn stop(name: &str, timeout: f64) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let Ok(timeout) = Duration::try_from_secs_f64(timeout) else {
        eprintln!("capsule: error: --timeout must be a number of seconds");
        return status::USAGE;
    };
    let sock = e.dir.join("api.sock");
    if state_of(&e) == "Paused" {
        let _ = api_request(
            &sock,
            "PATCH",
            "/vm",
            Some(r#"{"state":"Resumed"}"#),
            API_TIMEOUT,
        );
    }
    let cad = api_request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        API_TIMEOUT,
    );
    match cad {
        Ok((204, _)) => {
            if wait_gone(&e, timeout) {
                let _ = std::fs::remove_dir_all(&e.dir);
                return status::OK;
            }
            eprintln!(
                "capsule: VM '{name}' did not end {} s after Ctrl-Alt-Del: stopping it",
                timeout.as_secs_f64()
            );
        }
        Ok((_, body)) => eprintln!(
            "capsule: Ctrl-Alt-Del refused ({}): stopping VM '{name}'",
            fault_message(&body)
        ),
        Err(m) => eprintln!("capsule: {m}: stopping VM '{name}'"),
    }
    terminate(&e)
}

/// `kill NAME`.
pub fn kill(name: &str) -> u8 {
    match find(name) {
        Ok(e) => force_kill(&e),
        Err(c) => c,
    }
}

/// `pause NAME` / `resume NAME`.
pub fn pause(name: &str, pause: bool) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let body = if pause {
        r#"{"state":"Paused"}"#
    } else {
        r#"{"state":"Resumed"}"#
    };
    match api_request(
        &e.dir.join("api.sock"),
        "PATCH",
        "/vm",
        Some(body),
        API_TIMEOUT,
    ) {
        Ok((204, _)) => status::OK,
        Ok((_, body)) => err(fault_message(&body)),
        Err(m) => err(m),
    }
}

/// `wait NAME`: the VM's exit status.
pub fn wait(name: &str) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let s = match UnixStream::connect(e.dir.join("wait.sock")) {
        Ok(s) => s,
        Err(er) => return err(format!("cannot wait for '{name}': {er}")),
    };
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    match line.trim().parse::<u8>() {
        Ok(code) => code,
        Err(_) => err(format!(
            "VM '{name}' ended without an exit status (killed?)"
        )),
    }
}

/// `logs NAME`.
pub fn logs(name: &str) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let path = e.dir.join("console.log");
    // The older part first, if the log was rotated.
    let old = File::open(logfile::rotated(&path)).ok();
    let Some(mut f) = open_console_log(&path) else {
        return err(format!(
            "VM '{name}' has no console log (not started with -d)"
        ));
    };
    let mut out = std::io::stdout().lock();
    let copied = match old {
        Some(mut o) => {
            std::io::copy(&mut o, &mut out).and_then(|_| std::io::copy(&mut f, &mut out))
        }
        None => std::io::copy(&mut f, &mut out),
    };
    match copied {
        Ok(_) => status::OK,
        Err(er) => err(er),
    }
}

/// Opens a detached VM's console log. Rotation renames the log to
/// `NAME.1` before it creates the next one, so a busy VM's log can be
/// missing for an instant (`capsule logs` once failed so, beside a guest
/// flooding a 1 KiB-capped log): where the rotated file exists, the open
/// is retried for up to 200 ms.
fn open_console_log(path: &Path) -> Option<File> {
    for _ in 0..40 {
        match File::open(path) {
            Ok(f) => return Some(f),
            Err(_) if logfile::rotated(path).exists() => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
    None
}

/// Whether `path` names another file than `open` (it was rotated).
fn is_replaced(open: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (open.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

/// `console NAME`: the console log so far, then live output; keys typed go
/// to the guest; Ctrl-] detaches.
pub fn console(name: &str) -> u8 {
    let e = match find(name) {
        Ok(e) => e,
        Err(c) => return c,
    };
    let log_path = e.dir.join("console.log");
    let (mut log, input) = match (
        open_console_log(&log_path).ok_or(()),
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(e.dir.join("console.in")),
    ) {
        (Ok(l), Ok(i)) => (l, i),
        _ => return err(format!("VM '{name}' has no console (not started with -d)")),
    };
    let _ = log.seek(SeekFrom::Start(0));
    let _raw = match capsule::terminal::enter_raw_mode() {
        Ok(g) => g,
        Err(er) => return err(format!("cannot set up the terminal: {er}")),
    };
    eprint!("capsule: attached to '{name}'; Ctrl-] detaches\r\n");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut input = input;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (send, detach) = match chunk.iter().position(|&b| b == DETACH_KEY) {
                Some(p) => (&chunk[..p], true),
                None => (chunk, false),
            };
            if input.write_all(send).is_err() || detach {
                break;
            }
        }
        let _ = tx.send(());
    });
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match log.read(&mut buf) {
            Ok(0) => {
                if rx.try_recv().is_ok() || !e.is_alive() {
                    break;
                }
                // Rotated (console.log is now a new file): go on there.
                if is_replaced(&log, &log_path) {
                    if let Ok(l) = File::open(&log_path) {
                        log = l;
                        continue;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            Err(_) => break,
        }
    }
    eprint!("\r\ncapsule: detached from '{name}'\r\n");
    status::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_caught_mid_rotation_is_waited_for() {
        let dir = std::env::temp_dir().join(format!("capsule-verbs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let _ = std::fs::remove_file(&path);
        // Neither file: not a detached VM's log.
        let _ = std::fs::remove_file(logfile::rotated(&path));
        assert!(open_console_log(&path).is_none());
        // The log renamed away, its successor created 30 ms later.
        std::fs::write(logfile::rotated(&path), b"old").unwrap();
        let p = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            std::fs::write(p, b"new").unwrap();
        });
        let got = open_console_log(&path);
        t.join().unwrap();
        assert!(got.is_some(), "the log was waited for");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
