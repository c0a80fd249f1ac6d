//! What capsule logs of a guest it cannot see into: where each vCPU is,
//! twice a little apart, and the virtio devices' queues. Three callers:
//!
//! * `capsule exec`, when its guest goes quiet (no message from the init
//!   for the stall timeout, or no init within the boot timeout): the
//!   vCPUs and the vsock device ([`log_quiet_guest`], at `info`);
//! * SIGUSR2 on a running VM: every device, the vsock connections and
//!   the vCPUs ([`log_state`], at `warn`; the VM runs on);
//! * a guest booted with its console on COM1 that a signal stops before
//!   it wrote a byte there: the vCPUs ([`log_vcpus`], from `Vmm::run`).
//!
//! A quiet guest is one of three things, and these lines tell which:
//!
//! * idle, waiting for a notification that was lost: its vCPUs halted
//!   with interrupts on, a queue index past the other side's event mark
//!   with nothing taken or signalled since, or a timer armed in the past
//!   (`TSC_DEADLINE` below the TSC) with no interrupt pending;
//! * busy in a loop of its own: running, at the same or nearby RIPs;
//! * not run by the host at all: the same RIP and TSC in both samples.

use std::sync::Arc;
use std::time::Duration;

use devices::virtio::vsock::Vsock;
use kvm_bindings::kvm_lapic_state;

use crate::vmm::Vmm;
use crate::vstate::vcpu_state::VcpuState;

/// `IA32_TIME_STAMP_COUNTER`.
const MSR_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: the local APIC timer's deadline in TSC-deadline mode.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// How long the vCPUs may take to report.
const SAVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Between the two samples of the vCPUs.
const SAMPLE_GAP: Duration = Duration::from_millis(200);

/// Logs (at `info`: a failed run still ends in one error line by
/// default) where the guest's vCPUs are and the vsock device's state.
/// Pauses the VM for a moment to read the vCPUs; any failure to do so is
/// logged and the VM runs on as before.
pub(crate) fn log_quiet_guest(vmm: &mut Vmm) {
    if let Some(line) = vsock_line(vmm, Vsock::describe) {
        log::info!("quiet guest: vsock: {line}");
    }
    log_vcpus(vmm, log::Level::Info, "quiet guest");
}

/// What the vsock device says of itself, if the VM has one.
fn vsock_line(vmm: &Vmm, describe: fn(&Vsock) -> String) -> Option<String> {
    let v = vmm.vsock.as_ref()?;
    Some(describe(
        &v.device.lock().unwrap_or_else(|e| e.into_inner()),
    ))
}

/// Logs at `level` every virtio device's queue positions, the vsock
/// device's connections, then where the vCPUs are ([`log_vcpus`]):
/// for SIGUSR2.
pub(crate) fn log_state(vmm: &mut Vmm, level: log::Level) {
    let describe = |d: &dyn devices::virtio::VirtioDevice| {
        format!("{}: {}", d.common().name(), d.common().describe_queues())
    };
    let h = &vmm.persist;
    let mut lines = Vec::new();
    for t in &h.transports {
        let t = t.lock().unwrap_or_else(|e| e.into_inner());
        let d = t.device().lock().unwrap_or_else(|e| e.into_inner());
        lines.push(describe(&*d));
    }
    for f in &h.pci_functions {
        let f = f.lock().unwrap_or_else(|e| e.into_inner());
        lines.push(describe(&*f.lock_device()));
    }
    for line in lines {
        log::log!(level, "state: {line}");
    }
    // Its queues are among the devices' above.
    if let Some(line) = vsock_line(vmm, Vsock::describe_connections) {
        log::log!(level, "state: vsock: {line}");
    }
    log_vcpus(vmm, level, "state");
}

/// Logs at `level`, each line starting with `prefix`, how often the
/// vCPUs left KVM for capsule and, twice [`SAMPLE_GAP`] apart, where each
/// one is.
pub(crate) fn log_vcpus(vmm: &mut Vmm, level: log::Level, prefix: &str) {
    let m = &devices::metrics::VCPU;
    log::log!(
        level,
        "{prefix}: vCPU exits to capsule so far: {} port reads, {} port writes, {} MMIO reads, {} MMIO writes",
        m.exit_io_in.get(),
        m.exit_io_out.get(),
        m.exit_mmio_read.get(),
        m.exit_mmio_write.get()
    );
    for sample in 1..=2 {
        if sample > 1 {
            std::thread::sleep(SAMPLE_GAP);
        }
        match sample_vcpus(vmm) {
            Ok(lines) => {
                for line in lines {
                    log::log!(level, "{prefix}: sample {sample}: {line}");
                }
            }
            Err(why) => {
                log::log!(level, "{prefix}: cannot read the vCPUs: {why}");
                return;
            }
        }
    }
}

