//! The host collector: CPU, memory, swap, load, filesystems and network interfaces, read with
//! sysinfo from `/proc` and `statvfs`.
//!
//! Owns the `host_*` metric names (README "Metrics" is the reference). Uses `sample`,
//! `settings::HostConfig` and the `Collector` trait; nothing else.
//!
//! sysinfo's calls are blocking (`statvfs` on a dead network mount can hang for minutes), so a
//! collection runs on tokio's blocking pool. The state sits behind a mutex taken with `try_lock`:
//! if a hung run still holds it when the next one is due, the next one fails fast ("previous
//! collection still running") instead of stacking another stuck thread.

use std::sync::{Arc, Mutex, TryLockError};
use std::time::Instant;

use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

use super::{CollectError, Collector};
use crate::sample::Families;
use crate::settings::HostConfig;

/// Measures the machine it runs on.
pub struct HostCollector {
    state: Arc<Mutex<State>>,
}

struct State {
    config: HostConfig,
    system: System,
    disks: Disks,
    networks: Networks,
    /// When CPU times were last read: usage is the difference between two readings, and
    /// sysinfo ignores a reading taken sooner than `MINIMUM_CPU_UPDATE_INTERVAL` after the last.
    cpu_read_at: Instant,
}

impl HostCollector {
    /// Prepares the collector and takes the first CPU reading, so the first collection already
    /// reports real usage.
    pub fn new(config: HostConfig) -> Result<Self, CollectError> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::everything()),
        )
        .map_err(|err| CollectError(format!("reading system information: {err}")))?;
        let disks = Disks::new_with_refreshed_list()
            .map_err(|err| CollectError(format!("listing filesystems: {err}")))?;
        let networks = Networks::new_with_refreshed_list()
            .map_err(|err| CollectError(format!("listing network interfaces: {err}")))?;
        Ok(HostCollector {
            state: Arc::new(Mutex::new(State {
                config,
                system,
                disks,
                networks,
                cpu_read_at: Instant::now(),
            })),
        })
    }
}

impl Collector for HostCollector {
    fn name(&self) -> &str {
        "host"
    }

    async fn collect(&mut self) -> Result<Families, CollectError> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || match state.try_lock() {
            Ok(mut state) => Ok(state.collect()),
            Err(TryLockError::WouldBlock) => Err(CollectError(
                "previous collection still running (a filesystem may be hanging)".into(),
            )),
            // A panic inside sysinfo poisoned the lock; the readings it guards are refreshed
            // from scratch on every run, so carrying on is safe.
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner().collect()),
        })
        .await
        .map_err(|err| CollectError(format!("host collection task failed: {err}")))?
    }
}

impl State {
    fn collect(&mut self) -> Families {
        let mut out = Families::new();
        self.cpu(&mut out);
        self.memory(&mut out);
        load(&mut out);
        self.filesystems(&mut out);
        self.network(&mut out);
        out
    }

