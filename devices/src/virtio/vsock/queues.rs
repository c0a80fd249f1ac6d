//! The device's receive and transmit queues: draining the transmit queue
//! into the connections and filling receive buffers with what they owe
//! the guest, with `EVENT_IDX` notification suppression.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};

use super::conn::Payload;
use super::packet::{read_tx_packet, Header, RxChain, TxPayload};
use super::{Vsock, PACKET_BUDGET, RX_QUEUE, TX_QUEUE};
use crate::virtio::device::avail_ring_broken;
use crate::virtio::Queue;
use crate::GuestMemoryMmap;

impl Vsock {
    /// Drains the transmit queue: with the driver's notifications off
    /// while it does, and on again (checking for chains that came
    /// meanwhile) when the ring is empty.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut payload = std::mem::take(&mut self.tx_payload);
        let mut handled = 0;
        while handled < PACKET_BUDGET {
            let Some(active) = self.common.activation_mut() else {
                break;
            };
            if let Err(e) = active.queues[TX_QUEUE].disable_notification(&mem) {
                crate::warn_ratelimited!("virtio-vsock: cannot disable notifications: {e}");
            }
            if !self.drain_tx(&mem, &mut payload, &mut handled)
                || handled >= PACKET_BUDGET
                || !self.enable_tx_notifications(&mem)
            {
                break;
            }
        }
        self.tx_payload = payload;
        self.finish_tx(handled);
    }

    /// Pops and handles transmit chains until the ring is empty or
    /// `handled` reaches the budget; false if the device stopped being
    /// active meanwhile.
    fn drain_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        payload: &mut TxPayload,
        handled: &mut usize,
    ) -> bool {
        while *handled < PACKET_BUDGET {
            let Some(active) = self.common.activation_mut() else {
                return false;
            };
            let Some(chain) = active.queues[TX_QUEUE].pop_descriptor_chain(mem) else {
                break;
            };
            *handled += 1;
            self.handle_tx_chain(mem, chain, payload);
        }
        true
    }

    /// Hands the packet in `chain` to its connection (`payload` is the
    /// reused buffer that collects its data) and returns the chain.
    #[inline]
    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        payload: &mut TxPayload,
    ) {
        let head = chain.head_index();
        match read_tx_packet(mem, chain, payload) {
            Ok(hdr) => self.handle_packet(&hdr, Payload { mem, data: payload }),
            Err(why) => {
                crate::warn_ratelimited!("virtio-vsock: dropped a transmit packet: {why}")
            }
        }
        // Returned once its payload was taken.
        if let Some(active) = self.common.activation_mut() {
            if let Err(e) = active.queues[TX_QUEUE].add_used(mem, head, 0) {
                crate::warn_ratelimited!("virtio-vsock: cannot return transmit buffer {head}: {e}");
            }
        }
    }

    /// Turns the driver's transmit notifications back on once the ring is
    /// empty; true if chains came meanwhile (drain again).
    fn enable_tx_notifications(&mut self, mem: &GuestMemoryMmap) -> bool {
        let Some(active) = self.common.activation_mut() else {
            return false;
        };
        let q = &mut active.queues[TX_QUEUE];
        let next_avail = q.next_avail();
        match q.enable_notification(mem) {
            Ok(true) if avail_ring_broken(q, mem, next_avail) => {
                crate::warn_ratelimited!(
                    "virtio-vsock: the driver's transmit ring is out of range; queue stalled"
                );
                false
            }
            Ok(true) => true,
            Ok(false) => false,
            Err(e) => {
                crate::warn_ratelimited!("virtio-vsock: cannot enable notifications: {e}");
                false
            }
        }
    }

    /// Counts the `handled` chains, interrupts the driver for them, and
    /// with the budget spent kicks the queue to come back for the rest.
    fn finish_tx(&mut self, handled: usize) {
        if handled > 0 {
            self.tx_rounds += 1;
            self.tx_packets += handled as u64;
            if let Some(active) = self.common.activation_mut() {
                active.signal_used_queue(TX_QUEUE);
            }
        }
        if handled >= PACKET_BUDGET {
            self.common.kick(TX_QUEUE);
        }
    }

    /// The next packet for the guest, written into `rx` (the payload, if
    /// any, already is when this returns).
    fn next_rx_packet(&mut self, mem: &GuestMemoryMmap, rx: &RxChain) -> Option<Header> {
        if let Some(h) = self.strays.pop_front() {
            return Some(h);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.queued = false;
            if !c.has_rx_work() {
                continue;
            }
            let (packet, verdict) = c.next_rx(mem, rx);
            self.apply(key, verdict);
            if let Some(c) = self.conns.get_mut(&key) {
                if c.has_rx_work() {
                    self.queue_rx(key);
                }
            }
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Whether a packet may be owed to the guest.
    fn rx_pending(&self) -> bool {
        !(self.strays.is_empty() && self.rx_ready.is_empty())
    }

    /// Fills receive buffers with what is owed to the guest. Out of
    /// buffers with packets still owed, asks the driver to kick when it
    /// adds some (EVENT_IDX), and goes on if it already did.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.common.activation_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut sent = 0;
        while sent < PACKET_BUDGET && self.rx_pending() {
            let Some(active) = self.common.activation_mut() else {
                return;
            };
            let q = &mut active.queues[RX_QUEUE];
            let next_avail = q.next_avail();
            let chain = match q.pop_descriptor_chain(&mem) {
                Some(chain) => chain,
                None => match q.enable_notification(&mem) {
                    Ok(true) if avail_ring_broken(q, &mem, next_avail) => {
                        crate::warn_ratelimited!("virtio-vsock: the driver's receive ring is out of range; queue stalled");
                        break;
                    }
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        crate::warn_ratelimited!("virtio-vsock: cannot enable notifications: {e}");
                        break;
                    }
                },
            };
            let head = chain.head_index();
            let segments = std::mem::take(&mut self.rx_segments);
            let rx = match RxChain::new(&mem, chain, segments) {
                Ok(rx) => rx,
                Err((why, segments)) => {
                    self.rx_segments = segments;
                    crate::warn_ratelimited!("virtio-vsock: unusable receive buffer: {why}");
                    return_used(&mut active.queues[RX_QUEUE], &mem, head, 0);
                    sent += 1;
                    continue;
                }
            };
            let packet = self.next_rx_packet(&mem, &rx);
            let len = packet.map(|hdr| {
                rx.write_header(&mem, &hdr).unwrap_or_else(|why| {
                    crate::warn_ratelimited!("virtio-vsock: receive buffer: {why}");
                    0
                })
            });
            self.rx_segments = rx.into_segments();
            let Some(active) = self.common.activation_mut() else {
                return;
            };
            let Some(len) = len else {
                active.queues[RX_QUEUE].go_to_previous_position();
                break;
            };
            return_used(&mut active.queues[RX_QUEUE], &mem, head, len);
            sent += 1;
        }
        if sent > 0 {
            self.rx_packets += sent as u64;
            if let Some(active) = self.common.activation_mut() {
                active.signal_used_queue(RX_QUEUE);
            }
        }
        if sent >= PACKET_BUDGET {
            self.common.kick(RX_QUEUE);
        }
    }
}

fn return_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = q.add_used(mem, head, len) {
        crate::warn_ratelimited!("virtio-vsock: cannot return receive buffer {head}: {e}");
    }
}