/// One line per vCPU, read with the VM paused for the moment it takes.
/// The VM is resumed whatever happened (a pause that timed out leaves
/// some vCPUs parked otherwise), unless it was paused before.
fn sample_vcpus(vmm: &mut Vmm) -> Result<Vec<String>, String> {
    let paused_before = vmm.pause.requested();
    let paused = vmm.pause();
    let states = match paused {
        Ok(()) => Some(vmm.pause.save_states(
            vmm.vcpus.len(),
            Arc::new(vec![MSR_TSC, MSR_TSC_DEADLINE]),
            SAVE_TIMEOUT,
        )),
        Err(_) => None,
    };
    let resumed = if paused_before { Ok(()) } else { vmm.resume() };
    paused.map_err(|e| e.to_string())?;
    resumed.map_err(|e| e.to_string())?;
    let states = states.ok_or("no state read")?.map_err(|e| e.to_string())?;
    Ok(states
        .iter()
        .enumerate()
        .map(|(i, s)| describe(i, s))
        .collect())
}

/// A vCPU's position: RIP, interrupts on or off, KVM's run state, the
/// timer, and the vectors pending or in service at its local APIC.
fn describe(index: usize, s: &VcpuState) -> String {
    let msr = |i: u32| s.msrs.iter().find(|(k, _)| *k == i).map(|(_, v)| *v);
    let (tsc, deadline) = (msr(MSR_TSC), msr(MSR_TSC_DEADLINE));
    let timer = match (tsc, deadline) {
        (_, Some(0)) | (_, None) => "no deadline".to_string(),
        (Some(t), Some(d)) if d <= t => format!("deadline {} cycles ago", t - d),
        (Some(t), Some(d)) => format!("deadline in {} cycles", d - t),
        (None, Some(d)) => format!("deadline {d}"),
    };
    let ev = &s.vcpu_events;
    format!(
        "vCPU {index}: rip {:#x} interrupts {} {} tsc {} timer: {timer}, lvt {:#x}; injected irq {} (vector {}), nmi pending {}, exception {}; APIC irr [{}] isr [{}]",
        s.regs.rip,
        if s.regs.rflags & (1 << 9) != 0 { "on" } else { "off" },
        mp_state_name(s.mp_state.mp_state),
        tsc.map_or_else(|| "?".into(), |t| t.to_string()),
        apic_reg(&s.lapic, 0x320),
        ev.interrupt.injected,
        ev.interrupt.nr,
        ev.nmi.pending,
        ev.exception.injected,
        vectors(&s.lapic, 0x200),
        vectors(&s.lapic, 0x100),
    )
}

/// KVM's run state of a vCPU, by name.
fn mp_state_name(state: u32) -> String {
    match state {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable".into(),
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "waiting for INIT".into(),
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "waiting for SIPI".into(),
        kvm_bindings::KVM_MP_STATE_HALTED => "halted".into(),
        other => format!("mp_state {other}"),
    }
}

/// The 32-bit local APIC register at `offset`.
fn apic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs.get(offset + i).map_or(0, |&c| c as u8);
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

/// The vectors set in the 256-bit APIC register (IRR, ISR) at `base`:
/// eight 32-bit words, 16 bytes apart.
fn vectors(lapic: &kvm_lapic_state, base: usize) -> String {
    let mut set = Vec::new();
    for word in 0..8 {
        let bits = apic_reg(lapic, base + word * 0x10);
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                set.push((word * 32 + bit).to_string());
            }
        }
    }
    set.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic_with(offset: usize, value: u32) -> kvm_lapic_state {
        let mut l = kvm_lapic_state::default();
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            l.regs[offset + i] = *b as _;
        }
        l
    }

    #[test]
    fn apic_vectors_are_read_from_their_words() {
        // Vector 0xec (236): word 7, bit 12.
        let l = lapic_with(0x200 + 7 * 0x10, 1 << 12);
        assert_eq!(vectors(&l, 0x200), "236");
        assert_eq!(vectors(&l, 0x100), "");
        let l = lapic_with(0x100, 0b101);
        assert_eq!(vectors(&l, 0x100), "0 2");
    }

    #[test]
    fn a_register_reads_little_endian() {
        let l = lapic_with(0x320, 0x0004_00ec);
        assert_eq!(apic_reg(&l, 0x320), 0x0004_00ec);
    }
}
