//! vCPUs: register setup and the per-vCPU run loop.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port I/O and
//! MMIO exits to the device buses. Anything that ends the VM (a reset, a
//! triple fault, a KVM failure) is reported through the VM-wide
//! [`ExitSignal`]; the VMM then stops the remaining vCPUs with [`VcpuHandle::kick`].

use arch::GuestMemoryMmap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::exit::{ExitSignal, GuestExit};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::halt::{self, HaltWatch};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use super::pause::{PauseGate, SaveError};
use super::vcpu_state::{self, VcpuState};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A setup step failed.
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    Setup {
        /// vCPU index.
        index: u8,
        /// Which step.
        what: &'static str,
        /// Underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start vCPU {0} thread: {1}")]
    Spawn(u8, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Signal used to knock a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; its only job is to make
/// `KVM_RUN` return `EINTR`.
pub fn install_kick_handler() -> Result<(), Error> {
    register_signal_handler(kick_signal(), noop_handler).map_err(Error::Signal)
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` in `vm`.
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, Error> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::Create(index, e))?;
        Ok(Self { index, fd })
    }

    /// Programs CPUID, MSRs, FPU, registers, segments and the LAPIC so the
    /// vCPU starts in 64-bit mode at `entry` (the boot vCPU) or waits for
    /// INIT/SIPI (the others, which the in-kernel LAPIC holds).
    pub fn configure(
        &self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        entry: u64,
        num_cpus: u8,
    ) -> Result<(), Error> {
        let index = self.index;
        let wrap = |what: &'static str| {
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Setup {
                index,
                what,
                source: e,
            }
        };
        arch::cpuid::setup_cpuid(kvm, &self.fd, index, num_cpus)
            .map_err(|e| wrap("CPUID")(e.into()))?;
        arch::msr::setup_msrs(&self.fd).map_err(|e| wrap("MSRs")(e.into()))?;
        arch::regs::setup_fpu(&self.fd).map_err(|e| wrap("FPU")(e.into()))?;
        arch::regs::setup_regs(&self.fd, entry).map_err(|e| wrap("registers")(e.into()))?;
        arch::regs::setup_sregs(mem, &self.fd).map_err(|e| wrap("segments")(e.into()))?;
        arch::interrupts::set_lint(&self.fd).map_err(|e| wrap("LAPIC")(e.into()))?;
        Ok(())
    }

    /// Restores a saved state instead of [`Self::configure`] (a snapshot).
    pub fn restore(&self, state: &VcpuState) -> Result<(), Error> {
        vcpu_state::restore(&self.fd, state).map_err(|e| Error::Setup {
            index: self.index,
            what: "restore",
            source: e.into(),
        })
    }

    /// Starts the run loop on a new thread named `vcpuN`.
    pub fn start(self, io: VcpuIo) -> Result<VcpuHandle, Error> {
        let index = self.index;
        let stop = io.stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(io))
            .map_err(|e| Error::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            stop,
        })
    }

    fn run(mut self, io: VcpuIo) {
        // Confined before the first KVM_RUN: guest code never runs on an
        // unfiltered thread.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
            log::error!("vCPU {}: {e}", self.index);
            io.exit.signal(GuestExit::Fault);
            return;
        }
        crate::seccomp::test_forbidden_call("vcpu");
        if self.index == 0 {
            crate::setup_step("vCPU 0 confined, entering the guest");
        }
        let mut stats = ExitStats::default();
        // Debug builds only: the fail-stop test's injected panic.
        let test_panic = crate::failstop::test_panic_requested("vcpu");
        while !io.stop.load(Ordering::Acquire) {
            if io.pause.requested() {
                io.pause.park(&io.stop, self.index, &self.fd);
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    stats.count(&exit);
                    if test_panic && stats.total == 10 {
                        panic!("CAPSULE_TEST_PANIC=vcpu: injected panic");
                    }
                    let triple_fault = matches!(exit, VcpuExit::Shutdown);
                    let reason = handle_exit(self.index, exit, &io);
                    if triple_fault {
                        self.log_triple_fault();
                    }
                    if let Some(reason) = reason {
                        if reason == GuestExit::Fault {
                            devices::metrics::VCPU.failures.inc();
                        }
                        io.exit.signal(reason);
                        break;
                    }
                    // A device this exit reached powered the machine off
                    // or reset it: like a real CPU, this one runs no
                    // further instruction. Going on until the event loop
                    // stops it lets the guest's kernel, finding itself
                    // still alive, fall through its other reboot methods
                    // (a real-mode jump to the BIOS capsule does not
                    // have) and triple-fault. A panicking guest keeps
                    // running until then, to finish writing its report.
                    if matches!(
                        io.exit.reason(),
                        Some(GuestExit::PowerOff | GuestExit::Reset)
                    ) {
                        break;
                    }
                }
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {
                    self.fd.set_kvm_immediate_exit(0);
                    if self.halted_for_good(&io) {
                        log::info!(
                            "every vCPU has halted with interrupts disabled: the guest powered off"
                        );
                        io.exit.signal(GuestExit::PowerOff);
                        break;
                    }
                }
                Err(e) => {
                    log::error!("vCPU {}: KVM_RUN failed: {e}", self.index);
                    devices::metrics::VCPU.failures.inc();
                    io.exit.signal(GuestExit::Fault);
                    break;
                }
            }
        }
        log::debug!("vCPU {} stopped; {}", self.index, stats.summary(8));
    }
}

/// How many sites [`ExitStats`] tracks: enough for the handful of device
/// registers a guest really hammers (serial, virtio notify, ...).
const TRACKED_SITES: usize = 16;

/// Exit kinds, in the order of [`ExitStats::by_kind`].
const KINDS: [&str; 5] = ["pio-in", "pio-out", "mmio-read", "mmio-write", "other"];

/// A tracked exit site: kind (index into [`KINDS`]) and port or address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Site(usize, u64);

/// One slot of the busiest-sites table: its count may include up to
/// `over` exits of the sites it replaced.
#[derive(Debug, Clone, Copy)]
struct Slot {
    site: Site,
    count: u64,
    over: u64,
}

/// Counts of the exits a vCPU thread handled, by kind and the busiest
/// addresses: where the guest makes capsule do work (see
/// docs/performance.md).
///
/// Fixed size whatever the guest does: the addresses are a guest's choice,
/// and a guest touching millions of distinct ones must not grow capsule's
/// memory (docs/security.md). The busiest sites are kept with the
/// space-saving algorithm (Metwally et al.): a new site replaces the
/// least-counted slot and inherits its count as a possible overcount, so
/// any site taking more than 1/[`TRACKED_SITES`] of the exits is always in
/// the table, and its count is exact unless marked `~`.
#[derive(Debug, Default)]
struct ExitStats {
    total: u64,
    by_kind: [u64; KINDS.len()],
    busiest: Vec<Slot>,
}

impl ExitStats {
    fn count(&mut self, exit: &VcpuExit<'_>) {
        let site = match exit {
            VcpuExit::IoIn(port, _) => Site(0, u64::from(*port)),
            VcpuExit::IoOut(port, _) => Site(1, u64::from(*port)),
            VcpuExit::MmioRead(addr, _) => Site(2, *addr),
            VcpuExit::MmioWrite(addr, _) => Site(3, *addr),
            _ => Site(4, 0),
        };
        let m = &devices::metrics::VCPU;
        match site.0 {
            0 => m.exit_io_in.inc(),
            1 => m.exit_io_out.inc(),
            2 => m.exit_mmio_read.inc(),
            3 => m.exit_mmio_write.inc(),
            _ => {}
        }
        self.total += 1;
        self.by_kind[site.0] += 1;
        if let Some(slot) = self.busiest.iter_mut().find(|s| s.site == site) {
            slot.count += 1;
        } else if self.busiest.len() < TRACKED_SITES {
            self.busiest.push(Slot {
                site,
                count: 1,
                over: 0,
            });
        } else if let Some(min) = self.busiest.iter_mut().min_by_key(|s| s.count) {
            *min = Slot {
                site,
                count: min.count + 1,
                over: min.count,
            };
        }
    }

    /// "N exits; by kind: ...; busiest: kind@addr count, ..." with the
    /// `top` busiest sites.
    fn summary(&self, top: usize) -> String {
        let mut sites = self.busiest.clone();
        sites.sort_by(|a, b| b.count.cmp(&a.count).then(a.site.cmp(&b.site)));
        let list: Vec<String> = sites
            .iter()
            .take(top)
            .map(|s| {
                let approx = if s.over > 0 { "~" } else { "" };
                format!("{}@{:#x} {approx}{}", KINDS[s.site.0], s.site.1, s.count)
            })
            .collect();
        let kinds: Vec<String> = KINDS
            .iter()
            .zip(self.by_kind)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "{} exits to capsule ({}); busiest: {}",
            self.total,
            kinds.join(", "),
            list.join(", ")
        )
    }
}

impl Vcpu {
    /// After a kick: reports this vCPU's state to the halt watch
    /// ([`super::halt`]); true when the whole machine has halted for good.
    fn halted_for_good(&self, io: &VcpuIo) -> bool {
        let Some(halt) = &io.halt else {
            return false;
        };
        if io.stop.load(Ordering::Acquire) || io.pause.requested() {
            return false;
        }
        let Ok(mp) = self.fd.get_mp_state() else {
            return false;
        };
        let state = halt::VcpuState::of(mp.mp_state, || self.fd.get_regs().ok().map(|r| r.rflags));
        halt.report(usize::from(self.index), state)
    }

    /// A triple fault resets the VM like a reboot, but unless the guest
    /// asked for it (`reboot=t`) it is a guest crash: say so, with where
    /// the vCPU was, on stderr.
    fn log_triple_fault(&self) {
        let regs = self.fd.get_regs();
        let sregs = self.fd.get_sregs();
        match (regs, sregs) {
            (Ok(r), Ok(s)) => log::warn!(
                "vCPU {}: triple fault (the VM resets): rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                self.index,
                r.rip,
                r.rsp,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            ),
            _ => log::warn!("vCPU {}: triple fault (the VM resets)", self.index),
        }
    }
}

/// What a running vCPU talks to.
#[derive(Clone)]
pub struct VcpuIo {
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Where to report the end of the VM.
    pub exit: ExitSignal,
    /// Set when the VMM wants all vCPUs to stop.
    pub stop: Arc<AtomicBool>,
    /// Where vCPUs park while the VM is paused.
    pub pause: Arc<PauseGate>,
    /// Where vCPUs report that they halted for good, if the VM ends then
    /// (a guest without ACPI).
    pub halt: Option<Arc<HaltWatch>>,
}

/// Handles one KVM exit; returns a reason when the VM must end.
fn handle_exit(index: u8, exit: VcpuExit<'_>, io: &VcpuIo) -> Option<GuestExit> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !io.pio.read(u64::from(port), data) {
                // Nothing decodes this port: the bus floats high.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !io.pio.write(u64::from(port), data) {
                devices::log_ratelimited!(
                    log::Level::Trace,
                    "vCPU {index}: write to unhandled port {port:#x}"
                );
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !io.mmio.read(addr, data) {
                devices::debug_ratelimited!("vCPU {index}: read from unhandled MMIO {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !io.mmio.write(addr, data) {
                devices::debug_ratelimited!("vCPU {index}: write to unhandled MMIO {addr:#x}");
            }
        }
        // A triple fault: the architectural way to reset a PC.
        VcpuExit::Shutdown => {
            return Some(GuestExit::Reset);
        }
        VcpuExit::SystemEvent(kind, _) => {
            log::info!("vCPU {index}: system event {kind}");
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                _ => GuestExit::Fault,
            });
        }
        // With the in-kernel irqchip HLT does not exit; if it ever does,
        // there is nothing to do but run again.
        VcpuExit::Hlt => {}
        VcpuExit::FailEntry(reason, cpu) => {
            log::error!("vCPU {index}: KVM entry failed (reason {reason:#x}, host cpu {cpu})");
            return Some(GuestExit::Fault);
        }
        VcpuExit::InternalError => {
            log::error!("vCPU {index}: KVM internal error (emulation failure)");
            return Some(GuestExit::Fault);
        }
        other => {
            devices::error_ratelimited!("vCPU {index}: unexpected KVM exit {other:?}");
            return Some(GuestExit::Fault);
        }
    }
    None
}

/// A running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Interrupts the vCPU's `KVM_RUN`.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if !t.is_finished() {
                if let Err(e) = t.kill(kick_signal()) {
                    log::debug!("vCPU {}: kick failed: {e}", self.index);
                }
            }
        }
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

/// Stops all vCPUs: sets the stop flag, kicks them until their threads end
/// (a signal can slip in just before `KVM_RUN`, so one kick is not enough)
/// and joins them. Gives up after `timeout`, leaving stragglers to process
/// exit. Returns whether every vCPU thread ended.
pub fn stop_all(vcpus: &mut [VcpuHandle], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    for v in vcpus.iter() {
        v.stop.store(true, Ordering::Release);
    }
    while vcpus.iter().any(|v| !v.is_finished()) && Instant::now() < deadline {
        for v in vcpus.iter() {
            v.kick();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut all = true;
    for v in vcpus.iter_mut() {
        if v.is_finished() {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        } else {
            log::warn!("vCPU {} did not stop in time", v.index);
            all = false;
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_stats_rank_sites() {
        let mut stats = ExitStats::default();
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            stats.count(&VcpuExit::IoOut(0x3f8, &byte));
        }
        stats.count(&VcpuExit::IoIn(0x3fd, &mut byte));
        stats.count(&VcpuExit::Hlt);
        assert_eq!(
            stats.summary(2),
            "5 exits to capsule (pio-in 1, pio-out 3, other 1); busiest: pio-out@0x3f8 3, pio-in@0x3fd 1"
        );
    }

    /// A million distinct addresses leave the table at its fixed size,
    /// and a site that takes a good share of the exits stays in it.
    #[test]
    fn exit_stats_stay_bounded_and_keep_the_hot_site() {
        let mut stats = ExitStats::default();
        let mut data = [0u8; 8];
        for i in 0..1_000_000u64 {
            stats.count(&VcpuExit::MmioRead(0x1000_0000 + i * 8, &mut data));
            if i % 4 == 0 {
                stats.count(&VcpuExit::IoOut(0x3f8, &data[..1]));
            }
        }
        assert_eq!(stats.busiest.len(), TRACKED_SITES);
        assert_eq!(stats.total, 1_250_000);
        let summary = stats.summary(1);
        assert!(
            summary.starts_with(
                "1250000 exits to capsule (pio-out 250000, mmio-read 1000000); busiest: pio-out@0x3f8 250000"
            ),
            "{summary}"
        );
    }
}
