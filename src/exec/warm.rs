//! The warm path of `capsule exec`: a template guest booted once and
//! snapshotted where its init waits for a command
//! (`exec --make-snapshot DIR`), and commands run each in a clone of it
//! (`exec --snapshot DIR`).
//!
//! * The template's initramfs holds a spec without a command
//!   ([`exec_proto::ExecSpec::await_command`]): its init boots, connects
//!   and says hello, and waits. On the hello, capsule pauses the VM,
//!   writes a Full snapshot into DIR (`snapshot`, `memory`, and
//!   [`TEMPLATE_FILE`]: the options it was made with) and ends it. No
//!   command ever ran in it.
//! * A clone is a restore of that snapshot with a vsock device on a new
//!   private socket. The restored device resets the guest's connections;
//!   the init connects again, to this capsule, says hello, and gets the
//!   time and then this command ([`exec_proto::HostMsg::Spec`]: argv,
//!   environment, working directory) before its stdin. From there on it is
//!   a cold exec's session: same frames, streams and statuses.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::os::unix::ffi::OsStrExt;

use serde::{Deserialize, Serialize};

use super::{lock, new_session, outcome, vsock_link, ConsoleTail, Error, ExecConfig, Outcome};
use crate::builder::{self, Console, Extras};
use crate::config::DiskConfig;
use crate::snapshot::{self, restore::RestoreConfig};
use crate::vmm::{RunEnd, Vmm};

/// The file in a template directory that says it is one, and with what
/// options it was made.
pub const TEMPLATE_FILE: &str = "exec-template";

/// The options that shape a template's VM: a clone has them all, and an
/// `exec --snapshot` that gives one must give the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateOptions {
    /// `--kernel`.
    pub kernel: PathBuf,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--append`.
    pub append: String,
    /// `--cpus`.
    pub cpus: u8,
    /// `--memory`, in bytes.
    pub memory: u64,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
    /// `--disk`, in order.
    pub disks: Vec<DiskConfig>,
    /// `--modules`.
    pub modules: Option<PathBuf>,
}

impl TemplateOptions {
    /// The same, with every path absolute (a clone may run elsewhere).
    fn canonical(mut self) -> Self {
        self.kernel = canonical(&self.kernel);
        for p in [&mut self.initrd, &mut self.rootfs, &mut self.modules]
            .into_iter()
            .flatten()
        {
            *p = canonical(p);
        }
        for d in &mut self.disks {
            d.path = canonical(&d.path);
        }
        self
    }
}

/// The same options as given on an `exec --snapshot` command line: each
/// `None` (or empty) when not given.
#[derive(Debug, Clone, Default)]
pub struct GivenOptions {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--append` (not given: empty).
    pub append: String,
    /// `--cpus`.
    pub cpus: Option<u8>,
    /// `--memory`.
    pub memory: Option<u64>,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
    /// `--disk`.
    pub disks: Vec<DiskConfig>,
    /// `--modules`.
    pub modules: Option<PathBuf>,
}

/// What [`TEMPLATE_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// The capsule that made it: its init is in the snapshot's memory,
    /// so only the same capsule runs commands in it.
    pub capsule_version: String,
    /// The options it was made with.
    pub options: TemplateOptions,
}

/// `path` made absolute and free of symbolic links where it exists, so
/// that two spellings of one file compare equal.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn same_path(a: &Path, b: &Path) -> bool {
    canonical(a) == canonical(b)
}

