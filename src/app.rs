//! The one wiring point: builds the registry and collectors from the settings, binds the
//! listeners, spawns every task, and drains them on shutdown.
//!
//! Uses everything; nothing uses it. `anyhow` is allowed here and in `main.rs` only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::actions::Verifier;
use crate::actions::exec::Services;
use crate::actions::playbook::Playbooks;
use crate::actions::runner::Actions;
use crate::advisor::Recommendations;
use crate::collect;
use crate::collect::host::HostCollector;
use crate::collect::http_probe::HttpProbeCollector;
use crate::collect::pgbouncer::PgBouncerCollector;
use crate::collect::postgres::{self, PostgresCollector};
use crate::collect::redis::{self, RedisCollector};
use crate::collect::scrape::ScrapeCollector;
use crate::http::admin::Admin;
use crate::http::auth::Auth;
use crate::http::intake::AlertIntake;
use crate::http::{self, AppState};
use crate::registry::Registry;
use crate::rules::{
    self,
    engine::{ActionRequest, Engine},
};
use crate::settings::Settings;
use crate::shutdown::{self, Signals};
use crate::targets::{PgHandle, RedisHandle};

/// How long requests in flight and collectors get to finish after SIGTERM. Service managers
/// wait 10 s (systemd 90 s) before SIGKILL; 5 s leaves a margin under both.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Connections per PostgreSQL target: one for the collector, one spare so a slow collection
/// and (later) an action never wait on each other. Two connections is what a monitoring tool
/// may take from a server whose max_connections is often 100.
const PG_POOL_SIZE: usize = 2;

/// Declares a collector (so readiness waits for it) and runs it on its schedule.
fn start<C: collect::Collector>(
    collector: C,
    timing: crate::settings::Timing,
    registry: &Arc<Registry>,
    shutdown: &crate::shutdown::Shutdown,
) -> tokio::task::JoinHandle<()> {
    registry.expect_collectors(&[collector.name()]);
    collect::spawn(collector, timing, registry.clone(), shutdown.clone())
}

/// Verification conditions evaluated by the rule engine's evaluator over the registry.
struct RegistryVerifier(Arc<Registry>);

impl Verifier for RegistryVerifier {
    fn holds(&self, expr: &str, labels: &crate::sample::Labels) -> Result<bool, String> {
        use rules::expr::{Evaluator, NAME, Query, Value};
        let query = Query::parse(expr)?;
        let value = Evaluator::new(self.0.as_ref(), collect::now_ms()).eval(&query)?;
        Ok(match value {
            Value::Scalar(x) => x != 0.0 && !x.is_nan(),
            // An aggregated condition (fewer labels) speaks for every instance; a labelled one
            // only for the instance whose labels it shares.
            Value::Vector(v) => v.iter().any(|s| {
                s.labels
                    .iter()
                    .filter(|(k, _)| *k != NAME)
                    .all(|(k, v)| labels.get(k).is_none_or(|mine| mine == v))
            }),
            Value::Matrix(_) | Value::String(_) => {
                return Err("a verification condition must be an instant vector".into());
            }
        })
    }

    fn value(&self, expr: &str) -> Result<Option<f64>, String> {
        use rules::expr::{Evaluator, Query, Value};
        let query = Query::parse(expr)?;
        match Evaluator::new(self.0.as_ref(), collect::now_ms()).eval(&query)? {
            Value::Scalar(x) => Ok(Some(x)),
            Value::Vector(v) => Ok(v.first().map(|s| s.value)),
            Value::Matrix(_) | Value::String(_) => {
                Err("a value must be an instant vector or a scalar".into())
            }
        }
    }
}

