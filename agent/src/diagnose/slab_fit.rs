//! Detector: a local memcached whose stored item sizes fit its slab chunks badly, with the
//! dominant sizes, the `-f`/`-n` that would waste less and the estimate's assumptions.

use super::{DiagnoseThresholds, Finding, Severity};
use crate::{history::HistorySnapshot, sizes::slab::SlabFitReport};

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

pub fn detect(
    snapshot: &HistorySnapshot,
    thresholds: &DiagnoseThresholds,
    findings: &mut Vec<Finding>,
) {
    for report in &snapshot.slab_fit {
        let fit = &report.estimate;
        if fit.items < thresholds.slab_min_items || fit.waste_ratio < thresholds.slab_waste_ratio {
            continue;
        }
        findings.push(slab_waste(report));
    }
}

fn slab_waste(report: &SlabFitReport) -> Finding {
    let fit = &report.estimate;
    let percent = fit.waste_ratio * 100.0;
    let mut finding = Finding::new(
        "slab-waste",
        Severity::Info,
        format!(
            "{} ({}) would lose about {percent:.0}% of its item memory to slab chunk rounding",
            report.server, report.service
        ),
    );
    let s = &report.settings;
    finding.evidence.push(format!(
        "{} stores seen: items of {} in chunks of {} ({})",
        fit.items,
        mib(fit.item_bytes),
        mib(fit.chunk_bytes),
        if report.settings_assumed {
            "memcached's default settings assumed: no local memcached process found on this port"
                .to_string()
        } else {
            format!(
                "pid {}: -f {} -n {} -o slab_chunk_max={}{}",
                report.pid,
                s.growth_factor,
                s.min_size,
                s.slab_chunk_max,
                if s.cas { "" } else { " -C" }
            )
        }
    ));
    for class in &fit.dominant {
        finding.evidence.push(format!(
            "{} items of typically {} bytes go to {}-byte chunks ({} lost)",
            class.items,
            class.typical_item_size,
            class.chunk_size,
            mib(class.waste_bytes)
        ));
    }
    finding.evidence.push(
        "assumptions: item = 48-byte header + key + 1 + value + 2 (+ 8 CAS), client flags 0; \
         every store counts once (overwrites, expiry and evictions are not subtracted); \
         chunked items above slab_chunk_max approximated; empty space in partly used slab \
         pages not counted"
            .to_string(),
    );
    finding.advice = match &fit.suggestion {
        Some(better) => {
            finding.value("suggested_growth_factor", better.growth_factor);
            finding.value("suggested_min_size", better.min_size as f64);
            finding.value("suggested_waste_ratio", better.waste_ratio);
            format!(
                "Starting memcached with -f {} -n {} would lose about {:.0}% on these sizes \
                 (a smaller -f makes more, closer classes; -n moves the first class). Check \
                 `stats slabs` on the server before changing it: a restart empties the cache.",
                better.growth_factor,
                better.min_size,
                better.waste_ratio * 100.0
            )
        }
        None => "No -f/-n tried cuts the waste by a fifth; if one size dominates, \
                 -o slab_sizes can put a class on it."
            .to_string(),
    };
    finding.value("waste_ratio", fit.waste_ratio);
    finding.value("items", fit.items as f64);
    finding.value("item_bytes", fit.item_bytes as f64);
    finding.value("chunk_bytes", fit.chunk_bytes as f64);
    finding.subjects.services.push(report.service.clone());
    finding.subjects.servers.push(report.server.clone());
    finding.subjects.processes.push("memcached".to_string());
    finding.magnitude = fit.waste_ratio;
    finding
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizes::slab::{estimate, MemcachedSettings, SizeCounts, SlabFitReport};

    fn snapshot(item_size: u64, items: u64) -> HistorySnapshot {
        let mut sizes = SizeCounts::default();
        sizes.add(item_size, items);
        let settings = MemcachedSettings::default();
        HistorySnapshot {
            slab_fit: vec![SlabFitReport {
                service: "memcached".into(),
                server: "127.0.0.1:11211".into(),
                pid: 42,
                estimate: estimate(&settings, &sizes),
                settings,
                settings_assumed: false,
            }],
            ..HistorySnapshot::default()
        }
    }

    #[test]
    fn reports_waste_above_the_threshold_with_a_better_setting() {
        let mut findings = Vec::new();
        // 230-byte items (232 with alignment) in 240-byte chunks: 3% lost.
        detect(
            &snapshot(230, 5000),
            &DiagnoseThresholds::default(),
            &mut findings,
        );
        assert!(findings.is_empty(), "{findings:?}");
        // 945-byte items (952) in 1184-byte chunks: 20% lost, above the default 15%.
        detect(
            &snapshot(945, 5000),
            &DiagnoseThresholds::default(),
            &mut findings,
        );
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!(finding.id, "slab-waste");
        assert!(finding.title.contains("127.0.0.1:11211"));
        assert!(finding.evidence.iter().any(|e| e.contains("-f 1.25 -n 48")));
        assert!(finding
            .evidence
            .iter()
            .any(|e| e.contains("1184-byte chunks")));
        assert!(finding.advice.contains("-n"), "{}", finding.advice);
        // Too few stores to judge.
        let mut few = Vec::new();
        detect(&snapshot(945, 10), &DiagnoseThresholds::default(), &mut few);
        assert!(few.is_empty());
    }
}
