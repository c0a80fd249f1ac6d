//! Firecracker's balloon API: `PUT /balloon` (before start), `PATCH
//! /balloon` (a new target), `GET /balloon`, `PATCH
//! /balloon/statistics` (a new polling interval) and `GET
//! /balloon/statistics`. Before start they read and change the
//! configuration; once the VM runs, the device itself.

use std::sync::{Arc, Mutex};

use devices::virtio::balloon::{self as dev, BalloonConfig, BalloonError, GuestStats};
use serde::{Deserialize, Serialize};

use super::action::{VmmAction, VmmActionError, VmmData};
use super::resources::VmResources;
use crate::vmm::Vmm;

/// `PUT /balloon`, `GET /balloon` and the config file's `balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// The guest may take pages back when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 (the default): none.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting: not implemented (only `false`).
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting: memory the guest frees goes back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl Balloon {
    /// The device's configuration.
    pub fn device_config(&self) -> BalloonConfig {
        BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting,
        }
    }

    /// The API's view of a device configuration.
    pub fn from_device(c: BalloonConfig) -> Self {
        Self {
            amount_mib: c.amount_mib,
            deflate_on_oom: c.deflate_on_oom,
            stats_polling_interval_s: c.stats_interval_s,
            free_page_hinting: false,
            free_page_reporting: c.free_page_reporting,
        }
    }
}

/// `PATCH /balloon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New interval in seconds.
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`: the device's target and actual size and the
/// guest's last statistics, under Firecracker's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    /// Target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest holds in the balloon.
    pub actual_pages: u32,
    /// Target in MiB.
    pub target_mib: u32,
    /// MiB the guest holds in the balloon.
    pub actual_mib: u32,
    /// What the guest reported.
    #[serde(flatten)]
    pub guest: GuestStats,
}

/// Why a balloon request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No `PUT /balloon` (or `--balloon`) made one.
    #[error("the microVM has no balloon device (configure one with PUT /balloon before start)")]
    NotConfigured,
    /// A target larger than guest memory.
    #[error("balloon amount_mib {amount} is more than the guest's {mem} MiB of memory")]
    TooLarge {
        /// The target asked for (MiB).
        amount: u32,
        /// Guest memory (MiB).
        mem: u64,
    },
    /// `free_page_hinting: true`.
    #[error("free page hinting is not supported by capsule (free_page_reporting is)")]
    Hinting,
    /// Statistics asked for before start.
    #[error("balloon statistics come from the guest: start the microVM first")]
    NotStarted,
    /// What the device refused.
    #[error(transparent)]
    Device(#[from] BalloonError),
}

type Result<T> = std::result::Result<T, VmmActionError>;

/// Checks a `PUT /balloon` against guest memory of `mem_mib`.
pub fn validate(b: &Balloon, mem_mib: u64) -> std::result::Result<(), Error> {
    if b.free_page_hinting {
        return Err(Error::Hinting);
    }
    if u64::from(b.amount_mib) > mem_mib {
        return Err(Error::TooLarge {
            amount: b.amount_mib,
            mem: mem_mib,
        });
    }
    Ok(())
}

/// Answers `GET`/`PATCH /balloon` and `/balloon/statistics` (`PUT
/// /balloon` is a plain configuration action). `vmm` is the running VM,
/// `None` before start.
pub fn handle(
    action: VmmAction,
    resources: &mut VmResources,
    vmm: Option<&mut Vmm>,
) -> Result<VmmData> {
    let device = vmm.and_then(|v| v.balloon().cloned());
    match (action, device) {
        (VmmAction::GetBalloon, Some(d)) => {
            let c = lock(&d).config();
            Ok(VmmData::Balloon(Balloon::from_device(c)))
        }
        (VmmAction::GetBalloon, None) => {
            let b = resources.balloon.ok_or(Error::NotConfigured)?;
            Ok(VmmData::Balloon(b))
        }
        (VmmAction::PatchBalloon(u), device) => {
            let mem = resources.machine.mem_size_mib;
            let b = resources.balloon.or_else(|| {
                let d = device.as_ref()?;
                Some(Balloon::from_device(lock(d).config()))
            });
            let b = b.ok_or(Error::NotConfigured)?;
            validate(
                &Balloon {
                    amount_mib: u.amount_mib,
                    ..b
                },
                mem,
            )?;
            if let Some(d) = device {
                lock(&d).set_target_mib(u.amount_mib);
            }
            resources.balloon = Some(Balloon {
                amount_mib: u.amount_mib,
                ..b
            });
            Ok(VmmData::Empty)
        }
        (VmmAction::GetBalloonStats, Some(d)) => stats(&lock(&d)),
        (VmmAction::GetBalloonStats, None) => match resources.balloon {
            Some(b) if b.stats_polling_interval_s == 0 => {
                Err(Error::Device(BalloonError::StatsDisabled).into())
            }
            Some(_) => Err(Error::NotStarted.into()),
            None => Err(Error::NotConfigured.into()),
        },
        (VmmAction::PatchBalloonStats(u), Some(d)) => {
            lock(&d)
                .set_stats_interval(u.stats_polling_interval_s)
                .map_err(Error::Device)?;
            if let Some(b) = &mut resources.balloon {
                b.stats_polling_interval_s = u.stats_polling_interval_s;
            }
            Ok(VmmData::Empty)
        }
        (VmmAction::PatchBalloonStats(u), None) => {
            let b = resources.balloon.as_mut().ok_or(Error::NotConfigured)?;
            b.stats_polling_interval_s = u.stats_polling_interval_s;
            Ok(VmmData::Empty)
        }
        _ => Err(VmmActionError::Unsupported("not a balloon request")),
    }
}

