//! The commands around running VMs: `doctor`, `completions`, `seccomp`
//! (the filters as Markdown or compiled) and the hidden `man` (man pages
//! for packagers), kept apart from the VM commands in main.rs.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::status;

/// `capsule doctor`'s arguments.
#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Also check which options capsule needs this kernel (ELF vmlinux or
    /// bzImage) has: its embedded configuration (CONFIG_IKCONFIG), a
    /// `config` or `.config` file beside it, or /boot/config-RELEASE.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// KVM device to check.
    #[arg(long, value_name = "PATH", default_value = capsule::config::DEFAULT_KVM_PATH)]
    kvm: PathBuf,
}

/// `capsule completions`' arguments.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write completions for.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

/// `capsule man`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// Directory to write capsule.1 and capsule-COMMAND.1 into.
    #[arg(value_name = "DIR", default_value = "man")]
    dir: PathBuf,
}

/// `capsule doctor`: 0 when capsule can run VMs here, 1 otherwise.
pub fn doctor(args: &DoctorArgs) -> u8 {
    let ok = capsule::doctor::run(&capsule::doctor::Options {
        kvm_path: args.kvm.clone(),
        kernel: args.kernel.clone(),
    });
    if ok {
        0
    } else {
        1
    }
}

/// `capsule completions SHELL`: the completion script on stdout.
pub fn completions<C: CommandFactory>(args: &CompletionsArgs) -> u8 {
    let mut cmd = C::command();
    clap_complete::generate(args.shell, &mut cmd, "capsule", &mut std::io::stdout());
    0
}

/// `capsule man DIR`: capsule.1 and one page per visible subcommand.
pub fn man<C: CommandFactory>(args: &ManArgs) -> u8 {
    match write_man_pages(C::command(), &args.dir) {
        Ok(n) => {
            eprintln!("capsule: wrote {n} man pages to {}", args.dir.display());
            0
        }
        Err(e) => {
            eprintln!(
                "capsule: error: cannot write man pages to {}: {e}",
                args.dir.display()
            );
            1
        }
    }
}

fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let cmd = cmd.version(env!("CARGO_PKG_VERSION"));
    let mut pages = vec![(String::from("capsule"), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("capsule-{}", sub.get_name());
        pages.push((
            name.clone(),
            sub.clone().name(name).version(env!("CARGO_PKG_VERSION")),
        ));
    }
    for (name, page) in &pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(page.clone()).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
    }
    Ok(pages.len())
}

/// After a `run` whose guest panicked: if the kernel cannot see the
/// devices it was given (its configuration says so), one line saying why.
pub fn explain_panic(kernel: &Path, args: &crate::RunArgs) {
    let problem = capsule::doctor::run_kernel_problem(
        kernel,
        !args.disks.is_empty(),
        !args.nets.is_empty(),
        args.initrd.is_some(),
    );
    if let Some(p) = problem {
        eprintln!("capsule: probable cause: {p}");
    }
}

/// `capsule seccomp`'s arguments.
#[derive(clap::Args, Debug)]
pub struct SeccompArgs {
    /// Write the compiled filters to FILE in the format --seccomp-filter
    /// reads (CAPSULE_SECCOMP picks the action for forbidden calls).
    #[arg(long, value_name = "FILE")]
    compile: Option<PathBuf>,
    /// Rewrite the generated lists in FILE (docs/security.md).
    #[arg(long, value_name = "FILE", conflicts_with = "compile")]
    doc: Option<PathBuf>,
}

/// `capsule seccomp`: the filters as Markdown, or compiled into a file.
pub fn seccomp(args: &SeccompArgs) -> u8 {
    use capsule::seccomp::{self, ThreadKind};
    if let Some(doc) = &args.doc {
        let updated = std::fs::read_to_string(doc)
            .map_err(|e| format!("cannot read {}: {e}", doc.display()))
            .and_then(|text| {
                seccomp::render::update_doc(&text)
                    .ok_or_else(|| format!("{} lacks the seccomp-filters markers", doc.display()))
            })
            .and_then(|text| {
                std::fs::write(doc, text)
                    .map_err(|e| format!("cannot write {}: {e}", doc.display()))
            });
        return match updated {
            Ok(()) => status::OK,
            Err(e) => {
                eprintln!("capsule: error: {e}");
                status::ERROR
            }
        };
    }
    let Some(out) = &args.compile else {
        print!("{}", seccomp::render::markdown());
        return status::OK;
    };
    let compiled = seccomp::Mode::from_env().and_then(|mode| {
        ThreadKind::ALL
            .iter()
            .map(|&k| seccomp::compile(k, mode).map(|p| (k.name().to_string(), p)))
            .collect::<Result<std::collections::BTreeMap<_, _>, _>>()
    });
    let result = compiled.map_err(|e| e.to_string()).and_then(|map| {
        std::fs::write(out, seccomp::file::encode(&map))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))
    });
    match result {
        Ok(()) => status::OK,
        Err(e) => {
            eprintln!("capsule: error: {e}");
            status::ERROR
        }
    }
}
