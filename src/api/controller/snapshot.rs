//! Snapshots: `PUT /snapshot/create`, `PUT /snapshot/load` and `run --restore`.

use super::{Controller, Result, State};
use crate::api::action::{VmmActionError, VmmData};
use crate::builder::Console;
use crate::vmm::Vmm;

impl Controller {
    /// `PUT /snapshot/create`: only on a paused VM (Firecracker's rule: the
    /// state must not move while it is written).
    pub(super) fn create_snapshot(
        &mut self,
        vmm: Option<&mut Vmm>,
        p: &crate::api::snapshot::SnapshotCreateParams,
    ) -> Result<VmmData> {
        let Some(vmm) = vmm.filter(|_| self.state == State::Paused) else {
            return Err(VmmActionError::NotStarted(
                "the microVM must be paused to create a snapshot (PATCH /vm Paused)",
            ));
        };
        crate::api::snapshot::create(vmm, p, &self.resources.device_ids())
    }

    /// `PUT /snapshot/load`: a new VM from a snapshot, only before any
    /// other configuration of the VM (its shape comes from the snapshot).
    pub(super) fn load_snapshot(
        &mut self,
        p: &crate::api::snapshot::SnapshotLoadParams,
    ) -> Result<VmmData> {
        self.pre_boot()?;
        if self.configured {
            return Err(VmmActionError::Unsupported(
                "a snapshot can only be loaded before any other configuration",
            ));
        }
        let mut cfg = crate::api::snapshot::restore_config(p, self.resources.kvm_path())?;
        cfg.mmds = self.resources.mmds.clone();
        let Some(console) = self.take_console()? else {
            return Err(VmmActionError::NoConsole);
        };
        match crate::api::snapshot::load(&cfg, console) {
            Ok(restored) => {
                self.restored(restored, cfg.resume);
                log::info!("microVM restored from {}", cfg.snapshot_path.display());
                Ok(VmmData::Empty)
            }
            Err(e) => {
                self.console = Some(Console::stdio());
                Err(e)
            }
        }
    }

    /// Restores a VM from a snapshot at once (`capsule run --restore`),
    /// with the command line's overrides.
    pub fn restore_direct(&mut self, cfg: &crate::snapshot::restore::RestoreConfig) -> Result<()> {
        let Some(console) = self.take_console()? else {
            return Err(VmmActionError::NoConsole);
        };
        let restored = crate::api::snapshot::load(cfg, console)?;
        self.restored(restored, cfg.resume);
        Ok(())
    }

    /// Takes the VM restored from a snapshot, running if `resume`, with
    /// the configuration of the VM saved (its devices under the names
    /// the snapshot gives them).
    pub(super) fn restored(&mut self, restored: crate::snapshot::restore::Restored, resume: bool) {
        let (vmm, ids) = (&restored.vmm, &restored.ids);
        let (config, boot) = (&vmm.persist.config, vmm.persist.boot.as_ref());
        self.resources
            .set_restored(ids, config, boot, vmm.dirty.is_some());
        self.started = Some(restored.vmm);
        self.state = if resume {
            State::Running
        } else {
            State::Paused
        };
    }
}