fn lock(d: &Arc<Mutex<dev::Balloon>>) -> std::sync::MutexGuard<'_, dev::Balloon> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

fn stats(d: &dev::Balloon) -> Result<VmmData> {
    let guest = d
        .stats()
        .ok_or(Error::Device(BalloonError::StatsDisabled))?;
    let pages_to_mib = |p: u32| p / u32::try_from(dev::PAGES_PER_MIB).unwrap_or(u32::MAX);
    Ok(VmmData::BalloonStats(BalloonStats {
        target_pages: d.target_pages(),
        actual_pages: d.actual_pages(),
        target_mib: pages_to_mib(d.target_pages()),
        actual_mib: pages_to_mib(d.actual_pages()),
        guest,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources() -> VmResources {
        VmResources::new("/nonexistent/kvm".into())
    }

    #[test]
    fn before_start_the_configuration_is_read_and_changed() {
        let mut r = resources();
        let get = |r: &mut VmResources| handle(VmmAction::GetBalloon, r, None);
        assert!(get(&mut r).unwrap_err().to_string().contains("no balloon"));
        let patch = VmmAction::PatchBalloon(BalloonUpdate { amount_mib: 16 });
        assert!(handle(patch.clone(), &mut r, None).is_err());
        let b: Balloon =
            serde_json::from_str(r#"{"amount_mib": 8, "deflate_on_oom": true}"#).unwrap();
        assert_eq!(
            (b.stats_polling_interval_s, b.free_page_reporting),
            (0, false)
        );
        r.balloon = Some(b);
        handle(patch, &mut r, None).unwrap();
        assert!(matches!(
            get(&mut r),
            Ok(VmmData::Balloon(Balloon { amount_mib: 16, .. }))
        ));
        // Default memory is 128 MiB.
        let big = VmmAction::PatchBalloon(BalloonUpdate { amount_mib: 129 });
        let e = handle(big, &mut r, None).unwrap_err().to_string();
        assert!(e.contains("more than the guest's 128 MiB"), "{e}");
        let e = handle(VmmAction::GetBalloonStats, &mut r, None).unwrap_err();
        assert!(e.to_string().contains("not enabled"), "{e}");
        let interval = BalloonStatsUpdate {
            stats_polling_interval_s: 2,
        };
        handle(VmmAction::PatchBalloonStats(interval), &mut r, None).unwrap();
        let e = handle(VmmAction::GetBalloonStats, &mut r, None).unwrap_err();
        assert!(e.to_string().contains("start the microVM"), "{e}");
        let hinting = Balloon {
            free_page_hinting: true,
            ..b
        };
        assert!(matches!(validate(&hinting, 128), Err(Error::Hinting)));
    }

    #[test]
    fn statistics_use_firecrackers_names() {
        let s = BalloonStats {
            target_pages: 512,
            actual_pages: 256,
            target_mib: 2,
            actual_mib: 1,
            guest: GuestStats {
                free_memory: Some(5),
                ..GuestStats::default()
            },
        };
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["target_pages"], 512);
        assert_eq!(v["free_memory"], 5);
        assert!(v.get("total_memory").is_none(), "absent tags are left out");
    }
}
