//! The agent's tests: exec connections over socket pairs.

use super::*;
use exec_proto::Decoder;
use std::os::unix::net::UnixStream;

/// An exec over one end of a socket pair (vsock's stand-in), and the
/// host's end.
fn exec_pair() -> (Exec, UnixStream) {
    let (ours, host) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let exec = Exec {
        conn: Conn::new(OwnedFd::from(ours)),
        phase: Phase::AwaitSpec(Vec::new()),
    };
    (exec, host)
}

fn host_frames(host: &mut UnixStream) -> Vec<GuestMsg> {
    use std::io::Read;
    host.set_nonblocking(true).unwrap();
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        match host.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => d.push(&buf[..n]),
            Err(_) => break,
        }
    }
    let mut out = Vec::new();
    while let Some(f) = d.next_frame().unwrap() {
        out.push(GuestMsg::parse(f).unwrap());
    }
    out
}

fn send(host: &mut UnixStream, msgs: &[HostMsg]) {
    use std::io::Write;
    let mut b = Vec::new();
    for m in msgs {
        m.encode(&mut b);
    }
    host.write_all(&b).unwrap();
}

fn ready(exec: &mut Exec) -> Vec<libc::pollfd> {
    let mut fds = Vec::new();
    exec.poll_fds(&mut fds);
    assert_eq!(fds.len(), FDS_PER_EXEC);
    sys::poll(&mut fds, 1000).unwrap();
    fds
}

#[test]
fn a_spec_whose_directory_is_missing_gets_an_error_and_the_end() {
    let (mut exec, mut host) = exec_pair();
    let spec = ExecSpec {
        argv: vec![b"true".to_vec()],
        cwd: b"/no/such/dir/here".to_vec(),
        ..ExecSpec::default()
    };
    send(&mut host, &[HostMsg::Spec(spec.to_bytes().unwrap())]);
    let fds = ready(&mut exec);
    exec.move_ready(&fds, Path::new("/"));
    assert!(matches!(exec.phase, Phase::Gone), "closed after the error");
    let got = host_frames(&mut host);
    assert!(
        matches!(&got[..], [GuestMsg::Error(m)] if m.contains("working directory")),
        "{got:?}"
    );
}

#[test]
fn malformed_frames_and_bad_specs_never_start_anything() {
    let (mut exec, mut host) = exec_pair();
    // A host → guest frame of an unknown kind.
    std::io::Write::write_all(&mut host, &[0xee, 0, 0, 0, 0]).unwrap();
    let fds = ready(&mut exec);
    exec.move_ready(&fds, Path::new("/"));
    assert!(matches!(exec.phase, Phase::Gone));

    let (mut exec, mut host) = exec_pair();
    send(&mut host, &[HostMsg::Spec(b"no-equals\0".to_vec())]);
    let fds = ready(&mut exec);
    exec.move_ready(&fds, Path::new("/"));
    let got = host_frames(&mut host);
    assert!(
        matches!(&got[..], [GuestMsg::Error(m)] if m.starts_with("bad exec spec")),
        "{got:?}"
    );
}

#[test]
fn stdin_before_the_spec_is_kept_and_a_host_that_leaves_is_dropped() {
    let _only = crate::TEST_CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (mut exec, mut host) = exec_pair();
    send(&mut host, &[HostMsg::Stdin(b"early".to_vec())]);
    let fds = ready(&mut exec);
    exec.move_ready(&fds, Path::new("/"));
    assert!(matches!(&exec.phase, Phase::AwaitSpec(e) if e.len() == 1));
    drop(host);
    let fds = ready(&mut exec);
    exec.move_ready(&fds, Path::new("/"));
    assert!(matches!(exec.phase, Phase::Gone));
}

