//! The thin I/O layer: reads /proc files and hands their text to `parse`. Every function here
//! treats a process that exits mid-scan as normal (ENOENT/ESRCH) and reports everything else to
//! the caller, which counts it.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{self, BufRead, BufReader},
    os::unix::ffi::OsStrExt,
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

    /// Inode of the network namespace of `pid`, from the /proc/<pid>/ns/net link.
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

    /// Streams /proc/<pid>/net/<table> (tcp or tcp6) row by row into `visit`. Rows that do not
    /// parse are handed over as errors and skipped, so one odd row cannot hide a whole table.
    pub fn read_tcp_table(
        &self,
        pid: u32,
        table: &str,
        mut visit: impl FnMut(Result<TcpRow, ParseError>),
    ) -> io::Result<()> {
        let file = File::open(self.pid_path(pid, &format!("net/{table}")))?;
        // Large reads: a table with 100k sockets is ~15 MB of text, and each read(2) of a
        // seq_file re-walks the socket hash up to its position, so fewer calls are cheaper.
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let mut line = String::with_capacity(256);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
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

    /// Counts the open descriptors of `pid` and appends to `matched` the inodes of those that
    /// are sockets found in `watched`. An fd closed between listing and readlink is skipped.
    pub fn scan_fds<V>(
        &self,
        pid: u32,
        watched: &HashMap<u64, V>,
        matched: &mut Vec<u64>,
    ) -> io::Result<u64> {
        let directory = self.pid_path(pid, "fd");
        let mut open = 0u64;
        let mut link_path = directory.clone();
        for entry in fs::read_dir(&directory)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) if classify(&err) == Failure::Vanished => break,
                Err(err) => return Err(err),
            };
            open += 1;
            link_path.push(entry.file_name());
            let target = fs::read_link(&link_path);
            link_path.pop();
            let Ok(target) = target else { continue };
            if let Some(inode) = parse::parse_bracket_inode(target.as_os_str().as_bytes(), "socket")
            {
                if watched.contains_key(&inode) {
                    matched.push(inode);
                }
            }
        }
        Ok(open)
    }
}
