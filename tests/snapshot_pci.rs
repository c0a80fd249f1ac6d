//! Snapshots of a VM whose virtio devices are on PCI (`transport` in the
//! machine configuration of a config file), against the real binary on
//! /dev/kvm with the tiny alphabet guest: the snapshot says virtio-pci and
//! holds the function's state, a clone goes on with the next letter, and
//! a snapshot whose PCI state was altered (its checksum made right again)
//! is refused with one clear error. A snapshot of the older format (2,
//! before the transport was saved) still restores.

use std::path::Path;

mod common;
use capsule::snapshot::format;
use common::snapshot::*;

/// Boots the alphabet guest with an entropy device from a config file
/// whose machine configuration says `transport`, snapshots it into `dir`
/// (`--stop`); returns the last letter printed.
fn snapshot_with_transport(name: &str, dir: &Path, transport: &str) -> char {
    let kernel = tmp(&format!("{name}.elf"));
    std::fs::write(&kernel, alphabet_guest()).unwrap();
    let cfg = tmp(&format!("{name}.json"));
    let body = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "transport": transport},
        "entropy": {},
    });
    std::fs::write(&cfg, body.to_string()).unwrap();
    ok(&capsule(&[
        "run",
        "-d",
        "--name",
        name,
        "--config-file",
        cfg.to_str().unwrap(),
    ]));
    wait_output(name, 30);
    let last = pause_after_a_letter(name);
    snapshot_into(name, dir, &["--stop"]);
    last
}

/// `run --restore DIR` must fail with one error line saying `want`.
fn refused(dir: &Path, want: &str) {
    let out = capsule(&["run", "--restore", dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("capsule: error: ") && err.contains(want),
        "{err}"
    );
}

#[test]
fn a_vm_on_virtio_pci_is_snapshotted_and_restored() {
    let pid = std::process::id();
    let name = format!("snappci-{pid}");
    let dir = tmp(&format!("pci-{pid}"));
    let last = snapshot_with_transport(&name, &dir, "pci");
    let st = state_json(&dir);
    assert_eq!(st["transport"], "pci");
    assert_eq!(st["transports"].as_array().unwrap().len(), 0);
    let functions = st["pci"]["functions"].as_array().unwrap();
    assert_eq!(functions.len(), 1);
    assert_eq!(functions[0]["device_type"], 4, "virtio-rng");
    assert_eq!(functions[0]["config_space"].as_array().unwrap().len(), 256);
    // One queue and the configuration vector.
    assert_eq!(functions[0]["msix"]["entries"].as_array().unwrap().len(), 2);
    let clone = format!("snappcic-{pid}");
    restore_detached(&dir, &clone, &[]);
    let out = wait_output(&clone, 3);
    let _ = capsule(&["kill", &clone]);
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");

    let v = format::FORMAT_VERSION;
    let d = edited(&dir, &format!("pci-{pid}-vector"), v, &|s| {
        s["pci"]["functions"][0]["common"]["queue_msix_vectors"][0] = 7.into();
    });
    refused(&d, "virtio-pci function 0: MSI-X vector 7 of a table of 2");
    let d = edited(&dir, &format!("pci-{pid}-vendor"), v, &|s| {
        s["pci"]["functions"][0]["config_space"][0] = 0.into();
    });
    refused(&d, "not the same kind of PCI function");
    let d = edited(&dir, &format!("pci-{pid}-mmio"), v, &|s| {
        s["transport"] = "mmio".into();
    });
    refused(&d, "0 virtio-mmio transports and 1 virtio-pci functions");
    let d = edited(&dir, &format!("pci-{pid}-nobus"), v, &|s| {
        s.as_object_mut().unwrap().remove("pci");
    });
    refused(&d, "no PCI bus with virtio-pci functions");
    let d = edited(&dir, &format!("pci-{pid}-usb"), v, &|s| {
        s["transport"] = "usb".into();
    });
    refused(&d, "unknown variant `usb`");

    // A snapshot written before the functions had their
    // VIRTIO_PCI_CAP_PCI_CFG capability (same format version): the chain
    // ended at MSI-X, with zeros where that capability is now.
    let space: Vec<u8> = serde_json::from_value(functions[0]["config_space"].clone()).unwrap();
    let (link, cap) = last_capability(&space);
    assert_eq!(
        (space[cap], space[cap + 2], space[cap + 3]),
        (0x09, 20, 5),
        "the chain ends with VIRTIO_PCI_CAP_PCI_CFG"
    );
    assert_eq!(space[link - 1], 0x11, "after MSI-X");
    let d = edited(&dir, &format!("pci-{pid}-before-pci-cfg"), v, &|s| {
        let space = &mut s["pci"]["functions"][0]["config_space"];
        space[link] = 0.into();
        for i in cap..cap + 20 {
            space[i] = 0.into();
        }
    });
    let clone = format!("snappcio-{pid}");
    restore_detached(&d, &clone, &[]);
    let out = wait_output(&clone, 3);
    let _ = capsule(&["kill", &clone]);
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");
}

/// The last capability of configuration space `space`: the offset of the
/// byte that links to it, and its own offset.
fn last_capability(space: &[u8]) -> (usize, usize) {
    let (mut link, mut cap) = (0x34, usize::from(space[0x34]));
    while space[cap + 1] != 0 {
        (link, cap) = (cap + 1, usize::from(space[cap + 1]));
    }
    (link, cap)
}

#[test]
fn a_snapshot_of_the_older_format_still_restores() {
    let pid = std::process::id();
    let name = format!("snapv2-{pid}");
    let dir = tmp(&format!("v2-{pid}"));
    let last = snapshot_with_transport(&name, &dir, "mmio");
    assert_eq!(state_json(&dir)["transport"], "mmio");
    // Format 2 had neither field.
    let d = edited(&dir, &format!("v2-{pid}-old"), 2, &|s| {
        let o = s.as_object_mut().unwrap();
        o.remove("transport");
        o.remove("pci");
    });
    let clone = format!("snapv2c-{pid}");
    restore_detached(&d, &clone, &[]);
    let out = wait_output(&clone, 3);
    let _ = capsule(&["kill", &clone]);
    assert_eq!(out.chars().next(), Some(next_letter(last)), "{out:?}");
}