impl Template {
    /// Reads the template of directory `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(TEMPLATE_FILE);
        let not_one = |why: String| {
            Error::Usage(format!(
                "--snapshot {}: not an exec template ({why}); make one with `capsule exec --make-snapshot {} --kernel ...`",
                dir.display(),
                dir.display()
            ))
        };
        let text = std::fs::read(&path).map_err(|e| not_one(format!("{}: {e}", path.display())))?;
        let t: Self = serde_json::from_slice(&text)
            .map_err(|e| not_one(format!("{}: {e}", path.display())))?;
        if t.capsule_version != env!("CARGO_PKG_VERSION") {
            return Err(Error::Usage(format!(
                "--snapshot {}: the template was made by capsule {}, this is {}: make it again with --make-snapshot",
                dir.display(),
                t.capsule_version,
                env!("CARGO_PKG_VERSION")
            )));
        }
        Ok(t)
    }

    /// The first option of `given` that differs from the template's, as a
    /// message; `Ok` when all that were given agree.
    pub fn check(&self, given: &GivenOptions) -> Result<(), String> {
        let t = &self.options;
        let path_differs = |g: &Option<PathBuf>, t: &Option<PathBuf>| match (g, t) {
            (Some(g), Some(t)) => !same_path(g, t),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let shown = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or_else(|| "none".to_string(), |p| p.display().to_string())
        };
        let conflict = |opt: &str, g: String, t: String| {
            Err(format!(
                "{opt} {g} conflicts with the template's ({t}): give the options it was made with, or none of them"
            ))
        };
        if let Some(k) = &given.kernel {
            if !same_path(k, &t.kernel) {
                return conflict(
                    "--kernel",
                    k.display().to_string(),
                    t.kernel.display().to_string(),
                );
            }
        }
        if path_differs(&given.initrd, &t.initrd) {
            return conflict("--initrd", shown(&given.initrd), shown(&t.initrd));
        }
        if !given.append.is_empty() && given.append != t.append {
            return conflict(
                "--append",
                format!("{:?}", given.append),
                format!("{:?}", t.append),
            );
        }
        if given.cpus.is_some_and(|c| c != t.cpus) {
            return conflict(
                "--cpus",
                format!("{}", given.cpus.unwrap_or(0)),
                t.cpus.to_string(),
            );
        }
        if given.memory.is_some_and(|m| m != t.memory) {
            let mib = |b: u64| format!("{} MiB", b >> 20);
            return conflict("--memory", mib(given.memory.unwrap_or(0)), mib(t.memory));
        }
        if path_differs(&given.rootfs, &t.rootfs) {
            return conflict("--rootfs", shown(&given.rootfs), shown(&t.rootfs));
        }
        if path_differs(&given.modules, &t.modules) {
            return conflict("--modules", shown(&given.modules), shown(&t.modules));
        }
        let disks_differ = given.disks.len() != t.disks.len()
            || given
                .disks
                .iter()
                .zip(&t.disks)
                .any(|(g, t)| !same_path(&g.path, &t.path) || g.mode != t.mode);
        if !given.disks.is_empty() && disks_differ {
            let list = |d: &[DiskConfig]| {
                d.iter()
                    .map(|d| d.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return conflict("--disk", list(&given.disks), list(&t.disks));
        }
        Ok(())
    }
}

/// What a template cannot have (its VM is shared by every clone, or the
/// device has no saved state): `Err` names the option.
fn refuse_unsupported(config: &ExecConfig, what: &str) -> Result<(), Error> {
    let bad = if !config.shares.is_empty() {
        Some("--share")
    } else if !config.tmpfs.is_empty() {
        Some("--tmpfs")
    } else if config.host_root {
        Some("--host-root")
    } else if config.fs_root.is_some() {
        Some("--fs-root")
    } else if !config.vm.nets.is_empty() {
        Some("--net")
    } else {
        None
    };
    if let Some(opt) = bad {
        return Err(Error::Usage(format!(
            "{what} does not take {opt} (a template's devices are every clone's; shares and network devices are not supported there yet)"
        )));
    }
    if super::Channel::from_env()? == super::Channel::Console {
        return Err(Error::Usage(format!(
            "{what} needs the vsock channel (CAPSULE_EXEC_CHANNEL=console is not supported)"
        )));
    }
    Ok(())
}

/// `exec --make-snapshot DIR`: boots the template of `config` (which has
/// no command) and snapshots it into `dir` once its init waits for a
/// command; `options` are recorded for the clones. `Exited(0)` when the
/// template is written.
pub fn make_snapshot(
    mut config: ExecConfig,
    dir: &Path,
    options: TemplateOptions,
) -> Result<Outcome, Error> {
    refuse_unsupported(&config, "--make-snapshot")?;
    let options = options.canonical();
    if !config.argv.is_empty() || !config.env.is_empty() || config.workdir != "/" {
        return Err(Error::Usage(
            "--make-snapshot takes no command, --env or --workdir: give them to each `exec --snapshot`".into(),
        ));
    }
    drop(
        crate::vstate::vm::Vm::open_kvm(&config.vm.kvm_path)
            .map_err(|e| Error::Vm(builder::Error::from(e)))?,
    );
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Host("cannot create the template directory", e))?;
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::Host("cannot find the template directory", e))?;
    // A template made again must not leave the old one's file to a
    // half-written one.
    let _ = std::fs::remove_file(dir.join(TEMPLATE_FILE));
    super::prepare::prepare(&mut config, super::Channel::Vsock)?;
    crate::landlock::allow(&dir, crate::landlock::Reach::ReadWrite);
    let wake = devices::eventfd().map_err(|e| Error::Host("eventfd", e))?;
    let session = Arc::new(Mutex::new(new_session(&config, &wake)?));
    let tail = ConsoleTail::default();
    let serial = Console {
        out: Box::new(tail.clone()),
        input: None,
        raw_terminal: false,
    };
    let (link, _sockets, _file) = vsock_link(&mut config, &session, wake)?;
    let extras = Extras {
        devices: vec![],
        subscribers: vec![Arc::new(Mutex::new(link))],
    };
    let vmm = builder::build_with(&config.vm, serial, extras)?;
    let end = vmm.run(Some(super::TICK), |vmm| {
        let mut s = lock(&session);
        if s.hello {
            drop(s);
            return Some(Made::Snapshot(save(vmm, &dir)));
        }
        let stop = s.check();
        drop(s);
        super::log_if_quiet(vmm, stop).map(Made::Stopped)
    })?;
    let end = match end {
        RunEnd::Host(Made::Snapshot(stats)) => {
            let stats = stats?;
            write_template(&dir, options)?;
            log::info!(
                "exec template written to {}: snapshot taken {} ms after capsule started, in {:.1} ms ({} MiB of memory not zero)",
                dir.display(),
                lock(&session).started.elapsed().as_millis(),
                stats.elapsed.as_secs_f64() * 1000.0,
                stats.mem_written >> 20,
            );
            return Ok(Outcome::Exited(0));
        }
        RunEnd::Host(Made::Stopped(s)) => RunEnd::Host(s),
        RunEnd::Guest(g) => RunEnd::Guest(g),
    };
    // The guest failed before its init waited: as a cold exec says it.
    let ended = outcome(end, &lock(&session), &tail);
    Ok(match ended {
        Outcome::Exited(_) => Outcome::SetupFailed("the template's init ran a command".into()),
        other => other,
    })
}

