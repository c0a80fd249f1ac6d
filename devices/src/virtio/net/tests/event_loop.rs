//! virtio-net in a real event loop: frames both ways through the queue
//! eventfds and the backend's readiness, a kick for buffers posted while a
//! frame waits, and rate limits in both directions that hold frames until
//! they refill.

use super::*;

/// The event loop's subscriber for these tests.
type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A device on a stream backend (a socket pair: `peer` is the host side)
/// in an event loop, activated on fresh rings.
struct Rig<'a> {
    net: Arc<Mutex<Net>>,
    em: Loop,
    peer: UnixStream,
    rx: Rings<'a>,
    tx: Rings<'a>,
    tx_kick: EventFd,
    /// Kept so the receive queue's eventfd stays open.
    _rx_kick: EventFd,
}

impl<'a> Rig<'a> {
    /// Activated with `VERSION_1` and `features`, one loop round run.
    fn new(mem: &'a GuestMemoryMmap, features: u64) -> Self {
        Self::with_tx_ring(mem, features, |_| {})
    }

    /// Like [`Self::new`], with `fill` given the transmit ring before the
    /// activation (as a restored snapshot's ring may be).
    fn with_tx_ring(mem: &'a GuestMemoryMmap, features: u64, fill: impl FnOnce(&Rings)) -> Self {
        let (ours, peer) = UnixStream::pair().unwrap();
        let backend = StreamBackend::new(ours, "peer").unwrap();
        let net = Arc::new(Mutex::new(Net::new(Box::new(backend), MAC).unwrap()));
        let mut em = Loop::new().unwrap();
        em.add_subscriber(net.clone());
        let rx = Rings::new(mem, RX_RING, QSIZE);
        let tx = Rings::new(mem, TX_RING, QSIZE);
        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        fill(&tx);
        {
            let mut n = net.lock().unwrap();
            n.set_acked_features(bit(VIRTIO_F_VERSION_1) | features);
            n.activate(
                mem.clone(),
                Arc::new(RecordingInterrupt::default()),
                vec![rx.queue(), tx.queue()],
                vec![rx_kick.try_clone().unwrap(), tx_kick.try_clone().unwrap()],
            )
            .unwrap();
        }
        em.run_with_timeout(100).unwrap();
        Self {
            net,
            em,
            peer,
            rx,
            tx,
            tx_kick,
            _rx_kick: rx_kick,
        }
    }
}

/// End to end through the event loop: a stream backend on a socket pair,
/// activation, a frame each way.
#[test]
fn event_loop_moves_frames_both_ways() {
    let mem = guest_memory();
    let Rig {
        net,
        mut em,
        mut peer,
        rx,
        tx,
        tx_kick,
        ..
    } = Rig::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));

    // Host → guest.
    rx.store(0, BUFS, 2048, W, 0);
    rx.push_avail(0);
    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    peer.write_all(&(payload.len() as u32).to_be_bytes())
        .unwrap();
    peer.write_all(&payload).unwrap();
    for _ in 0..5 {
        em.run_with_timeout(100).unwrap();
        if rx.used_idx() == 1 {
            break;
        }
    }
    assert_eq!(rx.used_idx(), 1);
    let mut got = vec![0u8; VNET_HDR_LEN + 300];
    mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);

    // Guest → host.
    let f = frame(200, 4);
    mem.write_slice(&f, GuestAddress(BUFS + 0x1000)).unwrap();
    tx.store(0, BUFS + 0x1000, f.len() as u32, 0, 0);
    tx.push_avail(0);
    tx_kick.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    let body = recv_frame(&mut peer);
    assert_eq!(body.len(), 200);
    assert_eq!(&body[..], &f[VNET_HDR_LEN..]);

    // passt goes away: the link goes down, the loop keeps running. (The
    // hang-up comes when the last copy of `peer` closes: another test's
    // fork may hold one until its exec, so wait up to 10 s for it.)
    drop(peer);
    for _ in 0..100 {
        em.run_with_timeout(100).unwrap();
        if !net.lock().unwrap().link_up() {
            break;
        }
    }
    assert!(!net.lock().unwrap().link_up());
    em.run_with_timeout(10).unwrap();
}

