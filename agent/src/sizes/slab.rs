//! memcached slab fit: a local memcached's chunk classes computed from its command line as
//! memcached computes them, and the memory the item sizes seen on its socket lose to chunk
//! rounding, with the `-f`/`-n` that would lose less.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `sizeof(item)` in memcached 1.6 on 64-bit builds.
pub const ITEM_HEADER: u64 = 48;
/// The CAS id memcached stores per item unless started with `-C`.
pub const CAS_BYTES: u64 = 8;
/// Chunks are aligned to 8 bytes (`CHUNK_ALIGN_BYTES`).
const CHUNK_ALIGN: u64 = 8;
/// memcached's `MAX_NUMBER_OF_SLAB_CLASSES` (64) less class 0, which is unused: at most 62
/// computed classes plus the largest one.
const MAX_CLASSES: usize = 63;
/// memcached's fixed slab page (1 MiB since 1.4.29; `-I` no longer changes it).
const SLAB_PAGE: u64 = 1 << 20;

/// The settings that shape memcached's slab classes; `Default` is memcached's own defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemcachedSettings {
    /// `-f`, `--slab-growth-factor`.
    pub growth_factor: f64,
    /// `-n`, `--slab-min-size`: key + value + flags space of the smallest chunk.
    pub min_size: u64,
    /// `-I`, `--max-item-size`.
    pub item_size_max: u64,
    /// `-o slab_chunk_max`, else half a slab page.
    pub slab_chunk_max: u64,
    /// False with `-C`, `--disable-cas`.
    pub cas: bool,
    /// `-o slab_sizes=a-b-c`: explicit chunk sizes instead of the factor.
    pub slab_sizes: Option<Vec<u64>>,
}

