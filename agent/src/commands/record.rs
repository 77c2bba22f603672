//! Local recording for `diagnose` when no daemon runs: start this same binary as a short-lived
//! `run` with a private control socket, let it watch for the duration, then take its history.
//! The pipeline, probes and history are exactly the daemon's.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::{
    clock::unix_now, commands::diagnose::LocalRecorder, config::Config, control,
    history::HistorySnapshot,
};

pub struct ChildRecorder {
    /// The config file diagnose was given (None: defaults).
    pub config_path: Option<PathBuf>,
}

struct Cleanup {
    child: Child,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; SIGTERM detaches the probes cleanly.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl LocalRecorder for ChildRecorder {
    fn record_for(
        &self,
        duration: Duration,
        _config: &Config,
        progress: &mut dyn FnMut(Duration),
    ) -> anyhow::Result<HistorySnapshot> {
        let dir = std::env::temp_dir().join(format!("cacheprobe-diagnose-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let socket = dir.join("control.sock");
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut command = Command::new(exe);
        command
            .args(["run", "--listen", "127.0.0.1:0", "--control-socket"])
            .arg(&socket)
            .args(["--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(path) = &self.config_path {
            command.arg("--config").arg(path);
        }
        let child = command.spawn().context("cannot start the probes")?;
        let mut guard = Cleanup { child, dir };

        let started = Instant::now();
        loop {
            if let Some(status) = guard.child.try_wait()? {
                bail!(
                    "the probes could not start ({status}): {}",
                    std::fs::read_to_string(&log_path)
                        .unwrap_or_default()
                        .trim()
                );
            }
            if control::fetch_history(&socket, unix_now(), Duration::from_secs(2)).is_ok() {
                break;
            }
            if started.elapsed() > Duration::from_secs(15) {
                bail!("the probes did not come up within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let since = unix_now();
        let watch_start = Instant::now();
        while watch_start.elapsed() < duration {
            progress(watch_start.elapsed());
            std::thread::sleep(
                Duration::from_millis(250).min(duration - watch_start.elapsed().min(duration)),
            );
        }
        progress(duration);
        let snapshot = control::fetch_history(&socket, since, Duration::from_secs(30))
            .context("cannot read the recorded history")?;
        drop(guard);
        Ok(snapshot)
    }
}
