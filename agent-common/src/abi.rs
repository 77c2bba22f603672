//! The ABI enums (kind of a record, its detail codes) and the kernel's own numbers the
//! programs compare against; each enum's wire value is what both halves read and write.

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

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
            type Error = $crate::UnknownValue;
            fn try_from(value: $repr) -> Result<Self, $crate::UnknownValue> {
                match value {
                    $($value => Ok($name::$variant),)+
                    _ => Err($crate::UnknownValue(value as u64)),
                }
            }
        }
    };
}

/// A value from the kernel that names no variant of an ABI enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue(pub u64);

abi_enum! {
    /// TCP states as the kernel numbers them (include/net/tcp_states.h): in
    /// [`SockEvent::old_state`] and [`SockEvent::new_state`], the `st` column of /proc/net/tcp
    /// and sock_diag's `idiag_state`. Those keep the plain byte (a newer kernel may add a
    /// state); compare with `TcpState::X as u8` or read back with `TryFrom`.
    pub enum TcpState: u8 {
        Established = 1,
        SynSent = 2,
        SynRecv = 3,
        FinWait1 = 4,
        FinWait2 = 5,
        TimeWait = 6,
        Close = 7,
        CloseWait = 8,
        LastAck = 9,
        Listen = 10,
        Closing = 11,
        NewSynRecv = 12,
    }
}

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
    use super::{FdSyscall, SockEventKind, TcpState, TcpTrouble, UnknownValue};
    use crate::KernelCounter;

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
        check(&TcpState::ALL, |state| state as u8);
        for index in 0..=u32::from(u8::MAX) {
            match KernelCounter::ALL
                .iter()
                .find(|&&counter| counter as u32 == index)
            {
                Some(&counter) => assert_eq!(KernelCounter::try_from(index), Ok(counter)),
                None => assert_eq!(
                    KernelCounter::try_from(index),
                    Err(UnknownValue(index.into()))
                ),
            }
        }
        // The wire values are the ABI: the kernel object and older agents agree on them.
        assert_eq!(
            SockEventKind::ALL.map(|kind| kind as u8),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(TcpTrouble::ALL.map(|trouble| trouble as u8), [1, 2, 3, 4]);
        assert_eq!(
            TcpState::ALL.map(|state| state as u8),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        assert_eq!(
            KernelCounter::ALL.map(|counter| counter as u32),
            [0, 1, 2, 3, 4, 5]
        );
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