impl Default for MemcachedSettings {
    fn default() -> Self {
        MemcachedSettings {
            growth_factor: 1.25,
            min_size: 48,
            item_size_max: 1 << 20,
            slab_chunk_max: SLAB_PAGE / 2,
            cas: true,
            slab_sizes: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("{option} needs a value")]
    MissingValue { option: String },
    #[error("{option} has an unreadable value {value:?}")]
    BadValue { option: String, value: String },
}

/// A size as memcached reads `-I`: bytes, or with a `k`/`m`/`g` suffix.
fn parse_size(option: &str, value: &str) -> Result<u64, SettingsError> {
    let bad = || SettingsError::BadValue {
        option: option.to_string(),
        value: value.to_string(),
    };
    let lower = value.trim().to_ascii_lowercase();
    let (digits, unit) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (&lower[..], 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .filter(|&n| n > 0)
        .ok_or_else(bad)
}

fn parse_number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, SettingsError> {
    value.trim().parse().map_err(|_| SettingsError::BadValue {
        option: option.to_string(),
        value: value.to_string(),
    })
}

impl MemcachedSettings {
    /// Reads the slab settings from memcached's arguments (argv without the program name).
    /// Options that do not shape slabs are ignored, as are their values.
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Result<MemcachedSettings, SettingsError> {
        let mut settings = MemcachedSettings::default();
        let mut chunk_max_set = false;
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_ref();
            i += 1;
            let (name, inline) = split_option(arg);
            let takes_value = matches!(
                name.as_str(),
                "-f" | "--slab-growth-factor"
                    | "-n"
                    | "--slab-min-size"
                    | "-I"
                    | "--max-item-size"
                    | "-o"
                    | "--extended"
            );
            if name == "-C" || name == "--disable-cas" {
                settings.cas = false;
                continue;
            }
            if !takes_value {
                continue;
            }
            let value = match inline {
                Some(value) => value,
                None => {
                    let value = args.get(i).map(|v| v.as_ref().to_string()).ok_or_else(|| {
                        SettingsError::MissingValue {
                            option: name.clone(),
                        }
                    })?;
                    i += 1;
                    value
                }
            };
            match name.as_str() {
                "-f" | "--slab-growth-factor" => {
                    let factor: f64 = parse_number(&name, &value)?;
                    if !(factor > 1.0 && factor.is_finite()) {
                        return Err(SettingsError::BadValue {
                            option: name,
                            value,
                        });
                    }
                    settings.growth_factor = factor;
                }
                "-n" | "--slab-min-size" => {
                    settings.min_size = parse_number::<u64>(&name, &value)?.max(1)
                }
                "-I" | "--max-item-size" => settings.item_size_max = parse_size(&name, &value)?,
                _ => settings.apply_extended(&value, &mut chunk_max_set)?,
            }
        }
        if !chunk_max_set {
            settings.slab_chunk_max = SLAB_PAGE / 2;
        }
        Ok(settings)
    }

    /// `-o` / `--extended` options: the slab ones, the rest ignored. `chunk_max_set` notes an
    /// explicit `slab_chunk_max`.
    fn apply_extended(
        &mut self,
        value: &str,
        chunk_max_set: &mut bool,
    ) -> Result<(), SettingsError> {
        for option in value.split(',') {
            let (key, val) = option.split_once('=').unwrap_or((option, ""));
            match key.trim() {
                "slab_chunk_max" => {
                    self.slab_chunk_max = parse_size(key, val)?;
                    *chunk_max_set = true;
                }
                "slab_sizes" => {
                    let sizes = val
                        .split('-')
                        .map(|s| parse_number::<u64>(key, s))
                        .collect::<Result<Vec<_>, _>>()?;
                    self.slab_sizes = Some(sizes);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The bytes an item takes before rounding to a chunk: header, key, the key's terminator,
    /// the value with its "\r\n" and the CAS id. Client flags are assumed 0 (memcached stores
    /// them only when set: 4 bytes more).
    pub fn item_size(&self, key_len: u64, value_len: u64) -> u64 {
        ITEM_HEADER + key_len + 1 + value_len + 2 + if self.cas { CAS_BYTES } else { 0 }
    }
}

/// Chunk sizes of every slab class, smallest first, as memcached's `slabs_init` computes them:
/// from `sizeof(item) + -n`, each aligned to 8 bytes and multiplied by `-f` (in integers, as
/// memcached does), until the next would reach `slab_chunk_max / f` or 62 classes exist; the
/// last class is `slab_chunk_max`.
pub fn chunk_sizes(settings: &MemcachedSettings) -> Vec<u64> {
    let align = |size: u64| size.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    let mut classes = Vec::new();
    if let Some(sizes) = &settings.slab_sizes {
        for &size in sizes.iter().take(MAX_CLASSES - 1) {
            if size == 0 {
                break;
            }
            classes.push(align(size));
        }
    } else {
        let factor = settings.growth_factor.max(1.0001);
        let limit = settings.slab_chunk_max as f64 / factor;
        let mut size = ITEM_HEADER + settings.min_size;
        while classes.len() < MAX_CLASSES - 1 && (size as f64) < limit {
            size = align(size);
            classes.push(size);
            size = (size as f64 * factor) as u64;
        }
    }
    classes.push(settings.slab_chunk_max);
    classes
}

/// Memory an item of `size` bytes takes. Items above the largest chunk are split by memcached
/// into chunks of `slab_chunk_max` and a last, smaller chunk (approximated as the class that
/// fits the remainder).
pub fn allocated(classes: &[u64], size: u64) -> u64 {
    let Some(&largest) = classes.last() else {
        return size;
    };
    let fit = |n: u64| classes.iter().copied().find(|&c| c >= n).unwrap_or(largest);
    if size <= largest {
        return fit(size);
    }
    let full = size / largest;
    let rest = size % largest;
    full * largest + if rest > 0 { fit(rest) } else { 0 }
}

/// Item sizes seen on one server, counted per 8-byte step (chunks are 8-aligned, so this loses
/// nothing about which class an item takes). Bounded: past [`SizeCounts::MAX_EXACT`] distinct
/// sizes, new sizes are rounded up to 1/64 of their power of two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SizeCounts {
    counts: BTreeMap<u64, u64>,
    pub coarsened: u64,
}

impl SizeCounts {
    pub const MAX_EXACT: usize = 4096;

    pub fn add(&mut self, size: u64, count: u64) {
        let mut key = size.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
        if self.counts.len() >= Self::MAX_EXACT && !self.counts.contains_key(&key) {
            let step = (1u64 << (63 - key.leading_zeros()).saturating_sub(6)).max(CHUNK_ALIGN);
            key = key.div_ceil(step) * step;
            self.coarsened += count;
        }
        *self.counts.entry(key).or_insert(0) += count;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.counts.iter().map(|(&s, &c)| (s, c))
    }
}

/// Items of one chunk class in the estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassUse {
    pub chunk_size: u64,
    pub items: u64,
    /// Median item size in this class.
    pub typical_item_size: u64,
    pub waste_bytes: u64,
}

/// Settings that would waste less on the same items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub growth_factor: f64,
    pub min_size: u64,
    pub waste_ratio: f64,
}

/// How well one server's items fit its chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitEstimate {
    pub items: u64,
    pub item_bytes: u64,
    pub chunk_bytes: u64,
    /// Share of chunk memory lost to rounding: 1 - item bytes / chunk bytes.
    pub waste_ratio: f64,
    /// Classes holding the most items, most first (at most 3).
    pub dominant: Vec<ClassUse>,
    pub suggestion: Option<Suggestion>,
}

fn waste(classes: &[u64], sizes: &SizeCounts) -> (u64, u64) {
    sizes.iter().fold((0, 0), |(used, chunks), (size, count)| {
        (
            used + size * count,
            chunks + allocated(classes, size) * count,
        )
    })
}

fn ratio(used: u64, chunks: u64) -> f64 {
    if chunks == 0 {
        0.0
    } else {
        1.0 - used as f64 / chunks as f64
    }
}

/// Estimates the waste of `sizes` (item sizes, as [`MemcachedSettings::item_size`]) under
/// `settings`, and searches `-f`/`-n` for settings that would waste less. Every item counts
/// once per store seen: items overwritten, expired or evicted are not subtracted.
pub fn estimate(settings: &MemcachedSettings, sizes: &SizeCounts) -> FitEstimate {
    let classes = chunk_sizes(settings);
    let (used, chunks) = waste(&classes, sizes);
    let mut per_class: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for (size, count) in sizes.iter() {
        let chunk = allocated(&classes, size).min(*classes.last().unwrap_or(&size));
        per_class.entry(chunk).or_default().push((size, count));
    }
    let mut dominant: Vec<ClassUse> = per_class
        .into_iter()
        .map(|(chunk_size, members)| {
            let items: u64 = members.iter().map(|&(_, c)| c).sum();
            let mut seen = 0;
            let typical_item_size = members
                .iter()
                .find(|&&(_, c)| {
                    seen += c;
                    seen * 2 >= items
                })
                .map_or(0, |&(s, _)| s);
            let waste_bytes = members
                .iter()
                .map(|&(s, c)| (allocated(&classes, s) - s.min(allocated(&classes, s))) * c)
                .sum();
            ClassUse {
                chunk_size,
                items,
                typical_item_size,
                waste_bytes,
            }
        })
        .collect();
    dominant.sort_by(|a, b| b.items.cmp(&a.items).then(a.chunk_size.cmp(&b.chunk_size)));
    dominant.truncate(3);
    let current = ratio(used, chunks);
    FitEstimate {
        items: sizes.total(),
        item_bytes: used,
        chunk_bytes: chunks,
        waste_ratio: current,
        suggestion: suggest(settings, sizes, &dominant, current),
        dominant,
    }
}

/// The `-f`/`-n` pair (from a small grid, plus `-n` values that put a class exactly on a
/// dominant item size) with the least waste, if it cuts the waste by a fifth or more.
fn suggest(
    settings: &MemcachedSettings,
    sizes: &SizeCounts,
    dominant: &[ClassUse],
    current: f64,
) -> Option<Suggestion> {
    if settings.slab_sizes.is_some() || current <= 0.0 {
        return None;
    }
    let mut min_sizes = vec![16, 32, 48, 64, 96];
    for class in dominant {
        if let Some(n) = class.typical_item_size.checked_sub(ITEM_HEADER) {
            if n >= 8 {
                min_sizes.push(n);
            }
        }
    }
    let mut best: Option<Suggestion> = None;
    for factor in [1.05, 1.08, 1.1, 1.15, 1.2, 1.25, 1.5, 2.0] {
        for &min_size in &min_sizes {
            let candidate = MemcachedSettings {
                growth_factor: factor,
                min_size,
                ..settings.clone()
            };
            let (used, chunks) = waste(&chunk_sizes(&candidate), sizes);
            let waste_ratio = ratio(used, chunks);
            if best
                .as_ref()
                .is_none_or(|b| waste_ratio < b.waste_ratio - 1e-9)
            {
                best = Some(Suggestion {
                    growth_factor: factor,
                    min_size,
                    waste_ratio,
                });
            }
        }
    }
    best.filter(|b| b.waste_ratio < current * 0.8)
}

/// Whether a request with this outcome wrote a whole item (appends and prepends grow one, and
/// are left out).
pub fn stores_item(command: crate::memcache::Command, status: crate::model::Status) -> bool {
    use crate::memcache::Command::*;
    use crate::model::Status;
    matches!(
        command,
        Set | Add
            | Replace
            | Cas
            | MetaSet
            | BinSet
            | BinAdd
            | BinReplace
            | BinSetQ
            | BinAddQ
            | BinReplaceQ
    ) && matches!(status, Status::Stored | Status::Noreply)
}

/// A local memcached process: its listening port and slab settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalMemcached {
    pub pid: u32,
    pub port: u16,
    pub settings: MemcachedSettings,
}