#[test]
fn a_process_runs_with_its_stdin_and_its_output_and_status_come_back() {
    let _only = crate::TEST_CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (exec, mut host) = exec_pair();
    let spec = ExecSpec {
        argv: vec![
            b"sh".to_vec(),
            b"-c".to_vec(),
            b"read x; echo got-$x; echo e >&2; exit 3".to_vec(),
        ],
        env: vec![b"PATH=/usr/bin:/bin".to_vec()],
        cwd: b"/".to_vec(),
        ..ExecSpec::default()
    };
    send(
        &mut host,
        &[
            HostMsg::Spec(spec.to_bytes().unwrap()),
            HostMsg::Stdin(b"in\n".to_vec()),
            HostMsg::StdinEof,
        ],
    );
    let mut agent = Agent {
        listener: None,
        root: PathBuf::from("/"),
        execs: vec![exec],
        oom_checked: Instant::now(),
        oom: oom::OomCounter::default(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.execs.is_empty() && Instant::now() < deadline {
        let mut fds = Vec::new();
        agent.poll_fds(&mut fds);
        sys::poll(&mut fds, 50).unwrap();
        agent.move_ready(&fds);
        for (pid, code) in command::reap_all() {
            agent.reaped(pid, code);
        }
    }
    assert!(agent.execs.is_empty(), "the exec ended and was closed");
    let got = host_frames(&mut host);
    assert_eq!(got.first(), Some(&GuestMsg::Started));
    assert_eq!(got.last(), Some(&GuestMsg::Exit(3)));
    let out: Vec<u8> = got
        .iter()
        .filter_map(|m| match m {
            GuestMsg::Stdout(d) => Some(d.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(out, b"got-in\n");
    assert!(got.contains(&GuestMsg::Stderr(b"e\n".to_vec())));
}

#[test]
fn when_the_command_ends_exec_d_processes_are_killed_and_told_137() {
    let _only = crate::TEST_CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (exec, mut host) = exec_pair();
    let spec = ExecSpec {
        argv: vec![b"sleep".to_vec(), b"600".to_vec()],
        env: vec![b"PATH=/usr/bin:/bin".to_vec()],
        cwd: b"/".to_vec(),
        ..ExecSpec::default()
    };
    send(&mut host, &[HostMsg::Spec(spec.to_bytes().unwrap())]);
    let mut agent = Agent {
        listener: None,
        root: PathBuf::from("/"),
        execs: vec![exec],
        oom_checked: Instant::now(),
        oom: oom::OomCounter::default(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(agent.execs[0].phase, Phase::Running { .. }) {
        assert!(Instant::now() < deadline, "the process never started");
        let mut fds = Vec::new();
        agent.poll_fds(&mut fds);
        sys::poll(&mut fds, 50).unwrap();
        agent.move_ready(&fds);
    }
    let started = Instant::now();
    agent.end();
    assert!(agent.execs.is_empty());
    assert!(
        started.elapsed() < END_WAIT,
        "ended by the kill, not the wait"
    );
    assert_eq!(
        host_frames(&mut host),
        [GuestMsg::Started, GuestMsg::Exit(137)]
    );
}

#[test]
fn a_watch_gets_started_then_its_oom_kills_and_closes_at_the_end() {
    // end() reaps children.
    let _only = crate::TEST_CHILDREN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (exec, mut host) = exec_pair();
    let mut agent = Agent {
        listener: None,
        root: PathBuf::from("/"),
        execs: vec![exec],
        oom_checked: Instant::now(),
        oom: oom::OomCounter::default(),
    };
    let spec = ExecSpec {
        watch: true,
        ..ExecSpec::default()
    };
    send(&mut host, &[HostMsg::Spec(spec.to_bytes().unwrap())]);
    let mut fds = Vec::new();
    agent.poll_fds(&mut fds);
    sys::poll(&mut fds, 1000).unwrap();
    agent.move_ready(&fds);
    let Phase::Watch { seen } = &mut agent.execs[0].phase else {
        panic!("not a watch");
    };
    let seen = seen.expect("the watch's start was read");
    // The test cannot make the kernel kill: the count it reports is the
    // watch's plus two, then the same again (no second frame).
    agent.report_count(Some(seen + 2), false);
    agent.report_count(Some(seen + 2), false);
    let mut fds = Vec::new();
    agent.poll_fds(&mut fds);
    sys::poll(&mut fds, 1000).unwrap();
    agent.move_ready(&fds);
    assert_eq!(
        host_frames(&mut host),
        [GuestMsg::Started, GuestMsg::Oom(2)]
    );
    agent.end();
    assert!(agent.execs.is_empty(), "closed at the end");
}