    fn cpu(&mut self, out: &mut Families) {
        // Only the very first collection can come this soon after the priming reading.
        let since = self.cpu_read_at.elapsed();
        if since < sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
            std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL - since);
        }
        self.system.refresh_cpu_usage();
        self.cpu_read_at = Instant::now();
        let cpus = self.system.cpus();
        out.gauge(
            "host_cpus",
            "Number of logical CPUs.",
            &[],
            cpus.len() as f64,
        );
        out.gauge(
            "host_cpu_usage_ratio",
            "Share of time all CPUs were busy (not idle or waiting for I/O) since the previous collection, 0 to 1.",
            &[],
            ratio(f64::from(self.system.global_cpu_usage()) / 100.0),
        );
        for (i, cpu) in cpus.iter().enumerate() {
            let index = i.to_string();
            out.gauge(
                "host_cpu_core_usage_ratio",
                "Share of time one logical CPU was busy since the previous collection, 0 to 1.",
                &[("cpu", &index)],
                ratio(f64::from(cpu.usage()) / 100.0),
            );
        }
        if let Ok(boot) = System::boot_time() {
            out.gauge(
                "host_boot_time_seconds",
                "When the machine booted, in seconds since the Unix epoch.",
                &[],
                boot as f64,
            );
        }
    }

    fn memory(&mut self, out: &mut Families) {
        self.system.refresh_memory();
        let total = self.system.total_memory() as f64;
        let available = self.system.available_memory() as f64;
        out.gauge(
            "host_memory_total_bytes",
            "Physical memory (MemTotal).",
            &[],
            total,
        );
        out.gauge(
            "host_memory_available_bytes",
            "Memory available to start new work without swapping (MemAvailable).",
            &[],
            available,
        );
        if total > 0.0 {
            out.gauge(
                "host_memory_usage_ratio",
                "Share of memory in use: 1 - MemAvailable / MemTotal.",
                &[],
                ratio(1.0 - available / total),
            );
        }
        let swap_total = self.system.total_swap() as f64;
        let swap_free = self.system.free_swap() as f64;
        out.gauge(
            "host_swap_total_bytes",
            "Swap space (SwapTotal).",
            &[],
            swap_total,
        );
        out.gauge(
            "host_swap_free_bytes",
            "Unused swap space (SwapFree).",
            &[],
            swap_free,
        );
        // Without swap there is no usage to speak of: absent, not 0 or NaN.
        if swap_total > 0.0 {
            out.gauge(
                "host_swap_usage_ratio",
                "Share of swap in use: 1 - SwapFree / SwapTotal.",
                &[],
                ratio(1.0 - swap_free / swap_total),
            );
        }
    }

    fn filesystems(&mut self, out: &mut Families) {
        // Re-reading the mount table catches filesystems mounted or unmounted since last time.
        self.disks.refresh(true);
        let cfg = &self.config;
        for disk in self.disks.iter() {
            let mountpoint = disk.mount_point().to_string_lossy();
            let fstype = disk.file_system().to_string_lossy();
            let device = disk.name().to_string_lossy();
            if cfg.mount_points_exclude.is_match(&mountpoint)
                || cfg.fs_types_exclude.is_match(&fstype)
            {
                continue;
            }
            let labels = [
                ("device", device.as_ref()),
                ("mountpoint", mountpoint.as_ref()),
                ("fstype", fstype.as_ref()),
            ];
            let size = disk.total_space() as f64;
            let available = disk.available_space() as f64;
            out.gauge(
                "host_disk_size_bytes",
                "Filesystem size (f_blocks * f_frsize).",
                &labels,
                size,
            );
            out.gauge(
                "host_disk_available_bytes",
                "Filesystem space available to unprivileged users (f_bavail * f_frsize).",
                &labels,
                available,
            );
            if size > 0.0 {
                out.gauge(
                    "host_disk_usage_ratio",
                    "Share of the filesystem not available to unprivileged users: 1 - available / size (reserved blocks count as used, as in the node-mixin alerts).",
                    &labels,
                    ratio(1.0 - available / size),
                );
            }
            out.gauge(
                "host_disk_readonly",
                "1 when the filesystem is mounted read-only.",
                &labels,
                if disk.is_read_only() { 1.0 } else { 0.0 },
            );
        }
    }

    fn network(&mut self, out: &mut Families) {
        self.networks.refresh(true);
        let exclude = self.config.network_devices_exclude.as_ref();
        let mut names: Vec<_> = self.networks.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, data) in names {
            let device = name.to_string_lossy();
            if exclude.is_some_and(|re| re.is_match(&device)) {
                continue;
            }
            let labels = [("device", device.as_ref())];
            out.counter(
                "host_network_receive_bytes_total",
                "Bytes received on the interface.",
                &labels,
                data.total_received() as f64,
            );
            out.counter(
                "host_network_transmit_bytes_total",
                "Bytes sent on the interface.",
                &labels,
                data.total_transmitted() as f64,
            );
            out.counter(
                "host_network_receive_errors_total",
                "Receive errors on the interface.",
                &labels,
                data.total_errors_on_received() as f64,
            );
            out.counter(
                "host_network_transmit_errors_total",
                "Transmit errors on the interface.",
                &labels,
                data.total_errors_on_transmitted() as f64,
            );
        }
    }
}

fn load(out: &mut Families) {
    if let Ok(avg) = System::load_average() {
        out.gauge("host_load1", "1-minute load average.", &[], avg.one);
        out.gauge("host_load5", "5-minute load average.", &[], avg.five);
        out.gauge("host_load15", "15-minute load average.", &[], avg.fifteen);
    }
}

/// Clamps to 0..1: rounding in the sources can land a hair outside, and a ratio alert on 1.0000001
/// helps nobody.
fn ratio(v: f64) -> f64 {
    if v.is_nan() { v } else { v.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Config;

    #[tokio::test]
    async fn collects_the_documented_gauges_on_this_machine() {
        let config = Config::parse("").unwrap().host.unwrap();
        let mut c = HostCollector::new(config).unwrap();
        let families = c.collect().await.unwrap().into_vec();
        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        for want in [
            "host_cpus",
            "host_cpu_usage_ratio",
            "host_cpu_core_usage_ratio",
            "host_memory_total_bytes",
            "host_memory_available_bytes",
            "host_memory_usage_ratio",
            "host_load1",
            "host_disk_size_bytes",
            "host_disk_usage_ratio",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for f in &families {
            if f.name.ends_with("_ratio") {
                for s in &f.samples {
                    assert!((0.0..=1.0).contains(&s.value), "{} {}", f.name, s.value);
                }
            }
        }
        let disks = families
            .iter()
            .find(|f| f.name == "host_disk_size_bytes")
            .unwrap();
        assert!(
            disks
                .samples
                .iter()
                .any(|s| s.labels.get("mountpoint") == Some("/")),
            "root filesystem missing: {disks:?}"
        );
        assert!(disks.samples.iter().all(|s| {
            !s.labels
                .get("mountpoint")
                .unwrap_or("")
                .starts_with("/proc")
        }),);
    }

    #[test]
    fn ratios_are_clamped() {
        assert_eq!(ratio(1.0000001), 1.0);
        assert_eq!(ratio(-0.0001), 0.0);
        assert_eq!(ratio(0.5), 0.5);
    }
}