/// The port memcached listens on per its arguments (`-p`, `--port`, default 11211).
pub fn port_from_args<S: AsRef<str>>(args: &[S]) -> u16 {
    let mut port = 11211;
    let mut iter = args.iter().map(AsRef::as_ref);
    while let Some(arg) = iter.next() {
        let value = if arg == "-p" || arg == "--port" {
            iter.next()
        } else if let Some(v) = arg.strip_prefix("--port=") {
            Some(v)
        } else if arg.len() > 2 && arg.starts_with("-p") {
            Some(&arg[2..])
        } else {
            None
        };
        if let Some(p) = value.and_then(|v| v.parse().ok()) {
            port = p;
        }
    }
    port
}

/// Local memcached processes found in `/proc` (by their `comm`). Processes whose command line
/// cannot be read or parsed are logged and left out.
pub fn local_memcacheds(proc_root: &std::path::Path) -> Vec<LocalMemcached> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let is_memcached = std::fs::read_to_string(dir.join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "memcached");
        if !is_memcached {
            continue;
        }
        let Ok(raw) = std::fs::read(dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .skip(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        match MemcachedSettings::from_args(&args) {
            Ok(settings) => found.push(LocalMemcached {
                pid,
                port: port_from_args(&args),
                settings,
            }),
            Err(err) => tracing::debug!(pid, %err, "memcached command line not understood"),
        }
    }
    found.sort_by_key(|m| (m.port, m.pid));
    found
}

