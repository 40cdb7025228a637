//! autotuner measures a service's host (and, as it grows, PostgreSQL, PgBouncer and Redis),
//! publishes what it measures on `/metrics` for Prometheus, and corrects what goes wrong by
//! rules that operators write in YAML.
//!
//! # The flow
//!
//! ```text
//!   host (sysinfo) ...            ① collect: one task per collector, on its own interval
//!         │  Families (name, help, kind, samples)
//!         ▼
//!   registry: latest snapshot per collector + bounded history ──▶ GET /metrics
//!         │ read-only
//!         ▼
//!   ② rules (PromQL conditions, state) ──ActionRequest──▶ ③ actions (gate, executors,
//!                                                         knobs) ──▶ ④ audit (JSON Lines)
//! ```
//!
//! # Layout
//!
//! - `main.rs`: the binary edge (flags, logging, exit codes).
//! - [`app`]: the one wiring point; nothing imports it.
//! - [`settings`]: flags and the configuration file, validated once.
//! - [`yaml`]: located YAML decoding (every error with line and column).
//! - [`shutdown`]: the shutdown token and OS signals.
//! - [`statefile`]: durable, single-writer state files in the data directory.
//! - [`sample`]: samples, label sets, families.
//! - [`registry`]: latest snapshots, history, the exposition and the self-metrics.
//! - [`targets`]: connection handles to the monitored services, shared by collectors and
//!   actions.
//! - [`collect`]: the `Collector` trait, the scheduler, and one module per source.
//! - [`rules`]: rule files, PromQL evaluation, the state machine, the engine and reload.
//! - [`actions`]: the gate, the knobs, the executors and the runner.
//! - [`audit`]: the append-only decision log.
//! - [`http`]: the router and its handlers.
//!
//! # The dependency rule
//!
//! Data flows one way: collect → registry → rules → actions → audit. A stage uses the shared
//! base (`sample`, `registry`, `settings`, `shutdown`, `statefile`, `targets`, `yaml`) and the input types of the next
//! stage only. Collectors never see rules; actions never import rules; audit imports nothing of
//! ours; `http` reads the registry; nothing imports `app`.

pub mod actions;
pub mod advisor;
pub mod app;
pub mod audit;
pub mod collect;
pub mod http;
pub mod pgtls;
pub mod registry;
pub mod rules;
pub mod sample;
pub mod settings;
pub mod shutdown;
pub mod statefile;
pub mod targets;
pub mod yaml;