/// Writes [`TEMPLATE_FILE`] into `dir`: the template is complete.
fn write_template(dir: &Path, options: TemplateOptions) -> Result<(), Error> {
    let template = Template {
        capsule_version: env!("CARGO_PKG_VERSION").into(),
        options,
    };
    let text = serde_json::to_vec_pretty(&template)
        .map_err(|e| Error::Host("cannot encode the template", std::io::Error::other(e)))?;
    snapshot::format::write_atomic(&dir.join(TEMPLATE_FILE), &text)
        .map_err(|e| Error::Host("cannot write the template file", e))
}

/// How the template's run loop ended on the host's side.
enum Made {
    /// The init said hello: the snapshot was taken (or failed).
    Snapshot(Result<snapshot::CreateStats, Error>),
    /// The session stopped first (boot timeout, broken init).
    Stopped(super::session::Stop),
}

/// Pauses the template and writes its Full snapshot into `dir`.
fn save(vmm: &mut Vmm, dir: &Path) -> Result<snapshot::CreateStats, Error> {
    vmm.pause()
        .map_err(|e| Error::Host("cannot pause the template", std::io::Error::other(e)))?;
    Ok(snapshot::create(
        vmm,
        snapshot::Kind::Full,
        &dir.join("snapshot"),
        &dir.join("memory"),
        &snapshot::DeviceIds::default(),
    )?)
}

