//! The one home of everything the kernel programs and the agent exchange: map value layouts,
//! ring-buffer event layouts, load-time configuration and shared constants.
//!
//! Every type here is `#[repr(C)]` and plain data so both sides agree on the bytes. Field
//! offsets of kernel structures are *not* here: they are discovered at load time and passed in
//! [`ProbeOffsets`], because they differ between kernels.
#![no_std]

#[macro_use]
mod abi;
mod capture;
pub mod framing;
mod maps;
mod offsets;
mod records;

pub use abi::*;
pub use capture::*;
pub use maps::*;
pub use offsets::*;
pub use records::*;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C) plain data with no pointers and no invalid bit patterns.
    unsafe impl aya::Pod for ProbeOffsets {}
    unsafe impl aya::Pod for TupleLayout {}
    unsafe impl aya::Pod for PayloadHeader {}
    unsafe impl aya::Pod for framing::SocketFrames {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for SampledCalls {}
    unsafe impl aya::Pod for SockEvent {}
}
