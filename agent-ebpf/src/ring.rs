//! Records to the rings: the event emitter and the wake-up policy shared with payload records.

use crate::maps::{bump, EVENTS, EVENTS_WAKEUP_BYTES};
use agent_common::{KernelCounter, SockEvent};
use aya_ebpf::{
    bindings::BPF_RB_AVAIL_DATA, bindings::BPF_RB_FORCE_WAKEUP, bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_current_comm, helpers::bpf_get_current_pid_tgid, helpers::bpf_ktime_get_ns,
};

/// Ring space a record of `len` bytes takes: an 8-byte header, rounded up to 8.
const fn ring_footprint(len: u64) -> u64 {
    (len + 8 + 7) & !7
}

/// Submit flags for a record of `len` bytes when `unread_before` bytes were waiting: wake the
/// reader only when this record takes the unread data across `threshold`. Crossing, not
/// "above": a reader that is already behind is busy reading, and forcing a wake-up (an
/// irq_work, a self-IPI under virtualisation) for every further record would cost the most
/// exactly when the machine is saturated. A crossing the reader misses is caught by its timer.
#[inline(always)]
pub(crate) fn wakeup_flags(unread_before: u64, len: u64, threshold: u64) -> u64 {
    if unread_before < threshold && unread_before + ring_footprint(len) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub(crate) fn emit(fill: impl FnOnce(&mut SockEvent)) {
    emit_with(false, fill)
}

/// [`emit`], waking the reader at once when `urgent` (rare events only: each wake-up costs).
#[inline(always)]
pub(crate) fn emit_with(urgent: bool, fill: impl FnOnce(&mut SockEvent)) {
    match EVENTS.reserve::<SockEvent>(0) {
        Some(mut entry) => {
            let event = entry.as_mut_ptr();
            // SAFETY: the reservation is sizeof(SockEvent) bytes; zero it first so no stale
            // kernel memory reaches user space.
            unsafe {
                core::ptr::write_bytes(event, 0, 1);
                let event = &mut *event;
                event.ts_ns = bpf_ktime_get_ns();
                event.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
                if let Ok(comm) = bpf_get_current_comm() {
                    event.comm = comm;
                }
                fill(event);
            }
            let threshold = unsafe { core::ptr::read_volatile(&EVENTS_WAKEUP_BYTES) };
            let len = core::mem::size_of::<SockEvent>() as u64;
            // The reservation already counts as unread.
            let unread = EVENTS
                .query(BPF_RB_AVAIL_DATA as u64)
                .saturating_sub(ring_footprint(len));
            let flags = if urgent {
                BPF_RB_FORCE_WAKEUP as u64
            } else {
                wakeup_flags(unread, len, threshold)
            };
            entry.submit(flags);
        }
        None => bump(KernelCounter::RingbufFull),
    }
}
