//! Waits for the terminal and for signals at once, and tells a keypress from a terminal that has
//! gone away (a closed tmux pane, a dropped ssh session).
//!
//! crossterm's own reader cannot be trusted with the wait: its default (mio) source loops
//! forever when the tty reads EOF or EIO after a hangup, inside `event::poll`, so top spun at
//! 100% and never looked at its SIGTERM flag again. Top waits here instead and hands crossterm
//! only input that is known to be there (crossterm is built with `use-dev-tty`, whose reader
//! returns read errors and gives up at its timeout, so even a hangup racing a keypress costs at
//! most one short poll).

use std::{
    fs::File,
    io::{self, IsTerminal, Read},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

/// What ended a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Bytes to read from the terminal.
    Input,
    /// The terminal hung up or errs: nothing more will come from it or reach it.
    Gone,
    /// A signal (stop, hangup or a resize): look at the flags and redraw.
    Signal,
    Timeout,
}

/// The terminal's input and a pipe the signal handlers write to.
pub struct TtyWait {
    /// /dev/tty when stdin is not the terminal (as crossterm reads then), kept open.
    _dev_tty: Option<File>,
    tty: RawFd,
    signals: UnixStream,
}

impl TtyWait {
    /// Watches the terminal crossterm reads and wakes on `signals` (their default actions are
    /// replaced; pair this with flags that say what to do).
    pub fn new(signals: &[libc::c_int]) -> io::Result<TtyWait> {
        let (dev_tty, tty) = if io::stdin().is_terminal() {
            (None, io::stdin().as_raw_fd())
        } else {
            let file = File::options().read(true).write(true).open("/dev/tty")?;
            let fd = file.as_raw_fd();
            (Some(file), fd)
        };
        let (receiver, sender) = UnixStream::pair()?;
        receiver.set_nonblocking(true)?;
        sender.set_nonblocking(true)?;
        for &signal in signals {
            signal_hook::low_level::pipe::register(signal, sender.try_clone()?)?;
        }
        Ok(TtyWait {
            _dev_tty: dev_tty,
            tty,
            signals: receiver,
        })
    }

    /// Blocks until input, a hangup, a signal or `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Wake> {
        let mut fds = [
            libc::pollfd {
                fd: self.tty,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Rounded up, so a wait for the next refresh never wakes a millisecond early and spins.
        let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        // SAFETY: fds is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(Wake::Signal)
            } else {
                Err(err)
            };
        }
        if fds[1].revents != 0 {
            // Drained so the next wait blocks again; the flags say which signal it was.
            let mut sink = [0u8; 64];
            while matches!(self.signals.read(&mut sink), Ok(n) if n > 0) {}
            return Ok(Wake::Signal);
        }
        Ok(classify(fds[0].revents))
    }

    /// Whether the terminal has hung up, without waiting.
    pub fn gone(&mut self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.tty,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: fd is a valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        ready > 0 && classify(fd.revents) == Wake::Gone
    }
}

/// A hung-up tty polls as readable and hung up at once; hangup wins, since its reads only ever
/// return EOF or EIO.
fn classify(revents: libc::c_short) -> Wake {
    if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Wake::Gone
    } else if revents & libc::POLLIN != 0 {
        Wake::Input
    } else {
        Wake::Timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hangup_wins_over_readable() {
        assert_eq!(classify(libc::POLLIN | libc::POLLHUP), Wake::Gone);
        assert_eq!(classify(libc::POLLERR), Wake::Gone);
        assert_eq!(classify(libc::POLLNVAL), Wake::Gone);
        assert_eq!(classify(libc::POLLIN), Wake::Input);
        assert_eq!(classify(0), Wake::Timeout);
    }
}
