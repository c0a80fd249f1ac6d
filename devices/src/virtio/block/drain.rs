//! Draining the request queue on the event-loop thread within one
//! event's budgets (see the parent module): passes over the available
//! ring with the driver's notifications off, each request popped,
//! rate-limited, then served (or submitted to the io_uring) and
//! completed; then the interrupt, and a kick of the queue when work is
//! left.

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;
use virtio_queue::{QueueOwnedT, QueueT};

use super::{request, uring, Block, CacheMode, REQUEST_BUDGET, REQUEST_QUEUE};
use crate::rate_limiter::RateLimiter;
use crate::virtio::device::avail_ring_broken;
use crate::virtio::features::bit;
use crate::GuestMemoryMmap;

impl Block {
    /// Drains the request queue; runs on the event-loop thread.
    pub(super) fn process_queue(&mut self) {
        let Self {
            common,
            disk,
            capacity,
            id,
            buf,
            byte_budget,
            resume,
            limiter,
            cache,
            uring,
            ..
        } = self;
        let zeroes = common.avail_features() & bit(VIRTIO_BLK_F_WRITE_ZEROES) != 0;
        let Some(active) = common.activation_mut() else {
            return;
        };
        let mut drain = Drain {
            queue: &mut active.queues[REQUEST_QUEUE],
            mem: &active.mem,
            ctx: request::Context {
                disk: disk.as_mut(),
                capacity: *capacity,
                id,
                zeroes,
                sync_on_flush: *cache == CacheMode::Writeback,
                buf,
                bytes: 0,
                budget: *byte_budget,
                resume: None,
            },
            resume,
            limiter: limiter.as_mut(),
            uring: uring.as_deref_mut(),
            handled: 0,
            answered: 0,
            empty_pass: false,
        };
        let more = drain.run();
        let answered = drain.submit_uring();
        if answered > 0 {
            active.signal_used_queue(REQUEST_QUEUE);
        }
        if more {
            common.kick(REQUEST_QUEUE);
        }
    }
}

/// One queue event's walk of the request queue: the parts of the device
/// it needs, borrowed apart, and what it did so far.
struct Drain<'a> {
    queue: &'a mut virtio_queue::Queue,
    mem: &'a GuestMemoryMmap,
    /// The requests' view of the device; its `budget` is the byte budget.
    ctx: request::Context<'a>,
    /// The device's suspended request, for [`serve_next`].
    resume: &'a mut Option<(u16, request::Progress)>,
    limiter: Option<&'a mut RateLimiter>,
    uring: Option<&'a mut uring::Uring>,
    /// Requests popped and served or submitted.
    handled: usize,
    /// Requests that went to the used ring.
    answered: usize,
    /// The last pass found no request, yet the ring said more.
    empty_pass: bool,
}

/// Why [`Drain::serve_pass`] stopped.
enum PassEnd {
    /// The ring is empty.
    Empty,
    /// The request or byte budget is spent.
    Budget,
    /// The next request waits for the rate limiter or for io_uring room.
    Limited,
    /// A request stopped on the byte budget.
    Suspended,
}

