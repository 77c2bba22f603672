//! An empty BPF program on the agent's tracepoints, measured beside it: the floor of what
//! `bpf_stats` reports per program run on this machine (its two clock reads, the dispatch, and
//! whatever interrupts and cold caches add to any program at that point).
//!
//! Without it a per-run figure cannot be split into "what our program does" and "what any
//! program costs here": on this VM an empty program already reads 55-110 ns per run, and after
//! the kernel has copied a 500 KB value it reads several hundred.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::Context as _;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// `r0 = 0; exit`.
const EMPTY: [u64; 2] = [
    u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]),
    u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
];

/// Empty raw tracepoint programs, attached while this lives.
pub struct EmptyPrograms {
    /// Program and link fds: closing them detaches and unloads.
    _fds: Vec<OwnedFd>,
    /// Program ids, for `observe::program_stats`.
    pub ids: Vec<u32>,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}

fn put<const N: usize>(attr: &mut [u8; 128], at: usize, bytes: [u8; N]) {
    attr[at..at + N].copy_from_slice(&bytes);
}

impl EmptyPrograms {
    /// Loads one empty program per raw tracepoint name and attaches it.
    pub fn attach(tracepoints: &[&str]) -> anyhow::Result<Self> {
        let mut fds = Vec::new();
        let mut ids = Vec::new();
        let license = c"GPL";
        for tracepoint in tracepoints {
            let name = std::ffi::CString::new(*tracepoint)?;
            let mut attr = [0u8; 128];
            put(&mut attr, 0, BPF_PROG_TYPE_RAW_TRACEPOINT.to_ne_bytes());
            put(&mut attr, 4, (EMPTY.len() as u32).to_ne_bytes());
            put(&mut attr, 8, (EMPTY.as_ptr() as u64).to_ne_bytes());
            put(&mut attr, 16, (license.as_ptr() as u64).to_ne_bytes());
            let mut prog_name = [0u8; 16];
            let label = format!("floor_{tracepoint}");
            let len = label.len().min(15);
            prog_name[..len].copy_from_slice(&label.as_bytes()[..len]);
            put(&mut attr, 48, prog_name);
            let prog = bpf(BPF_PROG_LOAD, &mut attr)
                .with_context(|| format!("loading an empty program for {tracepoint}"))?;
            // SAFETY: a new fd the kernel just gave us.
            let prog = unsafe { OwnedFd::from_raw_fd(prog) };
            let prog_fd = std::os::fd::AsRawFd::as_raw_fd(&prog);

            let mut info = [0u8; 8];
            let mut attr = [0u8; 128];
            put(&mut attr, 0, (prog_fd as u32).to_ne_bytes());
            put(&mut attr, 4, (info.len() as u32).to_ne_bytes());
            put(&mut attr, 8, (info.as_mut_ptr() as u64).to_ne_bytes());
            bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading the empty program's id")?;
            // struct bpf_prog_info: type, then id.
            ids.push(u32::from_ne_bytes(info[4..8].try_into()?));

            let mut attr = [0u8; 128];
            put(&mut attr, 0, (name.as_ptr() as u64).to_ne_bytes());
            put(&mut attr, 8, (prog_fd as u32).to_ne_bytes());
            let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
                .with_context(|| format!("attaching an empty program to {tracepoint}"))?;
            fds.push(prog);
            // SAFETY: as above.
            fds.push(unsafe { OwnedFd::from_raw_fd(link) });
        }
        Ok(Self { _fds: fds, ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_empty_program_is_two_instructions_returning_zero() {
        // mov64 r0, 0 (opcode 0xb7, imm 0) and exit (0x95): what the verifier accepts as the
        // smallest valid program.
        assert_eq!(EMPTY[0] & 0xff, 0xb7);
        assert_eq!(EMPTY[0] >> 32, 0);
        assert_eq!(EMPTY[1] & 0xff, 0x95);
    }
}