/// One server's estimate as published to history and diagnose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlabFitReport {
    pub service: String,
    pub server: String,
    pub pid: u32,
    pub settings: MemcachedSettings,
    /// True when the settings are memcached's defaults because no process was found.
    pub settings_assumed: bool,
    pub estimate: FitEstimate,
}

/// Item sizes stored per local server (server role), bounded in servers.
#[derive(Debug, Default)]
pub struct SlabFitTracker {
    servers: HashMap<(usize, std::net::SocketAddr), SizeCounts>,
    pub dropped_servers: u64,
}

const MAX_SERVERS: usize = 64;
/// An item's bytes besides key and value (header, key terminator, "\r\n", CAS id) modulo
/// the chunk alignment: 51 or 59 bytes, both 3 mod 8.
const OVERHEAD_REMAINDER: u64 = (ITEM_HEADER + 1 + 2) % CHUNK_ALIGN;

impl SlabFitTracker {
    /// An item of this key and value length was stored on `server` (`weight` stores).
    pub fn stored(
        &mut self,
        service: usize,
        server: std::net::SocketAddr,
        key_len: u64,
        value_len: u64,
        weight: u64,
    ) {
        let len = self.servers.len();
        let counts = match self.servers.get_mut(&(service, server)) {
            Some(counts) => counts,
            None if len < MAX_SERVERS => self.servers.entry((service, server)).or_default(),
            None => {
                self.dropped_servers += 1;
                return;
            }
        };
        // The item size is computed with the server's settings at report time (CAS may be off),
        // so keep key + value and add the header then. Counts are kept per 8 bytes: store
        // key + value with the overhead's remainder mod 8 (the same with or without CAS), so
        // adding the rest of the overhead (a multiple of 8) later gives the item's exact step.
        counts.add(key_len + value_len + OVERHEAD_REMAINDER, weight);
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Ports of the servers seen.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.servers.keys().map(|(_, server)| server.port())
    }

