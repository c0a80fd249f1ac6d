//! The snapshot files a restore reads, for fuzzing: the snapshot file
//! (and a Diff's base), their memory files' sizes, then the saved device
//! states put back into devices that need no KVM.
//!
//! Input: `flags: u8 | base_len: u16 | base | snapshot`.
//!
//! * bit 0: `snapshot` is the JSON payload and gets a correct header
//!   (magic, version, CRC, length), so mutations reach the decoder
//!   instead of the checksum; clear: `snapshot` is the whole file.
//! * bit 1: likewise for `base`.
//! * bit 2: the payloads' `cpu` is set to this host's, so the checks past
//!   the CPU model are reached on any machine (the seeds were taken on
//!   one host).
//! * bit 3: the memory files have the size the payloads' `mem_size`
//!   says (sparse); clear: they are empty.
//! * bit 4: a base is given (`base` and its memory file).
//! * bit 5: a TAP override for interface `eth0`; bit 6: a new vsock
//!   socket.
//!
//! Then, if the restore's checks pass, the saved UART, i8042 and every
//! virtio transport, virtio-mmio or virtio-pci (onto a device of the
//! saved type, over the fuzz harness's small guest memory) are restored
//! as a restore does after building the VM. The files live in a directory of the thread,
//! rewritten for each run.

use std::path::{Path, PathBuf};

use capsule::snapshot::format::{FORMAT_VERSION, MAGIC};
use capsule::snapshot::restore::{self, RestoreConfig};
use capsule::snapshot::{CpuModel, SnapshotState};
use devices::exit::ExitSignal;
use devices::legacy::{EventFdTrigger, SerialDevice, I8042};

use crate::virtio::{Kind, Rig, TransportKind};
use crate::Input;

/// Largest memory file made (sparse): a `mem_size` beyond it gets an
/// empty file, which the size check refuses.
const MAX_MEM_FILE: u64 = 1 << 40;

