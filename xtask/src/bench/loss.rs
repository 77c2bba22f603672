//! Event loss as the op rate rises: one agent with capture on, the generator stepping through
//! target rates, the growth of `cacheprobe_events_lost_total` per step.

use std::time::Duration;

use super::{
    observe,
    procs::{self, Memcached, Mode},
    report::{megabytes, micros, thousands, Section, Table},
    Bench, DEFAULT_MAX_SOCKETS,
};
use crate::util;

impl Bench {
    pub(super) fn event_loss(&mut self, memcached: &Memcached) -> anyhow::Result<()> {
        util::step("event loss: stepping the op rate up with capture on");
        let mut agent =
            self.start_agent(memcached.addr.port(), Mode::Capture, DEFAULT_MAX_SOCKETS)?;
        let mut table = Table::new(&[
            "target ops/s",
            "achieved ops/s",
            "p99 µs",
            "events lost in step (by source)",
            "agent CPU %",
            "agent RSS MB",
            "agent peak RSS MB",
        ]);
        let mut best_clean: Option<f64> = None;
        let mut rows_text = Vec::new();
        for rate in self.plan.loss_rates {
            let spec = self.spec(memcached.addr, *rate, self.plan.loss_run);
            let before = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let measured = self.measure(&spec, Some(&mut agent), memcached)?;
            // The agent reads the kernel's loss counters once a second.
            procs::sleep(Duration::from_millis(1500))?;
            let after = observe::parse_samples(&observe::scrape(agent.metrics_addr)?);
            let lost = observe::lost_between(&before, &after);
            let memory = procs::memory(agent.pid())?;
            let achieved = measured.load.ops_per_sec();
            let lost_total: u64 = lost.values().sum();
            if lost_total == 0 {
                best_clean = Some(best_clean.map_or(achieved, |b: f64| b.max(achieved)));
            }
            if *rate == Some(100_000) {
                self.targets.loss_at_100k = Some((achieved, lost_total));
            }
            let cpu_percent = measured
                .agent_cpu
                .map(|cpu| 100.0 * cpu / measured.load.elapsed.as_secs_f64());
            rows_text.push((
                rate.map_or("saturation".into(), |r| thousands(r as f64)),
                lost_total,
            ));
            table.row(vec![
                rate.map_or("saturation".into(), |r| thousands(r as f64)),
                thousands(achieved),
                micros(measured.load.latency.quantile(0.99)),
                observe::format_losses(&lost),
                cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                memory.describe(),
                megabytes(memory.hwm_kb),
            ]);
        }
        agent.stop()?;
        let mut section = Section::new("Event loss as the op rate rises");
        section.say(format!(
            "One agent with capture on (config as in the A/B); the xtask generator steps through \
             the target rates, {:.0} s each, {} connections open loop (saturation: {} connections \
             closed loop). Losses are the growth of `cacheprobe_events_lost_total{{source}}` over \
             the step (scraped 1.5 s after it, since the agent folds kernel counters in once a \
             second). Highest achieved rate with zero lost events: **{}**.",
            self.plan.loss_run.as_secs_f64(),
            self.plan.open_loop_connections,
            self.plan.saturation_connections,
            best_clean.map_or(
                "none (events were lost at every step)".to_string(),
                |r| format!("{} ops/s", thousands(r))
            )
        ));
        section.command(format!(
            "{}\n{}",
            memcached.command_line,
            self.agent_command(Mode::Capture)
        ));
        section.table("", table);
        self.finish(section);
        Ok(())
    }
}
