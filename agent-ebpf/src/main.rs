//! Kernel side of cacheprobe: tiny tracepoint programs that record facts about TCP
//! sockets on watched service ports. No policy lives here; the agent interprets everything.
// The object is built for bpfel-unknown-none; on the host (`cargo clippy --workspace`) it is
// checked as an ordinary binary, so lints cover the kernel code too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod capture;
mod fd_pressure;
mod lifecycle;
mod maps;
mod ring;
mod send_recv;
mod sock;
mod storage;
mod tcp_trouble;

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
