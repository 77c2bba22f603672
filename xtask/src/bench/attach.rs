//! Time from starting the agent to its probes attached (issue 8's start-up goal).

use std::time::Duration;

use super::{
    observe,
    procs::{self, Mode},
    report::{median, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

impl Bench {
    pub(super) fn attach_time(&mut self) -> anyhow::Result<()> {
        util::step("time from start to probes attached");
        let mut section = Section::new("Time from start to probes attached");
        section.say(format!(
            "The agent is started {} times with payload capture on (all programs) and no load; \
             wall time is measured from spawning the process to its `probes attached` log line \
             on stderr, and `elapsed_ms` is what the agent reports itself (from `main` to that \
             line: config, tracefs/BTF offset resolution, verifier, attach).",
            self.plan.attach_runs
        ));
        section.command(self.agent_command(Mode::Capture));
        let mut table = Table::new(&[
            "run",
            "wall to `probes attached` (ms)",
            "agent-reported elapsed_ms",
            "programs attached",
        ]);
        let mut walls = Vec::new();
        // No memcached needed: attaching does not depend on traffic. Any free port will do.
        let port = procs::free_port(17300)?;
        for run in 1..=self.plan.attach_runs {
            let agent = self.start_agent(port, Mode::Capture, DEFAULT_MAX_SOCKETS)?;
            let samples = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let up = observe::total(&samples, "cacheprobe_probe_up");
            walls.push(agent.attach_wall.as_secs_f64() * 1000.0);
            table.row(vec![
                run.to_string(),
                format!("{:.0}", agent.attach_wall.as_secs_f64() * 1000.0),
                agent
                    .attach_reported_ms
                    .map_or("?".into(), |ms| ms.to_string()),
                format!("{up:.0}"),
            ]);
            agent.stop()?;
        }
        let median_ms = median(&walls).unwrap_or(f64::NAN);
        self.targets.attach_median = Some(Duration::from_secs_f64(median_ms / 1000.0));
        section.say(format!("Median wall time: **{median_ms:.0} ms**."));
        section.table("", table);
        self.finish(section);
        Ok(())
    }
}