    /// Estimates per server with the settings of the local memcached on its port.
    pub fn reports(
        &self,
        locals: &[LocalMemcached],
        service_name: impl Fn(usize) -> Option<String>,
    ) -> Vec<SlabFitReport> {
        let mut reports: Vec<SlabFitReport> = self
            .servers
            .iter()
            .filter_map(|(&(service, server), payloads)| {
                let local = locals.iter().find(|m| m.port == server.port());
                let settings = local.map(|m| m.settings.clone()).unwrap_or_default();
                let overhead = settings.item_size(0, 0) - OVERHEAD_REMAINDER;
                let mut items = SizeCounts::default();
                for (size, count) in payloads.iter() {
                    items.add(size + overhead, count);
                }
                Some(SlabFitReport {
                    service: service_name(service)?,
                    server: server.to_string(),
                    pid: local.map_or(0, |m| m.pid),
                    settings_assumed: local.is_none(),
                    estimate: estimate(&settings, &items),
                    settings,
                })
            })
            .collect();
        reports.sort_by(|a, b| (&a.service, &a.server).cmp(&(&b.service, &b.server)));
        reports
    }
}

/// (option name, inline value) of one argument: `-f1.1` and `--slab-growth-factor=1.1` carry
/// their value, `-f` and `--slab-growth-factor` take the next argument.
fn split_option(arg: &str) -> (String, Option<String>) {
    if let Some(long) = arg.strip_prefix("--") {
        match long.split_once('=') {
            Some((n, v)) => (format!("--{n}"), Some(v.to_string())),
            None => (arg.to_string(), None),
        }
    } else if arg.len() > 2 && arg.starts_with('-') && "fnIo".contains(&arg[1..2]) {
        (arg[..2].to_string(), Some(arg[2..].to_string()))
    } else {
        (arg.to_string(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> MemcachedSettings {
        MemcachedSettings::from_args(args).unwrap()
    }

    // Chunk sizes printed by memcached 1.6.18 (`memcached -vv ...`, Debian bookworm) at start.
    const DEFAULT: &[u64] = &[
        96, 120, 152, 192, 240, 304, 384, 480, 600, 752, 944, 1184, 1480, 1856, 2320, 2904, 3632,
        4544, 5680, 7104, 8880, 11104, 13880, 17352, 21696, 27120, 33904, 42384, 52984, 66232,
        82792, 103496, 129376, 161720, 202152, 252696, 315872, 394840, 524288,
    ];

    #[test]
    fn classes_match_memcached_for_several_settings() {
        assert_eq!(chunk_sizes(&settings(&[])), DEFAULT);
        assert_eq!(chunk_sizes(&settings(&["-I", "4m"])), DEFAULT);
        assert_eq!(chunk_sizes(&settings(&["-C", "-vv", "-m", "64"])), DEFAULT);
        assert_eq!(
            chunk_sizes(&settings(&["-f", "2", "-n", "100"])),
            [152, 304, 608, 1216, 2432, 4864, 9728, 19456, 38912, 77824, 155648, 524288]
        );
        assert_eq!(
            chunk_sizes(&settings(&["-n16"])),
            [
                64, 80, 104, 136, 176, 224, 280, 352, 440, 552, 696, 872, 1096, 1376, 1720, 2152,
                2696, 3376, 4224, 5280, 6600, 8256, 10320, 12904, 16136, 20176, 25224, 31536,
                39424, 49280, 61600, 77000, 96256, 120320, 150400, 188000, 235000, 293752, 367192,
                524288
            ]
        );
        assert_eq!(
            chunk_sizes(&settings(&["-o", "slab_chunk_max=65536"])),
            &[&DEFAULT[..28], &[65536]].concat()[..]
        );
        // 62 computed classes, then the largest: memcached's class limit, not the chunk limit.
        let small_factor = chunk_sizes(&settings(&["--slab-growth-factor=1.1"]));
        assert_eq!(small_factor.len(), 63);
        assert_eq!(&small_factor[..6], [96, 112, 128, 144, 160, 176]);
        assert_eq!(&small_factor[60..], [39096, 43008, 524288]);
    }

    #[test]
    fn bad_settings_are_errors_not_panics() {
        assert!(MemcachedSettings::from_args(&["-f"]).is_err());
        assert!(MemcachedSettings::from_args(&["-f", "0.5"]).is_err());
        assert!(MemcachedSettings::from_args(&["-f", "nan"]).is_err());
        assert!(MemcachedSettings::from_args(&["-I", "huge"]).is_err());
        assert!(MemcachedSettings::from_args(&["-o", "slab_chunk_max=x"]).is_err());
        assert_eq!(
            settings(&["-I", "2m", "-o", "modern,slab_chunk_max=1m"]).slab_chunk_max,
            1 << 20
        );
        assert_eq!(port_from_args(&["-u", "nobody", "-p", "11511"]), 11511);
        assert_eq!(port_from_args(&["--port=11600"]), 11600);
        assert_eq!(port_from_args::<&str>(&[]), 11211);
    }

    #[test]
    fn items_of_one_size_waste_what_their_class_rounds_off() {
        let s = MemcachedSettings::default();
        let classes = chunk_sizes(&s);
        // 48 + 10 + 1 + 70 + 2 + 8 = 139 bytes -> the 152-byte class.
        let item = s.item_size(10, 70);
        assert_eq!(item, 139);
        assert_eq!(allocated(&classes, 153), 192);
        assert_eq!(allocated(&classes, 2 * 524288 + 100), 2 * 524288 + 120);
        let mut sizes = SizeCounts::default();
        sizes.add(193, 1000);
        let fit = estimate(&s, &sizes);
        assert_eq!((fit.items, fit.chunk_bytes), (1000, 240_000));
        // 193 rounds to 200 (8-byte steps): 40 of 240 bytes lost.
        assert!((fit.waste_ratio - 40.0 / 240.0).abs() < 1e-9);
        assert_eq!(fit.dominant[0].chunk_size, 240);
        assert_eq!(fit.dominant[0].typical_item_size, 200);
        let better = fit.suggestion.expect("a class on the dominant size");
        let suggested = chunk_sizes(&MemcachedSettings {
            growth_factor: better.growth_factor,
            min_size: better.min_size,
            ..s.clone()
        });
        assert!(suggested.contains(&200), "{better:?}: {suggested:?}");
        assert!(better.waste_ratio < 0.01);
    }

    #[test]
    fn the_tracker_puts_an_item_in_the_class_memcached_does() {
        // key 10 + value 27: 48 + 10 + 1 + 27 + 2 + 8 = 96 bytes, exactly the first default
        // class; without CAS 88. Rounding key + value to 8 first would push it to 120.
        let mut tracker = SlabFitTracker::default();
        let server: std::net::SocketAddr = "127.0.0.1:11211".parse().unwrap();
        tracker.stored(0, server, 10, 27, 3);
        let name = |_| Some("memcached".to_string());
        for (cas, chunk) in [(true, 96), (false, 96)] {
            let local = LocalMemcached {
                pid: 1,
                port: 11211,
                settings: MemcachedSettings {
                    cas,
                    ..MemcachedSettings::default()
                },
            };
            let fit = &tracker.reports(&[local], name)[0].estimate;
            assert_eq!((fit.items, fit.chunk_bytes), (3, 3 * chunk), "cas {cas}");
            assert_eq!(fit.item_bytes, 3 * if cas { 96 } else { 88 });
        }
    }

    #[test]
    fn size_counts_stay_bounded() {
        let mut sizes = SizeCounts::default();
        for size in 0..200_000u64 {
            sizes.add(size * 8, 1);
        }
        assert!(sizes.iter().count() < SizeCounts::MAX_EXACT + 64 * 24);
        assert_eq!(sizes.total(), 200_000);
        assert!(sizes.coarsened > 0);
    }

    /// Chunk sizes memcached -vv prints at start, and the settings this module reads back
    /// from the process's own /proc cmdline.
    fn real_classes(args: &[&str]) -> (Vec<u64>, MemcachedSettings, std::process::Child, u16) {
        use std::io::BufRead;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = std::process::Command::new("memcached")
            .args(["-u", "nobody", "-l", "127.0.0.1", "-U", "0", "-vv", "-p"])
            .arg(port.to_string())
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("memcached (cargo xtask setup installs it)");
        let stderr = child.stderr.take().expect("piped");
        let mut classes = Vec::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.expect("memcached's stderr");
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["slab", "class", _, "chunk", "size", size, ..] => {
                    classes.push(size.parse().expect("a chunk size"))
                }
                _ if !classes.is_empty() => break,
                _ => {}
            }
        }
        let found = local_memcacheds(std::path::Path::new("/proc"))
            .into_iter()
            .find(|m| m.pid == child.id())
            .expect("the memcached just started is found in /proc");
        assert_eq!(found.port, port);
        (classes, found.settings, child, port)
    }

    /// The slab class `stats items` puts an item of this key and value length in.
    fn class_of_item(port: u16, key: &str, value_len: usize) -> usize {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("memcached");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let value = "v".repeat(value_len);
        write!(
            conn,
            "delete {key}\r\nset {key} 0 0 {value_len}\r\n{value}\r\nstats items\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with("END\r\n") {
            let n = conn.read(&mut buf).expect("an answer");
            assert!(n > 0, "memcached closed: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // The item replaced the one before it: it is the only one.
        text.lines()
            .filter_map(|l| l.strip_prefix("STAT items:"))
            .filter_map(|l| l.split_once(":number "))
            .filter(|(_, n)| n.trim() == "1")
            .map(|(class, _)| class.parse().expect("a class id"))
            .next()
            .expect("the item is counted")
    }

    #[test]
    #[ignore = "starts real memcached: run by `cargo xtask test` (host_ tests, as root)"]
    fn host_classes_and_item_sizes_match_real_memcached() {
        for args in [
            &[][..],
            &["-f", "1.1"],
            &["-n", "16"],
            &["-f", "2", "-n", "100"],
            &["-I", "4m"],
            &["-I", "256k", "-o", "slab_chunk_max=131072"],
            &["--slab-growth-factor=1.5", "-C"],
        ] {
            let (real, settings, mut child, port) = real_classes(args);
            let ours = chunk_sizes(&settings);
            assert_eq!(ours, real, "memcached {args:?}");
            // Items right at a class boundary land where item_size says they do.
            for value_len in [27usize, 28, 500, 5000] {
                let item = settings.item_size(10, value_len as u64);
                let chunk = allocated(&ours, item);
                let class = class_of_item(port, "key-123456", value_len);
                assert_eq!(
                    ours[class - 1],
                    chunk,
                    "memcached {args:?}: a {item}-byte item went to class {class}"
                );
            }
            child.kill().ok();
            child.wait().ok();
        }
    }
}
