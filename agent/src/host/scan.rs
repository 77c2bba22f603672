//! The thin I/O layer: reads /proc files and hands their text to `parse`. Every function here
//! treats a process that exits mid-scan as normal (ENOENT/ESRCH) and reports everything else to
//! the caller, which counts it.

use std::{
    fs::{self, File},
    io::{self, BufRead, BufReader},
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use super::parse::{self, FileHandles, ParseError, TcpExtCounters, TcpRow};

/// How a failed read is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The process (or its fd) went away between listing and reading: expected, silent.
    Vanished,
    /// EACCES/EPERM: the agent lacks privilege for this process.
    Denied,
    Other,
}

pub fn classify(err: &io::Error) -> Failure {
    match err.raw_os_error() {
        Some(libc::ENOENT | libc::ESRCH) => Failure::Vanished,
        Some(libc::EACCES | libc::EPERM) => Failure::Denied,
        _ => Failure::Other,
    }
}

/// A descriptor of a process that refers to a watched socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchedFd {
    pub inode: u64,
    /// The descriptor number in the owning process.
    pub fd: i32,
}

/// Reads /proc (or a directory laid out like it).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcFs { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pid_path(&self, pid: u32, relative: &str) -> PathBuf {
        let mut path = self.root.join(pid.to_string());
        path.push(relative);
        path
    }

    /// Process ids (thread-group leaders) in ascending order.
    pub fn pids(&self) -> io::Result<Vec<u32>> {
        let mut pids: Vec<u32> = fs::read_dir(&self.root)?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                std::str::from_utf8(entry.file_name().as_bytes())
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Inode of the network namespace of `pid`, from the `/proc/<pid>/ns/net` link.
    pub fn netns_of(&self, pid: u32) -> io::Result<u64> {
        self.netns_at(&self.pid_path(pid, "ns/net"))
    }

    /// The namespace of the calling thread: sock_diag sockets it creates answer for this one.
    pub fn own_netns(&self) -> io::Result<u64> {
        self.netns_at(&self.root.join("thread-self/ns/net"))
    }

    fn netns_at(&self, path: &Path) -> io::Result<u64> {
        let target = fs::read_link(path)?;
        parse::parse_bracket_inode(target.as_os_str().as_bytes(), "net")
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected ns/net link"))
    }

    pub fn open_netns(&self, pid: u32) -> io::Result<File> {
        File::open(self.pid_path(pid, "ns/net"))
    }

    /// Streams `/proc/<pid>/net/<table>` (tcp or tcp6) into `visit`, fully parsing only rows whose
    /// (local, remote) ports pass `wanted`: on a busy host most rows are not watched. Rows that
    /// do not parse are handed over as errors and skipped, so one odd row cannot hide a table.
    pub fn read_tcp_table(
        &self,
        pid: u32,
        table: &str,
        wanted: impl Fn(u16, u16) -> bool,
        mut visit: impl FnMut(Result<TcpRow, ParseError>),
    ) -> io::Result<()> {
        let file = File::open(self.pid_path(pid, &format!("net/{table}")))?;
        // The kernel hands out at most one seq_file page (4 KiB, ~27 rows) per read(2) whatever
        // the buffer size, resuming its hash walk each time; that is also why rows can repeat
        // or go missing while sockets come and go (see `drop_duplicate_rows`).
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut line = String::with_capacity(256);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if let Some((local, remote)) = parse::tcp_line_ports(&line) {
                if !wanted(local, remote) {
                    continue;
                }
            }
            match parse::parse_tcp_line(&line) {
                Ok(Some(row)) => visit(Ok(row)),
                Ok(None) => {}
                Err(err) => visit(Err(err)),
            }
        }
    }

    pub fn read_netstat(&self, pid: u32) -> io::Result<Result<TcpExtCounters, ParseError>> {
        let text = fs::read_to_string(self.pid_path(pid, "net/netstat"))?;
        Ok(parse::parse_netstat(&text))
    }

    pub fn read_snmp_tcp(
        &self,
        pid: u32,
    ) -> io::Result<Result<parse::TcpConnectionCounters, ParseError>> {
        let text = fs::read_to_string(self.pid_path(pid, "net/snmp"))?;
        Ok(parse::parse_snmp_tcp(&text))
    }

    pub fn read_soft_nofile(&self, pid: u32) -> io::Result<Result<u64, ParseError>> {
        let text = fs::read_to_string(self.pid_path(pid, "limits"))?;
        Ok(parse::parse_soft_nofile(&text))
    }

    pub fn read_comm(&self, pid: u32) -> io::Result<String> {
        Ok(parse::parse_comm(&fs::read(self.pid_path(pid, "comm"))?))
    }

    pub fn read_file_nr(&self) -> io::Result<Result<FileHandles, ParseError>> {
        let text = fs::read_to_string(self.root.join("sys/fs/file-nr"))?;
        Ok(parse::parse_file_nr(&text))
    }

    /// The number of open descriptors of `pid` without listing them: since Linux 6.2 a stat of
    /// `/proc/<pid>/fd` reports it as the size (one bitmap count in the kernel, where listing
    /// builds a dentry per descriptor). Older kernels report 0 for everyone (see
    /// [`ProcFs::fd_count_supported`]).
    pub fn fd_count(&self, pid: u32) -> io::Result<u64> {
        Ok(fs::metadata(self.pid_path(pid, "fd"))?.len())
    }

    /// Whether [`ProcFs::fd_count`] works here: this process always has descriptors open, so a
    /// kernel that counts them reports a non-zero size for its own fd directory.
    pub fn fd_count_supported(&self) -> bool {
        fs::metadata(self.root.join("self/fd")).is_ok_and(|metadata| metadata.len() > 0)
    }

    /// Counts the open descriptors of `pid` and hands to `matched` those that are sockets
    /// `watched` accepts (the caller keeps them where it wants them, without a list here). An fd
    /// closed between listing and readlink is skipped.
    pub fn scan_fds(
        &self,
        pid: u32,
        watched: impl Fn(u64) -> bool,
        mut matched: impl FnMut(MatchedFd),
    ) -> io::Result<u64> {
        let path = self.pid_path(pid, "fd");
        // readlinkat against the open directory: resolving /proc/<pid>/fd/<n> from the root for
        // every descriptor costs ~15% more on a process with 10k sockets.
        let directory = File::options()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&path)?;
        let mut open = 0u64;
        for entry in fs::read_dir(&path)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if classify(&err) == Failure::Vanished => break,
                Err(err) => return Err(err),
            };
            open += 1;
            let mut target = [0u8; 64];
            let Some(length) = read_link_at(&directory, entry.file_name().as_bytes(), &mut target)
            else {
                continue;
            };
            if let Some(inode) = parse::parse_bracket_inode(&target[..length], "socket") {
                if watched(inode) {
                    let name = entry.file_name();
                    if let Some(fd) = std::str::from_utf8(name.as_bytes())
                        .ok()
                        .and_then(|name| name.parse().ok())
                    {
                        matched(MatchedFd { inode, fd });
                    }
                }
            }
        }
        Ok(open)
    }
}

/// readlinkat(2) of `name` in `directory` into `target`; None when the link is gone or the name
/// is not a descriptor number. A target longer than the buffer is cut, which is fine: only
/// `socket:[inode]` (at most 29 bytes) is of interest.
fn read_link_at(directory: &File, name: &[u8], target: &mut [u8]) -> Option<usize> {
    let mut c_name = [0u8; 24];
    if name.is_empty() || name.len() >= c_name.len() || name.contains(&0) {
        return None;
    }
    c_name[..name.len()].copy_from_slice(name);
    // SAFETY: `c_name` is NUL-terminated, `target` is valid for writes of its length and the
    // directory descriptor is open for the duration of the call.
    let length = unsafe {
        libc::readlinkat(
            directory.as_raw_fd(),
            c_name.as_ptr().cast(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    usize::try_from(length).ok()
}