/// With EVENT_IDX, a frame waiting for more buffers than are available must
/// leave the notification point past the chains already available, or the
/// guest never kicks again (it only refills after receiving).
#[test]
fn partial_buffers_still_get_a_kick_for_the_next_ones() {
    let mem = guest_memory();
    let mut d = Driver::new(
        &mem,
        bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX),
    );
    d.incoming(frame(6000, 1));
    d.post_rx(2048);
    d.post_rx(2048);
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 0);
    let avail_event: u16 = mem
        .read_obj(GuestAddress(d.rx.used + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, d.rx.avail_idx(), "guest would not kick");
    d.post_rx(2048);
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 3);
}

/// Waits (up to 2 s) for a limiter's timer; true if it fired.
fn limiter_fired(l: &crate::rate_limiter::RateLimiter) -> bool {
    crate::test_fd::readable_within(l.timer_fd(), 2000)
}

/// The next frame the device sent on the stream backend (its length
/// prefix read, then that many bytes).
fn recv_frame(peer: &mut UnixStream) -> Vec<u8> {
    let mut hdr = [0u8; 4];
    peer.read_exact(&mut hdr).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(hdr) as usize];
    peer.read_exact(&mut body).unwrap();
    body
}

/// Runs the loop (up to 20 rounds of 50 ms) until `ring`'s used index is
/// `idx`.
fn run_until_used(em: &mut Loop, ring: &Rings, idx: u16) {
    for _ in 0..20 {
        if ring.used_idx() == idx {
            break;
        }
        em.run_with_timeout(50).unwrap();
    }
}

#[test]
fn rate_limited_frames_wait_for_the_refill_in_both_directions() {
    use crate::rate_limiter::{BucketConfig, RateLimiter};
    let mem = guest_memory();
    let mut d = Driver::new(&mem, bit(VIRTIO_NET_F_MRG_RXBUF));
    // 1000 bytes per 50 ms each way.
    let limiter = || {
        let bw = BucketConfig {
            size: 1000,
            one_time_burst: 0,
            refill_time_ms: 50,
        };
        Some(RateLimiter::new(Some(bw), None).unwrap())
    };
    d.net.set_rate_limiters(limiter(), limiter());
    // Transmit: the first 600-byte frame fits the full bucket; the second
    // stays in the ring until the limiter's timer fires.
    let (f1, f2) = (frame(600, 1), frame(600, 2));
    d.send(&f1, 700);
    d.send(&f2, 700);
    d.net.process_tx();
    assert_eq!(d.sent(), vec![f1]);
    assert_eq!(d.tx.used_idx(), 1);
    d.net.process_tx(); // a kick meanwhile changes nothing
    assert_eq!(d.tx.used_idx(), 1);
    assert!(limiter_fired(d.net.tx_limiter.as_ref().unwrap()));
    d.net.tx_limiter.as_mut().unwrap().timer_fired();
    d.net.process_tx();
    assert_eq!(d.sent(), vec![f2]);
    assert_eq!(d.tx.used_idx(), 2);
    // Receive: the same, and the backend is not read while a frame waits.
    let (r1, r2) = (frame(600, 3), frame(600, 4));
    d.incoming(r1);
    d.incoming(r2);
    d.post_rx(2048);
    d.post_rx(2048);
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 1);
    assert_eq!(d.net.wanted_backend_events(), EventSet::empty());
    assert!(limiter_fired(d.net.rx_limiter.as_ref().unwrap()));
    d.net.rx_limiter.as_mut().unwrap().timer_fired();
    d.net.process_rx();
    assert_eq!(d.rx.used_idx(), 2);
}