/// The file bytes for `data`: as given, or (`wrap`) a header around it
/// as a payload, after (`host_cpu`) setting its CPU to this host's.
/// Also returns the payload's `mem_size`, if it has one.
fn file_bytes(data: &[u8], wrap: bool, host_cpu: bool) -> (Vec<u8>, Option<u64>) {
    let payload = if wrap {
        data
    } else {
        data.get(24..).unwrap_or(&[])
    };
    let mut json: Option<serde_json::Value> = serde_json::from_slice(payload).ok();
    let mem_size = json
        .as_ref()
        .and_then(|j| j.get("mem_size"))
        .and_then(|m| m.as_u64());
    if !wrap {
        return (data.to_vec(), mem_size);
    }
    let mut payload = payload.to_vec();
    if let (true, Some(serde_json::Value::Object(m))) = (host_cpu, json.as_mut()) {
        m.insert(
            "cpu".into(),
            serde_json::to_value(CpuModel::host()).expect("cpu model"),
        );
        payload = serde_json::to_vec(&json).expect("json");
    }
    let mut out = Vec::with_capacity(24 + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    (out, mem_size)
}

/// Writes `bytes` to `path`, and a memory file `mem` of `size` bytes
/// (sparse), or empty.
fn write_files(path: &Path, bytes: &[u8], mem: &Path, size: Option<u64>) {
    std::fs::write(path, bytes).expect("write the snapshot file");
    let f = std::fs::File::create(mem).expect("create the memory file");
    if let Some(n) = size.filter(|&n| n <= MAX_MEM_FILE) {
        let _ = f.set_len(n);
    }
}

/// What a run got to.
#[derive(Debug)]
pub enum Outcome {
    /// The restore's checks refused the files.
    Refused(capsule::snapshot::Error),
    /// They passed; the device states' restores gave these results
    /// (UART, i8042, then each transport: `Ok` if restored).
    Passed(Vec<Result<(), String>>),
}

/// Runs one input (see the module documentation).
pub fn run(data: &[u8]) -> Outcome {
    let mut input = Input::new(data);
    let flags = input.u8();
    let base_len = usize::from(input.u16());
    let base = input.bytes(base_len);
    let snap = input.rest();
    let d = crate::thread_dir();
    let (snapshot_path, mem_path) = (d.join("snapshot"), d.join("memory"));
    let (base_path, base_mem) = (d.join("base"), d.join("base-memory"));
    let host_cpu = flags & 4 != 0;
    let (bytes, size) = file_bytes(snap, flags & 1 != 0, host_cpu);
    let sized = |s: Option<u64>| s.filter(|_| flags & 8 != 0);
    write_files(&snapshot_path, &bytes, &mem_path, sized(size));
    let mut cfg = RestoreConfig {
        snapshot_path,
        mem_path,
        kvm_path: PathBuf::from("/dev/null"),
        ..Default::default()
    };
    if flags & 16 != 0 {
        let (bytes, size) = file_bytes(base, flags & 2 != 0, host_cpu);
        write_files(&base_path, &bytes, &base_mem, sized(size));
        cfg.base = Some((base_path, base_mem));
    }
    if flags & 32 != 0 {
        cfg.tap_overrides = vec![("eth0".into(), "tap-fuzz".into())];
    }
    if flags & 64 != 0 {
        cfg.vsock_uds = Some(d.join("vsock"));
    }
    match restore::check(&cfg) {
        Err(e) => {
            // Every error must say something.
            assert!(!e.to_string().is_empty());
            Outcome::Refused(e)
        }
        Ok((state, _config)) => Outcome::Passed(restore_devices(&state)),
    }
}

/// Puts the saved device states back into fresh devices, as a restore
/// does once the VM is built.
fn restore_devices(state: &SnapshotState) -> Vec<Result<(), String>> {
    let mut out = Vec::new();
    let (mut serial, _) = SerialDevice::new(
        EventFdTrigger::new().expect("eventfd"),
        Box::new(std::io::sink()),
    )
    .expect("serial");
    out.push(serial.restore(&state.serial).map_err(|e| e.to_string()));
    let mut i8042 = I8042::new(
        ExitSignal::new().expect("exit signal"),
        EventFdTrigger::new().expect("eventfd"),
    );
    out.push(i8042.restore(&state.i8042).map_err(|e| e.to_string()));
    for saved in &state.transports {
        let kind = match saved.device_type {
            2 => Kind::Block,
            1 => Kind::Net,
            3 => Kind::Console,
            5 => Kind::Balloon,
            _ => {
                let mut v = crate::vsock::Vsock::new(0, &[]);
                out.push(v.rig.mmio().restore(saved).map_err(|e| e.to_string()));
                v.rig.run_events();
                continue;
            }
        };
        let mut rig = Rig::new(kind, &mut Input::new(&[]), &[]);
        out.push(rig.mmio().restore(saved).map_err(|e| e.to_string()));
        // A restored device runs: its queues, as saved, over this memory.
        for q in 0..rig.queues {
            rig.notify(q);
        }
    }
    restore_pci(state, &mut out);
    out
}

/// Each saved virtio-pci function onto a fresh function over a device of
/// its saved type (a block device for an unknown type: the restore must
/// refuse it), then its queues notified and the event loop run.
fn restore_pci(state: &SnapshotState, out: &mut Vec<Result<(), String>>) {
    let Some(bus) = &state.pci else { return };
    for saved in &bus.functions {
        let kind = match saved.device_type {
            1 => Kind::Net,
            3 => Kind::Console,
            4 => Kind::Rng,
            5 => Kind::Balloon,
            _ => Kind::Block,
        };
        let mut rig = Rig::new_over(TransportKind::Pci, kind, &mut Input::new(&[]), &[]);
        let pci = rig.pci().expect("a PCI rig");
        out.push(pci.function().restore(saved).map_err(|e| e.to_string()));
        // A restored device runs: each queue notified, as the guest would.
        for q in 0..rig.queues {
            rig.notify(q);
        }
        rig.pci().expect("a PCI rig").take_interrupts();
    }
}

#[cfg(test)]
mod tests {
    //! The seeds, real snapshots, must get past every check, and their
    //! device states must restore; damaged ones must be refused.

    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let path = format!("{}/corpus/snapshot_file/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn seeds_pass_the_checks_and_restore_their_devices() {
        for name in ["full-vsock", "diff-on-base", "full-pci"] {
            match run(&seed(name)) {
                Outcome::Passed(results) => {
                    assert!(results.len() >= 2, "{name}: {results:?}");
                    assert!(results.iter().all(|r| r.is_ok()), "{name}: {results:?}");
                }
                Outcome::Refused(e) => panic!("{name}: refused: {e}"),
            }
        }
    }

    /// The virtio-pci seed's function is restored; a vector past its
    /// table is refused by the function, not a panic.
    #[test]
    fn the_pci_seed_restores_its_function_and_refuses_a_bad_vector() {
        let s = seed("full-pci");
        let text = String::from_utf8_lossy(&s).into_owned();
        let good = "\"config_msix_vector\":65535";
        assert!(text.contains(good), "the seed's vector changed");
        let damaged = text.replace(good, "\"config_msix_vector\":2");
        match run(damaged.as_bytes()) {
            Outcome::Passed(results) => {
                let e = results.last().unwrap().as_ref().unwrap_err();
                assert!(e.contains("MSI-X vector 2 of a table of 2"), "{e}");
            }
            Outcome::Refused(e) => panic!("refused before the devices: {e}"),
        }
    }

    #[test]
    fn damaged_seeds_are_refused() {
        let mut s = seed("full-vsock");
        // The memory file is empty: its size does not match.
        s[0] &= !8;
        assert!(matches!(
            run(&s),
            Outcome::Refused(capsule::snapshot::Error::MemSize { .. })
        ));
        // A Diff without its base.
        let mut s = seed("diff-on-base");
        s[0] &= !16;
        assert!(matches!(
            run(&s),
            Outcome::Refused(capsule::snapshot::Error::Mismatch { .. })
        ));
    }

    /// A Diff's page runs that are not whole pages of guest memory are
    /// refused by the checks, before anything would be mapped.
    #[test]
    fn damaged_diff_runs_are_refused_before_kvm() {
        let s = seed("diff-on-base");
        let text = String::from_utf8_lossy(&s).into_owned();
        let good = "\"runs\":[[3145728,8192]]";
        assert!(text.contains(good), "the seed's runs changed");
        for bad in [
            "[[3145728,4097]]",
            "[[268431360,8192]]",
            "[[18446744073709547520,8192]]",
        ] {
            let damaged = text.replace(good, &format!("\"runs\":{bad}"));
            match run(damaged.as_bytes()) {
                Outcome::Refused(e) => {
                    assert!(e.to_string().contains("page list is damaged"), "{bad}: {e}")
                }
                o => panic!("{bad}: {o:?}"),
            }
        }
    }
}
