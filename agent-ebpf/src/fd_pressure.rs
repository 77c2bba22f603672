//! Descriptor exhaustion: syscalls failing with EMFILE/ENFILE (one raw `sys_exit` program,
//! with per-syscall classic tracepoints as the fallback), attached only under fd pressure.

use crate::maps::offsets;
use crate::ring::emit;
use crate::sock::{read_kernel_field, read_tp};
use agent_common::{FdSyscall, SockEventKind};
use aya_ebpf::{
    macros::raw_tracepoint, macros::tracepoint, programs::RawTracePointContext,
    programs::TracePointContext,
};

const EMFILE: i64 = 24;
const ENFILE: i64 = 23;

#[inline(always)]
fn fd_exit(ctx: &TracePointContext, syscall: FdSyscall) -> u32 {
    let Some(ret) = read_tp::<i64>(ctx, offsets().sys_exit_ret) else {
        return 0;
    };
    if ret == -EMFILE || ret == -ENFILE {
        emit(|event| {
            event.kind = SockEventKind::FdExhausted as u8;
            event.fd_syscall = syscall as u8;
            event.ret = ret;
        });
    }
    0
}

/// The EMFILE/ENFILE probes through one bpf() link: the raw `sys_exit` tracepoint, `(struct
/// pt_regs *regs, long ret)`. Per-syscall exit events are no raw tracepoints, so this fires for
/// every syscall exit while attached; it is attached only under descriptor pressure (see the
/// agent's fd arming) and leaves at the first compare for every return but -EMFILE/-ENFILE.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit_fd(ctx: RawTracePointContext) -> u32 {
    let ret = ctx.arg::<u64>(1) as i64;
    if ret != -EMFILE && ret != -ENFILE {
        return 0;
    }
    let layout = &offsets().fd_syscalls;
    let Some(number) = read_kernel_field::<u64>(ctx.arg::<u64>(0), layout.number) else {
        return 0;
    };
    if let Some(syscall) = (0..FdSyscall::COUNT).find(|&index| layout.numbers[index] == number) {
        emit(|event| {
            event.kind = SockEventKind::FdExhausted as u8;
            event.fd_syscall = syscall as u8;
            event.ret = ret;
        });
    }
    0
}

#[tracepoint]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Socket)
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Accept)
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Accept4)
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Open)
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Openat)
}

#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    fd_exit(&ctx, FdSyscall::Dup)
}