/// `exec --snapshot DIR`: runs the command of `config` in a clone of the
/// template in `dir` (whose options `config.vm` already holds).
pub fn run_snapshot(mut config: ExecConfig, dir: &Path) -> Result<Outcome, Error> {
    refuse_unsupported(&config, "--snapshot")?;
    drop(
        crate::vstate::vm::Vm::open_kvm(&config.vm.kvm_path)
            .map_err(|e| Error::Vm(builder::Error::from(e)))?,
    );
    super::prepare::check_command(&config)?;
    let spec = exec_proto::ExecSpec {
        argv: config.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: config.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        cwd: config.workdir.as_bytes().to_vec(),
        disk: !config.vm.disks.is_empty(),
        tty: config.tty.then(|| {
            crate::terminal::window_size().unwrap_or(exec_proto::WinSize { rows: 24, cols: 80 })
        }),
        user: config.user.clone(),
        ..Default::default()
    }
    .to_bytes()?;
    if spec.len() > exec_proto::MAX_PAYLOAD {
        return Err(Error::Usage(format!(
            "the command and its environment take {} bytes; a clone takes at most {}",
            spec.len(),
            exec_proto::MAX_PAYLOAD
        )));
    }
    let wake = devices::eventfd().map_err(|e| Error::Host("eventfd", e))?;
    let session = Arc::new(Mutex::new(new_session(&config, &wake)?));
    let tail = ConsoleTail::default();
    let serial = Console {
        out: Box::new(tail.clone()),
        input: None,
        raw_terminal: false,
    };
    let _forwarding = super::forward::start(&mut lock(&session), &wake)?;
    let (mut link, _sockets, _file) = vsock_link(&mut config, &session, wake)?;
    link.send_spec(spec);
    let restore = RestoreConfig {
        snapshot_path: dir.join("snapshot"),
        mem_path: dir.join("memory"),
        kvm_path: config.vm.kvm_path.clone(),
        resume: true,
        vsock: config.vm.vsock.clone(),
        ..Default::default()
    };
    let mut vmm = snapshot::restore::restore(&restore, serial)?.vmm;
    vmm.add_subscriber(Arc::new(Mutex::new(link)));
    let end = vmm.run(Some(super::TICK), |vmm| super::check(vmm, &session))?;
    let session = lock(&session);
    Ok(outcome(end, &session, &tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            capsule_version: env!("CARGO_PKG_VERSION").into(),
            options: TemplateOptions {
                kernel: "/nonexistent/k".into(),
                initrd: None,
                append: "x=1".into(),
                cpus: 2,
                memory: 256 << 20,
                rootfs: None,
                disks: vec!["/nonexistent/d.img,ephemeral".parse().unwrap()],
                modules: None,
            },
        }
    }

    #[test]
    fn options_given_must_match_the_template() {
        let t = template();
        assert_eq!(t.check(&GivenOptions::default()), Ok(()));
        let same = GivenOptions {
            kernel: Some("/nonexistent/k".into()),
            append: "x=1".into(),
            cpus: Some(2),
            memory: Some(256 << 20),
            disks: t.options.disks.clone(),
            ..Default::default()
        };
        assert_eq!(t.check(&same), Ok(()));
        let cases: [(GivenOptions, &str); 6] = [
            (
                GivenOptions {
                    cpus: Some(1),
                    ..Default::default()
                },
                "--cpus 1 conflicts with the template's (2)",
            ),
            (
                GivenOptions {
                    memory: Some(512 << 20),
                    ..Default::default()
                },
                "--memory 512 MiB",
            ),
            (
                GivenOptions {
                    kernel: Some("/other".into()),
                    ..Default::default()
                },
                "--kernel /other",
            ),
            (
                GivenOptions {
                    append: "y".into(),
                    ..Default::default()
                },
                "--append",
            ),
            (
                GivenOptions {
                    rootfs: Some("/r".into()),
                    ..Default::default()
                },
                "template's (none)",
            ),
            (
                GivenOptions {
                    disks: vec!["/nonexistent/d.img,ro".parse().unwrap()],
                    ..Default::default()
                },
                "--disk",
            ),
        ];
        for (given, want) in cases {
            let e = t.check(&given).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_directory_without_a_template_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("capsule-warm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Template::load(&dir).unwrap_err().to_string();
        assert!(e.contains("not an exec template"), "{e}");
        assert!(e.contains("--make-snapshot"), "{e}");
        let mut t = template();
        t.capsule_version = "0.0.0-other".into();
        std::fs::write(dir.join(TEMPLATE_FILE), serde_json::to_vec(&t).unwrap()).unwrap();
        let e = Template::load(&dir).unwrap_err().to_string();
        assert!(e.contains("made by capsule 0.0.0-other"), "{e}");
        let t = template();
        std::fs::write(dir.join(TEMPLATE_FILE), serde_json::to_vec(&t).unwrap()).unwrap();
        assert_eq!(Template::load(&dir).unwrap(), t);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