/// Connections for the actions: a pool of one per PostgreSQL target, apart from the
/// collector's (an action's long statement never delays a collection, and its timeouts are
/// its own), and the Redis targets' handles.
fn action_services(settings: &Settings) -> anyhow::Result<Services> {
    let mut services = Services {
        exec_allow: settings.config.actions.exec_allow.clone(),
        slow_threshold: settings.config.postgres.slow_query_threshold,
        http: reqwest::Client::builder()
            .user_agent(concat!("autotuner/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client for actions")?,
        ..Services::default()
    };
    let timeout = settings.config.actions.timeout;
    for target in &settings.config.postgres.targets {
        let handle = PgHandle::new(target, timeout, Duration::from_secs(5).min(timeout), 1)
            .map_err(|f| anyhow::anyhow!("PostgreSQL target {}: {}", target.name, f.message))?;
        services.postgres.insert(target.name.clone(), handle);
    }
    for target in &settings.config.redis.targets {
        let handle = RedisHandle::new(target, Duration::from_secs(5).min(timeout))
            .map_err(|f| anyhow::anyhow!("Redis target {}: {}", target.name, f.message))?;
        services.redis.insert(target.name.clone(), handle);
    }
    Ok(services)
}

/// How often the actions stage is told which rules exist (a deleted or renamed rule's
/// Alertmanager alerts are then resolved).
const RULE_NAMES_EVERY: Duration = Duration::from_secs(2);

/// Tells the actions stage the current rule names (once at start, so that alerts restored from
/// before a restart whose rule is gone are resolved, and whenever they change) and the firing
/// instances (so that an alert whose resolution was lost is resolved). The engine's status is
/// read on the blocking pool (it waits for a rule tick).
async fn tell_rules(
    engine: Arc<Engine>,
    actions: Actions,
    mut shutdown: crate::shutdown::Shutdown,
) {
    type Firing = std::collections::HashSet<(String, std::collections::BTreeMap<String, String>)>;
    let mut tick = tokio::time::interval(RULE_NAMES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<std::collections::HashSet<String>> = None;
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let e = engine.clone();
        let seen_ms = collect::now_ms();
        let Ok((names, firing)) = tokio::task::spawn_blocking(move || {
            let mut names = std::collections::HashSet::new();
            let mut firing = Firing::new();
            for r in e.status() {
                for i in r.instances {
                    if matches!(i.state, rules::state::State::Firing { .. }) {
                        firing.insert((r.name.clone(), i.labels));
                    }
                }
                names.insert(r.name);
            }
            (names, firing)
        })
        .await
        else {
            continue;
        };
        if last.as_ref() != Some(&names) {
            actions.rules_changed(&names).await;
            last = Some(names);
        }
        actions.firing_now(seen_ms, &firing).await;
    }
}

/// Runs the exporter until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut signals = Signals::install().context("installing signal handlers")?;
    let registry = Arc::new(
        Registry::new(settings.config.history_retention).context("building the registry")?,
    );
    // Read before binding: a broken web configuration stops the start, never serves unprotected.
    let web = match &settings.web_config_file {
        Some(path) => Some(Arc::new(
            http::webconfig::WebConfig::load(path)
                .map_err(|e| anyhow::anyhow!("--web.config.file: {e}"))?,
        )),
        None => None,
    };
    if let Some(w) = &web {
        for m in w.metrics() {
            registry
                .register(Box::new(m))
                .context("registering the web configuration's metrics")?;
        }
    }
    let listeners = http::bind(&settings.listen).await?;
    let (trigger, shutdown) = shutdown::channel();

    let mut tasks = Vec::new();
    if let Some(host) = settings.config.host.clone() {
        let schedule = host.timing;
        let collector = HostCollector::new(host).context("starting the host collector")?;
        tasks.push(start(collector, schedule, &registry, &shutdown));
    }

    for target in &settings.config.redis.targets {
        let redis = &settings.config.redis;
        let handle = RedisHandle::new(target, redis::run_deadline(redis.timing.timeout))
            .map_err(|f| anyhow::anyhow!("Redis target {}: {}", target.name, f.message))?;
        let collector = RedisCollector::new(handle, redis.timing.timeout, redis.hit_ratio_window);
        tasks.push(start(collector, redis.timing, &registry, &shutdown));
    }

    let pg = &settings.config.postgres;
    for target in &pg.targets {
        let handle = PgHandle::new(
            target,
            postgres::statement_timeout(pg.timing.timeout),
            postgres::run_deadline(pg.timing.timeout),
            PG_POOL_SIZE,
        )
        .map_err(|f| anyhow::anyhow!("PostgreSQL target {}: {}", target.name, f.message))?;
        let collector = PostgresCollector::new(handle, pg.clone());
        tasks.push(start(collector, pg.timing, &registry, &shutdown));
    }
    let bouncer = &settings.config.pgbouncer;
    for target in &bouncer.targets {
        let collector = PgBouncerCollector::new(target, bouncer.timing.timeout);
        tasks.push(start(collector, bouncer.timing, &registry, &shutdown));
    }

    let probes = &settings.config.http_probe;
    if !probes.targets.is_empty() {
        let collector = HttpProbeCollector::new(&probes.targets, probes.error_ratio_window)
            .context("starting the HTTP probes")?;
        tasks.push(start(collector, probes.timing, &registry, &shutdown));
    }

    let scrape = &settings.config.scrape;
    for target in &scrape.targets {
        let timing = crate::settings::Timing {
            interval: target.interval,
            timeout: collect::scrape::schedule_timeout(target),
        };
        let collector = ScrapeCollector::new(target.clone(), registry.clone(), scrape.republish)
            .context("starting a scrape target")?;
        tasks.push(start(collector, timing, &registry, &shutdown));
    }

    // The rule engine, its reload triggers (file watcher, SIGHUP, POST /-/reload) funnelled into
    // one channel, and the actions stage that takes its requests.
    let data_dir = match std::fs::create_dir_all(&settings.data_dir) {
        Ok(()) => Some(settings.data_dir.as_path()),
        Err(err) => {
            tracing::error!(dir = %settings.data_dir.display(), error = %err, "data directory unusable: rule state will not survive a restart, and no action will run");
            None
        }
    };
    // Received alerts held before a restart are published before the first rule tick, so a rule
    // firing on one does not resolve for want of it.
    let intake = Arc::new(AlertIntake::restore(
        registry.clone(),
        data_dir,
        crate::collect::now_ms(),
    ));
    tasks.push(tokio::spawn(intake.clone().run(shutdown.clone())));
    let (request_tx, request_rx) = tokio::sync::mpsc::channel::<ActionRequest>(1024);
    let engine = Engine::with_declared(
        registry.clone(),
        settings.rules_dir.clone(),
        data_dir,
        request_tx,
        Some(
            settings
                .config
                .knobs
                .iter()
                .map(|k| k.name.clone())
                .collect(),
        ),
        Some(
            settings
                .config
                .sources
                .iter()
                .map(|s| s.name.clone())
                .collect(),
        ),
    )
    .context("starting the rule engine")?;
    let mut sources = Vec::new();
    for s in &settings.config.sources {
        sources.push(rules::source::Source::new(s.clone()).map_err(|e| anyhow::anyhow!(e))?);
    }
    let source_metrics =
        rules::source::SourceMetrics::new(&registry).context("registering the sources' metrics")?;
    tasks.push(tokio::spawn(rules::source::run(
        engine.clone(),
        sources,
        source_metrics,
        shutdown.clone(),
    )));
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = match rules::engine::watch(&settings.rules_dir, reload_tx.clone()) {
        Ok(w) => Some(w),
        Err(err) => {
            tracing::warn!(dir = %settings.rules_dir.display(), error = %err, "not watching the rules directory; reload with SIGHUP or POST /-/reload");
            None
        }
    };
    let mut hup = signals.reloads();
    let hup_tx = reload_tx.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_ok() {
            let _ = hup_tx.try_send(());
        }
    });
    tasks.push(tokio::spawn(
        engine.clone().run(reload_rx, shutdown.clone()),
    ));
    let (path, named) = &settings.playbooks_file;
    let playbooks = Playbooks::load(path, *named)
        .map_err(|errors| anyhow::anyhow!("invalid playbooks:\n  {}", errors.join("\n  ")))?;
    let recommendations = Arc::new(Recommendations::new());
    let mut services = action_services(&settings)?;
    services.advice = Some(recommendations.clone());
    services.registry = Some(registry.clone());
    // The actions stage judges the data directory itself: without a usable one it runs no
    // action and says why (at start and on /api/v1/status).
    let actions = Actions::with_playbooks(
        settings.config.actions.clone(),
        &settings.config.knobs,
        services,
        Some(settings.data_dir.as_path()),
        Some(Arc::new(RegistryVerifier(registry.clone()))),
        &registry,
        playbooks,
    )
    .context("starting the actions stage")?;
    let auth = Auth::new(
        std::env::var("AUTOTUNER_READ_TOKEN").ok(),
        std::env::var("AUTOTUNER_OPERATE_TOKEN").ok(),
        settings.tokens_file.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("admin API tokens: {e}"))?;
    registry
        .register(Box::new(auth.metric()))
        .context("registering the admin API's metrics")?;
    if let Some(c) = crate::statefile::error_counter() {
        registry
            .register(c)
            .context("registering the state files' metrics")?;
    }
    if let Some(c) = crate::audit::rotation_error_counter() {
        registry
            .register(c)
            .context("registering the audit log's metrics")?;
    }
    let admin = Admin {
        actions: Some(actions.clone()),
        auth: Arc::new(auth),
        intake,
    };
    tasks.push(tokio::spawn(actions.clone().run_schedules(
        data_dir.map(std::path::Path::to_path_buf),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(
        actions.clone().run(request_rx, shutdown.clone()),
    ));
    tasks.push(tokio::spawn(tell_rules(
        engine.clone(),
        actions.clone(),
        shutdown.clone(),
    )));

    let router = http::router(AppState {
        registry: registry.clone(),
        telemetry_path: settings.telemetry_path.clone(),
        started,
        engine: Some(engine.clone()),
        recommendations: Some(recommendations),
        admin: Some(Arc::new(admin)),
    });
    let router = match &web {
        Some(w) => router.layer(axum::middleware::from_fn_with_state(
            w.clone(),
            http::webconfig::middleware,
        )),
        None => router,
    };
    let tls = web.as_ref().is_some_and(|w| w.tls());
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(address = %addr, telemetry_path = %settings.telemetry_path, tls, "listening");
        }
    }
    let server = tokio::spawn(http::serve(
        listeners,
        router,
        shutdown.clone(),
        SHUTDOWN_GRACE,
        web,
    ));

    let reason = signals.next_stop().await;
    tracing::info!(signal = ?reason, "shutting down");
    trigger.trigger();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        for task in tasks {
            let _ = task.await;
        }
        let _ = server.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("tasks still running after the grace period; exiting anyway");
    }
    tracing::info!("stopped");
    Ok(())
}