impl Drain<'_> {
    /// Serves passes over the ring until it is empty with the driver's
    /// notifications back on, a budget is spent or the next request must
    /// wait; true if work is left that the device comes back to by
    /// kicking its own queue.
    fn run(&mut self) -> bool {
        loop {
            if let Err(e) = self.queue.disable_notification(self.mem) {
                crate::warn_ratelimited!("virtio-blk: cannot disable notifications: {e}");
                return false;
            }
            let before = self.handled;
            let next_avail = self.queue.next_avail();
            match self.serve_pass() {
                PassEnd::Empty => {}
                PassEnd::Limited => return false,
                // Yield; the kick brings the loop back to the rest
                // without waiting for the guest's next notification.
                PassEnd::Budget | PassEnd::Suspended => return true,
            }
            if !self.enable_notifications(before, next_avail) {
                return false;
            }
        }
    }

    /// Serves requests until the ring is empty, a budget is spent or the
    /// next request must wait.
    fn serve_pass(&mut self) -> PassEnd {
        // `ctx.budget` is the device's byte budget between requests
        // (a request only raises it while it runs).
        while self.handled < REQUEST_BUDGET && self.ctx.bytes < self.ctx.budget {
            let step = serve_next(
                self.queue,
                self.mem,
                &mut self.ctx,
                self.resume,
                self.limiter.as_deref_mut(),
                self.uring.as_deref_mut(),
            );
            match step {
                Step::Served => {
                    self.handled += 1;
                    self.answered += 1;
                }
                Step::Submitted => self.handled += 1,
                Step::Empty => return PassEnd::Empty,
                Step::Limited => return PassEnd::Limited,
                Step::Suspended => return PassEnd::Suspended,
            }
        }
        PassEnd::Budget
    }

    /// Turns the driver's notifications back on after a pass that emptied
    /// the ring (`before` requests handled and the ring at `next_avail`
    /// when it began); true if requests came meanwhile: another pass.
    fn enable_notifications(&mut self, before: usize, next_avail: u16) -> bool {
        match self.queue.enable_notification(self.mem) {
            // New requests arrived; go again unless the ring is broken
            // (an available index more than a ring ahead: nothing can
            // be popped). A pass that found nothing is not proof of
            // that: the driver may have published between its last
            // pop and this check, and it sends no notification for
            // such a request when the event index it read was older
            // (after a pass that stopped on the budget), so stopping
            // here would leave that request unserved for good. A
            // second pass in a row without a request is.
            Ok(true)
                if self.handled == before
                    && (self.empty_pass || avail_ring_broken(self.queue, self.mem, next_avail)) =>
            {
                crate::warn_ratelimited!(
                    "virtio-blk: available ring is inconsistent; queue stalled"
                );
                false
            }
            Ok(true) => {
                self.empty_pass = self.handled == before;
                true
            }
            Ok(false) => false,
            Err(e) => {
                crate::warn_ratelimited!("virtio-blk: cannot enable notifications: {e}");
                false
            }
        }
    }

    /// Submits what went to the io_uring and answers those requests that
    /// already completed; the number of requests answered this event.
    fn submit_uring(self) -> usize {
        let mut answered = self.answered;
        if let Some(u) = self.uring {
            u.submit();
            // Reads and writes the page cache can serve complete inside
            // the submission: answer them now, under this round's
            // interrupt, instead of after a wake-up on the completion
            // eventfd and another event-loop round.
            if u.reap_after_submit {
                answered += u.reap(Some(self.queue));
            }
        }
        answered
    }
}

/// What [`serve_next`] did.
enum Step {
    /// A request completed and went to the used ring.
    Served,
    /// A request went to the io_uring; its completion answers it.
    Submitted,
    /// No request available.
    Empty,
    /// The rate limiter refused the next request (left in the ring), or
    /// the io_uring has no room for one (a completion continues).
    Limited,
    /// A request stopped on the byte budget (left in the ring, its
    /// progress in `resume`).
    Suspended,
}

/// Pops the next request and serves it (as far as the byte budget goes).
/// `resume` is the progress of the request an earlier event stopped in:
/// the first one popped now, whose bytes the limiter already counted.
/// With `uring`, reads, writes and flushes are submitted there instead.
fn serve_next(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    ctx: &mut request::Context<'_>,
    resume: &mut Option<(u16, request::Progress)>,
    limiter: Option<&mut RateLimiter>,
    uring: Option<&mut uring::Uring>,
) -> Step {
    if uring.as_ref().is_some_and(|u| !u.has_room()) {
        return Step::Limited;
    }
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return Step::Empty;
    };
    let head = chain.head_index();
    ctx.resume = resume.take().filter(|r| r.0 == head).map(|r| r.1);
    if let Some(l) = limiter.filter(|_| ctx.resume.is_none()) {
        if !l.consume(request::data_len_of(chain.clone())) {
            // Back in the ring until the limiter's timer fires.
            queue.go_to_previous_position();
            crate::metrics::BLOCK.rate_limiter_throttled_events.inc();
            return Step::Limited;
        }
    }
    let outcome = match uring {
        Some(u) => match u.start(ctx, mem, chain) {
            Some(len) => request::Outcome::Done(len),
            None => return Step::Submitted,
        },
        None => request::process(ctx, mem, chain),
    };
    match outcome {
        request::Outcome::Done(len) => {
            if let Err(e) = queue.add_used(mem, head, len) {
                crate::warn_ratelimited!("virtio-blk: cannot return descriptor {head}: {e}");
            }
            Step::Served
        }
        request::Outcome::Suspended(progress) => {
            // Back in the ring, continued by the next event.
            queue.go_to_previous_position();
            *resume = Some((head, progress));
            Step::Suspended
        }
    }
}
