//! The ABI enums (kind of a record, its detail codes) and the kernel's own numbers the
//! programs compare against; each enum's wire value is what both halves read and write.

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

/// An ABI enum: `#[repr(u8)]` (or the given repr), its wire value written by the kernel half
/// with `as`, read back by the user half with `TryFrom`, where a byte naming no variant is an
/// [`UnknownValue`] (the agent counts the record as undecodable; it never panics on it).
/// Records keep the plain integer: an enum field read from kernel bytes could hold an invalid
/// value.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Number of variants.
            pub const COUNT: usize = [$($value),+].len();
            /// Every variant, in wire-value order.
            pub const ALL: [$name; Self::COUNT] = [$($name::$variant),+];
        }

        impl TryFrom<$repr> for $name {
            type Error = UnknownValue;
            fn try_from(value: $repr) -> Result<Self, UnknownValue> {
                match value {
                    $($value => Ok($name::$variant),)+
                    _ => Err(UnknownValue(value as u64)),
                }
            }
        }
    };
}

/// A value from the kernel that names no variant of an ABI enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue(pub u64);

abi_enum! {
    /// What a [`SockEvent`] reports, in [`SockEvent::kind`].
    pub enum SockEventKind: u8 {
        /// A TCP state transition on a watched socket ([`SockEvent::old_state`] to
        /// [`SockEvent::new_state`]).
        State = 1,
        /// A watched socket first seen through a send/receive (it existed before the agent);
        /// [`SockEvent::new_state`] is its state when seen.
        Learned = 2,
        /// A send on a socket whose peer had already closed.
        SendAfterPeerClose = 3,
        /// A receive on a socket whose peer had already closed.
        RecvAfterPeerClose = 4,
        /// TCP trouble on a watched port: [`SockEvent::trouble`] says which, and
        /// [`SockEvent::old_state`] is the socket state where the tracepoint has it.
        TcpTrouble = 5,
        /// A syscall returned EMFILE or ENFILE: [`SockEvent::fd_syscall`] says which, and
        /// [`SockEvent::ret`] holds the negative errno.
        FdExhausted = 6,
    }
}

abi_enum! {
    /// Which TCP trouble a [`SockEventKind::TcpTrouble`] event reports, in [`SockEvent::trouble`].
    pub enum TcpTrouble: u8 {
        /// A data segment was retransmitted (`tcp_retransmit_skb`).
        Retransmit = 1,
        /// A listener retransmitted a SYN-ACK (`tcp_retransmit_synack`).
        RetransmitSynAck = 2,
        /// A reset arrived (`tcp_receive_reset`).
        ResetReceived = 3,
        /// A reset was sent (`tcp_send_reset`).
        ResetSent = 4,
    }
}

abi_enum! {
    /// Syscalls whose EMFILE/ENFILE failures are recorded, in the order the programs number them
    /// ([`FdSyscalls::numbers`]), in [`SockEvent::fd_syscall`].
    pub enum FdSyscall: u8 {
        Socket = 0,
        Accept = 1,
        Accept4 = 2,
        Open = 3,
        Openat = 4,
        Dup = 5,
    }
}

impl FdSyscall {
    /// The syscall's name, as the metrics and the history name it.
    pub const fn name(self) -> &'static str {
        match self {
            FdSyscall::Socket => "socket",
            FdSyscall::Accept => "accept",
            FdSyscall::Accept4 => "accept4",
            FdSyscall::Open => "open",
            FdSyscall::Openat => "openat",
            FdSyscall::Dup => "dup",
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::{FdSyscall, SockEventKind, TcpTrouble, UnknownValue};

    #[test]
    fn abi_enums_read_back_every_value_they_write_and_reject_every_other_byte() {
        fn check<E: Copy + PartialEq + core::fmt::Debug + TryFrom<u8, Error = UnknownValue>>(
            all: &[E],
            wire: impl Fn(E) -> u8,
        ) {
            for byte in 0..=u8::MAX {
                match all.iter().find(|&&variant| wire(variant) == byte) {
                    Some(&variant) => assert_eq!(E::try_from(byte), Ok(variant)),
                    None => assert_eq!(E::try_from(byte), Err(UnknownValue(byte.into()))),
                }
            }
        }
        check(&SockEventKind::ALL, |kind| kind as u8);
        check(&TcpTrouble::ALL, |trouble| trouble as u8);
        check(&FdSyscall::ALL, |syscall| syscall as u8);
        // The wire values are the ABI: the kernel object and older agents agree on them.
        assert_eq!(
            SockEventKind::ALL.map(|kind| kind as u8),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(TcpTrouble::ALL.map(|trouble| trouble as u8), [1, 2, 3, 4]);
        assert_eq!(
            FdSyscall::ALL.map(|syscall| syscall as u8),
            [0, 1, 2, 3, 4, 5]
        );
        assert_eq!(
            FdSyscall::ALL.map(FdSyscall::name),
            ["socket", "accept", "accept4", "open", "openat", "dup"]
        );
    }
}
