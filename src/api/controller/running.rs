//! Actions on the started VM: Ctrl-Alt-Del, the devices' PATCHes, pause and resume.

use super::{Controller, Result, State};
use crate::api::action::{VmmActionError, VmmData};
use crate::api::types::{PartialDrive, PartialNetworkInterface, VmState};
use crate::vmm::Vmm;

impl Controller {
    pub(super) fn ctrl_alt_del(&self, vmm: Option<&mut Vmm>) -> Result<VmmData> {
        let Some(vmm) = vmm.filter(|_| self.state != State::NotStarted) else {
            return Err(VmmActionError::NotStarted(
                "SendCtrlAltDel needs a started microVM",
            ));
        };
        if self.state == State::Paused {
            return Err(VmmActionError::Unsupported(
                "the microVM is paused: resume it before SendCtrlAltDel",
            ));
        }
        if !vmm.send_ctrl_alt_del() {
            return Err(VmmActionError::Unsupported(
                "the guest is not reading its keyboard (i8042 buffer full)",
            ));
        }
        Ok(VmmData::Empty)
    }

    /// `PATCH /drives/{id}` on the running VM: a new image (the guest
    /// sees a media change) and/or new limits.
    pub(super) fn patch_drive(
        &mut self,
        vmm: Option<&mut Vmm>,
        p: PartialDrive,
    ) -> Result<VmmData> {
        let Some(vmm) = vmm.filter(|_| self.state != State::NotStarted) else {
            return Err(VmmActionError::NotBeforeStart);
        };
        let no_such = || VmmActionError::NoSuchDevice {
            what: "drive",
            id: p.drive_id.clone(),
        };
        let index = self
            .resources
            .drive_index(&p.drive_id)
            .ok_or_else(no_such)?;
        let image = p.path_on_host.as_deref().map(std::path::Path::new);
        let limits = p.rate_limiter.map(|r| r.limits());
        vmm.change_disk(index, image, limits)
            .ok_or_else(no_such)?
            .map_err(|source| VmmActionError::DriveSwap {
                id: p.drive_id.clone(),
                source,
            })?;
        if let Some(path) = &p.path_on_host {
            log::info!("drive {}: now {path}", p.drive_id);
        }
        self.resources.patched_drive(&p);
        Ok(VmmData::Empty)
    }

    /// `PATCH /network-interfaces/{id}` on the running VM: new limits.
    pub(super) fn patch_net(
        &mut self,
        vmm: Option<&mut Vmm>,
        p: PartialNetworkInterface,
    ) -> Result<VmmData> {
        let Some(vmm) = vmm.filter(|_| self.state != State::NotStarted) else {
            return Err(VmmActionError::NotBeforeStart);
        };
        let no_such = || VmmActionError::NoSuchDevice {
            what: "network interface",
            id: p.iface_id.clone(),
        };
        let index = self.resources.net_index(&p.iface_id).ok_or_else(no_such)?;
        let (rx, tx) = (p.rx_rate_limiter, p.tx_rate_limiter);
        if !vmm.change_net(index, rx.map(|r| r.limits()), tx.map(|r| r.limits())) {
            return Err(no_such());
        }
        self.resources.patched_net(&p);
        Ok(VmmData::Empty)
    }

    pub(super) fn pause_or_resume(
        &mut self,
        vmm: Option<&mut Vmm>,
        want: VmState,
    ) -> Result<VmmData> {
        let Some(vmm) = vmm else {
            return Err(VmmActionError::NotStarted(
                "the microVM is not started: cannot pause or resume it",
            ));
        };
        match want {
            VmState::Paused => {
                vmm.pause()?;
                self.state = State::Paused;
            }
            VmState::Resumed => {
                vmm.resume()?;
                self.state = State::Running;
            }
        }
        Ok(VmmData::Empty)
    }
}