/// Transmit batching: a kick right after a transmit run waits for the
/// window's timer, and the frame still goes out and comes back used; a
/// small frame's kick (an acknowledgement) is served at once.
#[test]
fn event_loop_holds_a_streaming_kick_for_the_window_then_sends() {
    let mem = guest_memory();
    let Rig {
        net,
        mut em,
        mut peer,
        tx,
        tx_kick,
        ..
    } = Rig::new(&mem, bit(VIRTIO_RING_F_EVENT_IDX));

    // send(i, len): frame i of len bytes into the ring and a kick; what
    // arrives is checked. Returns the kicks held so far.
    let send = |i: u16, len: usize, em: &mut Loop, peer: &mut UnixStream| {
        let f = frame(len + usize::from(i), i as u8);
        let at = BUFS + 0x1000 * u64::from(i);
        mem.write_slice(&f, GuestAddress(at)).unwrap();
        tx.store(i, at, f.len() as u32, 0, 0);
        tx.push_avail(i);
        tx_kick.write(1).unwrap();
        // Only what is ready now: a held kick leaves the frame in the ring.
        em.run_with_timeout(0).unwrap();
        let held = net.lock().unwrap().stats().tx_batched;
        run_until_used(em, &tx, i + 1);
        assert_eq!(tx.used_idx(), i + 1, "frame {i} was returned");
        let body = recv_frame(peer);
        assert_eq!(&body[..], &f[VNET_HDR_LEN..], "frame {i} arrived whole");
        held
    };
    assert_eq!(
        send(0, 1000, &mut em, &mut peer),
        0,
        "the first kick is served at once"
    );
    // A small frame right after a run: served at once.
    assert_eq!(
        send(1, 60, &mut em, &mut peer),
        0,
        "a small frame is not held"
    );
    // Kicks right after a run are held (three tries, in case a loaded
    // machine left more than BUSY_GAP between two of them).
    let held = (2..5)
        .map(|i| send(i, 1000, &mut em, &mut peer))
        .max()
        .unwrap();
    assert!(held >= 1, "no kick right after a run was held");
}

/// A hostile chain while the guest streams (a descriptor that links to
/// itself, with a length claiming a large frame): the batching peek walks
/// a bounded chain, and the chain comes back unsent after the window.
#[test]
fn event_loop_returns_a_looping_chain_kicked_while_streaming() {
    let mem = guest_memory();
    let Rig {
        net,
        mut em,
        mut peer,
        tx,
        tx_kick,
        ..
    } = Rig::new(&mem, bit(VIRTIO_RING_F_EVENT_IDX));
    let f = frame(1000, 1);
    mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    tx.store(0, BUFS, f.len() as u32, 0, 0);
    tx.push_avail(0);
    tx_kick.write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(tx.used_idx(), 1);
    recv_frame(&mut peer);

    tx.store(1, BUFS, 4096, N, 1);
    tx.push_avail(1);
    tx_kick.write(1).unwrap();
    run_until_used(&mut em, &tx, 2);
    assert_eq!(tx.used_idx(), 2, "the looping chain was returned");
    assert_eq!(net.lock().unwrap().stats().tx_dropped, 1, "and not sent");
}

/// A snapshot taken while a transmit kick was held (or not yet read)
/// restores a ring with frames and no kick coming: the activation itself
/// sends them.
#[test]
fn event_loop_sends_frames_in_the_ring_at_activation() {
    let mem = guest_memory();
    let f = frame(1000, 7);
    mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let Rig { mut peer, tx, .. } = Rig::with_tx_ring(&mem, bit(VIRTIO_RING_F_EVENT_IDX), |tx| {
        tx.store(0, BUFS, f.len() as u32, 0, 0);
        tx.push_avail(0);
    });
    assert_eq!(tx.used_idx(), 1, "returned without a kick");
    let body = recv_frame(&mut peer);
    assert_eq!(&body[..], &f[VNET_HDR_LEN..], "and sent whole");
}
