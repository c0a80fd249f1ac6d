//! The host terminal as the guest's serial console.
//!
//! When stdin is a TTY it is put in raw mode so that every key (Ctrl-C
//! included) goes to the guest. The original settings are restored on
//! every way out of the process: normal return (guard drop), a Rust panic
//! (panic hook) and the termination signals (`crate::signals`, whose
//! handlers restore before the process dies of the signal).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Terminal settings to put back, saved once.
static SAVED: OnceLock<libc::termios> = OnceLock::new();
/// Whether the terminal is currently raw (so restoring twice is harmless).
static RAW: AtomicBool = AtomicBool::new(false);

const STDIN: libc::c_int = libc::STDIN_FILENO;

/// Restores the terminal when dropped.
#[derive(Debug)]
pub struct RawModeGuard(());

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(STDIN) == 1 }
}

/// The size of stdin's terminal (`None` if stdin is not one, or it has
/// no size).
pub fn window_size() -> Option<exec_proto::WinSize> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it or fails.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a winsize that outlives the call.
    let r = unsafe { libc::ioctl(STDIN, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(exec_proto::WinSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Puts stdin's terminal in raw mode if stdin is a TTY. Returns a guard that
/// restores it, or `None` when stdin is not a terminal.
pub fn enter_raw_mode() -> io::Result<Option<RawModeGuard>> {
    if !stdin_is_tty() {
        return Ok(None);
    }
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut orig: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a termios.
    if unsafe { libc::tcgetattr(STDIN, &mut orig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = SAVED.set(orig);
    install_restore_hooks();

    let mut raw = orig;
    // Input: no CR/NL translation, no flow control, no signal keys, no
    // echo, byte-at-a-time reads. Output post-processing is kept so that
    // capsule's own log lines still start at column 0.
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
    raw.c_cflag |= libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: valid fd and pointer to an initialised termios.
    if unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    RAW.store(true, Ordering::SeqCst);
    Ok(Some(RawModeGuard(())))
}

/// Puts the saved terminal settings back. Async-signal-safe.
pub fn restore() {
    if RAW.swap(false, Ordering::SeqCst) {
        if let Some(orig) = SAVED.get() {
            // SAFETY: tcsetattr is async-signal-safe; `orig` is a valid
            // termios saved from this descriptor.
            unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, orig) };
        }
    }
}

fn install_restore_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::signals::install();
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            default_hook(info);
        }));
    });
}
