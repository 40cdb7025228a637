//! The executors: each action kind carried out against the real service, bounded (key counts,
//! row budgets, time budgets, server-side timeouts) and reporting what it did as JSON for the
//! audit log. The gate has already said yes when these run; the runner times them out.
//!
//! Uses `targets` (connection handles), `sample` (templates), `advisor` (ANALYZE, index advice)
//! and its parent's specs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{
    ActionRequest, ActionSpec, CacheWarm, Exec, PgTerminateIdle, RedisEvict, RetentionDelete,
    SqlAction, Webhook,
};
use crate::sample::template;
use crate::targets::{PG_APPLICATION_NAME, PgHandle, RedisHandle, error_chain};

/// The services actions reach.
#[derive(Clone, Default)]
pub struct Services {
    /// PostgreSQL targets by name (each with a pool of its own, apart from the collector's).
    pub postgres: BTreeMap<String, PgHandle>,
    /// Redis targets by name.
    pub redis: BTreeMap<String, RedisHandle>,
    /// For webhooks and Alertmanager.
    pub http: reqwest::Client,
    /// Programs `exec` may run.
    pub exec_allow: Vec<String>,
    /// A statement slower than this on average is slow (the PostgreSQL collector's threshold),
    /// for the index advisor.
    pub slow_threshold: Duration,
    /// Where index advice is kept for the API.
    pub advice: Option<std::sync::Arc<crate::advisor::Recommendations>>,
    /// Where the advice's metric is published.
    pub registry: Option<std::sync::Arc<crate::registry::Registry>>,
}

/// What an action did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// State before, where it has one.
    pub before: Value,
    /// State after.
    pub after: Value,
    /// What it reports.
    pub result: Value,
}

fn pick<'a, T>(
    kind: &str,
    map: &'a BTreeMap<String, T>,
    name: Option<&str>,
) -> Result<&'a T, String> {
    match name {
        Some(n) => map
            .get(n)
            .ok_or_else(|| format!("no {kind} target named {n:?}")),
        None if map.len() == 1 => map.values().next().ok_or_else(|| "unreachable".into()),
        None => map.get("default").ok_or_else(|| {
            format!(
                "{} {kind} targets and none named: name one with `target:`",
                map.len()
            )
        }),
    }
}

impl Services {
    /// A PostgreSQL target by name, or the only (or `default`) one.
    pub fn pg(&self, name: Option<&str>) -> Result<&PgHandle, String> {
        pick("PostgreSQL", &self.postgres, name)
    }

    /// A Redis target by name, or the only (or `default`) one.
    pub fn redis(&self, name: Option<&str>) -> Result<&RedisHandle, String> {
        pick("Redis", &self.redis, name)
    }
}

/// What an action acts on: the unit of "one action in flight" and of the per-target limit.
pub fn target_of(spec: &ActionSpec, services: &Services) -> String {
    let pg = |t: &Option<String>| {
        services.pg(t.as_deref()).map_or_else(
            |_| format!("postgres/{}", t.as_deref().unwrap_or("?")),
            |h| format!("postgres/{}", h.name),
        )
    };
    let redis = |t: &Option<String>| {
        services.redis(t.as_deref()).map_or_else(
            |_| format!("redis/{}", t.as_deref().unwrap_or("?")),
            |h| format!("redis/{}", h.name),
        )
    };
    let host = |u: &str| {
        url::Url::parse(u).map_or_else(
            |_| "http/?".to_owned(),
            |u| {
                format!(
                    "http/{}:{}",
                    u.host_str().unwrap_or("?"),
                    u.port_or_known_default().unwrap_or(0)
                )
            },
        )
    };
    match spec {
        ActionSpec::Sql(a) => pg(&a.target),
        ActionSpec::PgTerminateIdle(a) => pg(&a.target),
        ActionSpec::PgAnalyze(a) => pg(&a.target),
        ActionSpec::IndexAdvice(a) => pg(&a.target),
        ActionSpec::RetentionDelete(a) => pg(&a.target),
        ActionSpec::Redis(a) => redis(&a.target),
        ActionSpec::RedisEvict(a) => redis(&a.target),
        ActionSpec::RedisMemoryPurge(a) => redis(&a.target),
        // Warming writes to Redis: that is the side it loads.
        ActionSpec::CacheWarm(a) => redis(&a.redis),
        ActionSpec::Knob(k) => format!("knob/{}", k.name),
        ActionSpec::Webhook(w) => host(&w.url),
        ActionSpec::Alertmanager(a) => host(&a.url),
        ActionSpec::Exec(e) => format!("exec/{}", e.command.first().map_or("?", String::as_str)),
    }
}

fn labels_map(req: &ActionRequest) -> BTreeMap<String, String> {
    req.labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn pg_err(h: &PgHandle, e: &tokio_postgres::Error) -> String {
    h.failure(e).message
}

fn redis_err(h: &RedisHandle, e: &redis::RedisError) -> String {
    h.failure(e).message
}

/// `sql`: one statement with its parameters (sent as text: cast them in the statement, e.g.
/// `$1::int`) under a server-side `statement_timeout`, in a transaction that commits.
pub async fn sql(s: &Services, a: &SqlAction, req: &ActionRequest) -> Result<Outcome, String> {
    let h = s.pg(a.target.as_deref())?;
    let mut client = h.client().await.map_err(|f| f.message)?;
    let labels = labels_map(req);
    let params: Vec<String> = a
        .params
        .iter()
        .map(|p| template(p, &labels, req.value))
        .collect();
    let timeout = a.timeout.map_or(Duration::from_secs(10), |d| d.0);
    let tx = client.transaction().await.map_err(|e| pg_err(h, &e))?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().max(1)
    ))
    .await
    .map_err(|e| pg_err(h, &e))?;
    let types = vec![tokio_postgres::types::Type::TEXT; params.len()];
    let stmt = tx
        .prepare_typed(&a.query, &types)
        .await
        .map_err(|e| pg_err(h, &e))?;
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
        .iter()
        .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = tx.execute(&stmt, &refs).await.map_err(|e| pg_err(h, &e))?;
    tx.commit().await.map_err(|e| pg_err(h, &e))?;
    Ok(Outcome {
        result: json!({ "rows": rows }),
        ..Outcome::default()
    })
}

/// `redis`: one command.
pub async fn redis_command(
    s: &Services,
    command: &[String],
    target: Option<&str>,
    req: &ActionRequest,
) -> Result<Outcome, String> {
    let h = s.redis(target)?;
    let labels = labels_map(req);
    let Some((name, args)) = command.split_first() else {
        return Err("empty command".into());
    };
    let mut cmd = redis::cmd(name);
    for a in args {
        cmd.arg(template(a, &labels, req.value));
    }
    let mut conn = h.connection();
    let reply: redis::Value = cmd
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err(h, &e))?;
    Ok(Outcome {
        result: json!({ "reply": format!("{reply:?}") }),
        ..Outcome::default()
    })
}

/// `redis_evict`: SCAN MATCH + UNLINK, at most `max_keys` keys and `time_budget`.
pub async fn redis_evict(s: &Services, a: &RedisEvict) -> Result<Outcome, String> {
    let h = s.redis(a.target.as_deref())?;
    let budget = a.time_budget.map_or(Duration::from_secs(5), |d| d.0);
    let started = Instant::now();
    let mut conn = h.connection();
    let before: u64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err(h, &e))?;
    let mut cursor: u64 = 0;
    let mut deleted: u64 = 0;
    let mut scanned: u64 = 0;
    let mut stopped = "complete";
    loop {
        // SCAN's COUNT is a hint of work per call: 500 keeps each call well under a
        // millisecond on the server, so the cleanup never blocks other clients.
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&a.pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_err(h, &e))?;
        scanned += keys.len() as u64;
        let room = a.max_keys.saturating_sub(deleted);
        let take: Vec<String> = keys
            .into_iter()
            .take(usize::try_from(room).unwrap_or(usize::MAX))
            .collect();
        if !take.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&take)
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_err(h, &e))?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
        if deleted >= a.max_keys {
            stopped = "max_keys";
            break;
        }
        if started.elapsed() >= budget {
            stopped = "time_budget";
            break;
        }
    }
    let after: u64 = redis::cmd("DBSIZE")
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err(h, &e))?;
    Ok(Outcome {
        before: json!({ "keys": before }),
        after: json!({ "keys": after }),
        result: json!({ "deleted": deleted, "matched_seen": scanned, "stopped": stopped }),
    })
}

/// A numeric field of one INFO section.
async fn info_number(h: &RedisHandle, section: &str, field: &str) -> Result<Option<u64>, String> {
    let mut conn = h.connection();
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err(h, &e))?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok()))
}

async fn used_memory_rss(h: &RedisHandle) -> Result<Option<u64>, String> {
    info_number(h, "memory", "used_memory_rss").await
}

/// `used_memory_rss` as the purge left it. INFO reports what Redis's cron last sampled (every
/// 100 ms, or every 1000/hz ms when `hz` is below 10), so a reading right after the purge may
/// predate it and record that the purge changed nothing. The first reading that differs from
/// the one right after the purge comes from a later sample, hence after the purge; when none
/// differs within three sampling periods, there was nothing to see.
async fn used_memory_rss_after_purge(h: &RedisHandle) -> Result<Option<u64>, String> {
    let first = used_memory_rss(h).await?;
    let hz = info_number(h, "server", "hz")
        .await?
        .unwrap_or(10)
        .clamp(1, 500);
    let period = Duration::from_millis((1000 / hz).max(100));
    let deadline = Instant::now() + period * 3;
    while Instant::now() < deadline {
        tokio::time::sleep(period / 4).await;
        let now = used_memory_rss(h).await?;
        if now != first {
            return Ok(now);
        }
    }
    Ok(first)
}

/// `redis_memory_purge`: `MEMORY PURGE` (jemalloc returns freed pages to the OS).
pub async fn redis_memory_purge(s: &Services, target: Option<&str>) -> Result<Outcome, String> {
    let h = s.redis(target)?;
    let before = used_memory_rss(h).await?;
    let mut conn = h.connection();
    let _: redis::Value = redis::cmd("MEMORY")
        .arg("PURGE")
        .query_async(&mut conn)
        .await
        .map_err(|e| redis_err(h, &e))?;
    let after = used_memory_rss_after_purge(h).await?;
    Ok(Outcome {
        before: json!({ "used_memory_rss": before }),
        after: json!({ "used_memory_rss": after }),
        result: json!({ "purged": true }),
    })
}

/// Fills `{{ column }}` in a key template from a row (as JSON).
fn row_template(text: &str, row: &serde_json::Map<String, Value>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            return Err(format!("unclosed `{{{{` in {text:?}"));
        };
        let col = rest[start + 2..start + end].trim();
        match row.get(col) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Null) | None => {
                return Err(format!("column {col:?} is missing or NULL"));
            }
            Some(v) => out.push_str(&v.to_string()),
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `cache_warm`: the rows of a query written to Redis keys with a TTL, in pipelined batches.
pub async fn cache_warm(s: &Services, a: &CacheWarm) -> Result<Outcome, String> {
    let pg = s.pg(a.postgres.as_deref())?;
    let redis_h = s.redis(a.redis.as_deref())?;
    let max_rows = a.max_rows.unwrap_or(10_000);
    let client = pg.client().await.map_err(|f| f.message)?;
    // Each row as JSON, whatever its column types; the operator's query is a subquery, so
    // its own LIMIT and ORDER BY hold and ours only bounds it.
    let wrapped = format!(
        "SELECT row_to_json(q)::text FROM ({}) AS q LIMIT {max_rows}",
        a.query.trim().trim_end_matches(';')
    );
    let rows = client
        .query(&wrapped, &[])
        .await
        .map_err(|e| pg_err(pg, &e))?;
    let ttl = a.ttl.0.as_millis().max(1) as u64;
    let mut conn = redis_h.connection();
    let mut written = 0u64;
    let mut skipped = 0u64;
    let mut first_error = None;
    for chunk in rows.chunks(500) {
        let mut pipe = redis::pipe();
        let mut n = 0;
        for row in chunk {
            let text: String = row.try_get(0).map_err(|e| pg_err(pg, &e))?;
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&text) else {
                skipped += 1;
                continue;
            };
            let key = match row_template(&a.key, &map) {
                Ok(k) => k,
                Err(e) => {
                    skipped += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let value = match &a.value {
                None => text.clone(),
                Some(v) if v.contains("{{") => match row_template(v, &map) {
                    Ok(x) => x,
                    Err(e) => {
                        skipped += 1;
                        first_error.get_or_insert(e);
                        continue;
                    }
                },
                Some(col) => match map.get(col) {
                    Some(Value::String(x)) => x.clone(),
                    Some(Value::Null) | None => {
                        skipped += 1;
                        first_error.get_or_insert(format!("column {col:?} is missing or NULL"));
                        continue;
                    }
                    Some(x) => x.to_string(),
                },
            };
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .ignore();
            n += 1;
        }
        if n > 0 {
            let _: () = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| redis_err(redis_h, &e))?;
            written += n;
        }
    }
    Ok(Outcome {
        result: json!({
            "rows": rows.len(),
            "written": written,
            "skipped": skipped,
            "ttl_ms": ttl,
            "first_error": first_error,
        }),
        ..Outcome::default()
    })
}

/// `pg_terminate_idle`: idle (or idle-in-transaction) client connections older than a limit,
/// filtered, never the autotuner's own, at most `max`.
pub async fn pg_terminate_idle(s: &Services, a: &PgTerminateIdle) -> Result<Outcome, String> {
    let h = s.pg(a.target.as_deref())?;
    let client = h.client().await.map_err(|f| f.message)?;
    let states: Vec<String> = if a.in_transaction {
        vec![
            "idle".into(),
            "idle in transaction".into(),
            "idle in transaction (aborted)".into(),
        ]
    } else {
        vec!["idle".into()]
    };
    let idle_ms = i64::try_from(a.idle_for.0.as_millis()).unwrap_or(i64::MAX);
    let max = i64::try_from(a.max.unwrap_or(10)).unwrap_or(10);
    // Ours are left alone twice over: by our own pid, and by our application_name (the
    // collector's connections); a NULL filter matches everything.
    let rows = client
        .query(
            "/* autotuner */ SELECT pid, usename::text, datname::text, application_name,
                    (extract(epoch FROM now() - state_change) * 1000)::float8 AS idle_ms,
                    pg_terminate_backend(pid) AS terminated
               FROM pg_stat_activity
              WHERE backend_type = 'client backend'
                AND pid <> pg_backend_pid()
                AND application_name <> $1
                AND state = ANY($2)
                AND state_change < now() - make_interval(secs => $3::float8 / 1000)
                AND ($4::text IS NULL OR datname = $4)
                AND ($5::text IS NULL OR usename = $5)
                AND ($6::text IS NULL OR application_name = $6)
              ORDER BY state_change
              LIMIT $7",
            &[
                &PG_APPLICATION_NAME,
                &states,
                &(idle_ms as f64),
                &a.database,
                &a.user,
                &a.application,
                &max,
            ],
        )
        .await
        .map_err(|e| pg_err(h, &e))?;
    let ended: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "pid": r.get::<_, i32>(0),
                "user": r.get::<_, Option<String>>(1),
                "database": r.get::<_, Option<String>>(2),
                "application": r.get::<_, Option<String>>(3),
                "idle_seconds": r.get::<_, Option<f64>>(4).map(|m| m / 1000.0),
                "terminated": r.get::<_, bool>(5),
            })
        })
        .collect();
    Ok(Outcome {
        result: json!({ "terminated": ended.iter().filter(|e| e["terminated"] == true).count(), "connections": ended }),
        ..Outcome::default()
    })
}

/// `pg_analyze`: the tables whose statistics are stale, each analyzed in its own transaction.
pub async fn pg_analyze(
    s: &Services,
    a: &super::PgAnalyze,
    timeout: Duration,
) -> Result<Outcome, String> {
    let h = s.pg(a.target.as_deref())?;
    let mut client = h.client().await.map_err(|f| f.message)?;
    let report = crate::advisor::analyze_stale(
        &mut client,
        a.stale_ratio.unwrap_or(0.1),
        usize::try_from(a.max_tables.unwrap_or(20)).unwrap_or(20),
        timeout,
    )
    .await
    .map_err(|e| h.url().scrub(&e.to_string()))?;
    Ok(Outcome {
        result: serde_json::to_value(&report).unwrap_or(Value::Null),
        ..Outcome::default()
    })
}

/// A possibly schema-qualified table name, each part quoted as an identifier.
pub fn quote_table(name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{name:?} is not a table name (`table` or `schema.table`)"
        ));
    }
    Ok(parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join("."))
}

/// An identifier, quoted for PostgreSQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `retention_delete`: rows older than `older_than` deleted in batches of `batch_size` with a
/// pause between them, at most `max_rows`. Each batch is its own transaction, so locks are
/// short and a stop half-way keeps what was done.
pub async fn retention_delete(s: &Services, a: &RetentionDelete) -> Result<Outcome, String> {
    let h = s.pg(a.target.as_deref())?;
    let client = h.client().await.map_err(|f| f.message)?;
    let table = quote_table(&a.table)?;
    let column = quote_ident(&a.column);
    let batch = i64::try_from(a.batch_size.unwrap_or(1000).max(1)).unwrap_or(1000);
    let pause = a.pause.map_or(Duration::from_millis(100), |d| d.0);
    let older_ms = a.older_than.0.as_millis() as f64;
    // (tableoid, ctid) picks exactly the batch's rows without needing a key: a ctid alone is
    // only unique within one relation, and a partitioned or inheritance parent spans several,
    // where the same ctid names a row in each. The LIMIT bounds each statement's work and
    // lock footprint.
    let stmt = client
        .prepare(&format!(
            "/* autotuner */ WITH batch AS (
                SELECT tableoid AS rel, ctid AS tid FROM {table}
                 WHERE {column} < now() - make_interval(secs => $1::float8 / 1000)
                 LIMIT $2)
             DELETE FROM {table} AS target USING batch
              WHERE target.tableoid = batch.rel AND target.ctid = batch.tid"
        ))
        .await
        .map_err(|e| pg_err(h, &e))?;
    let mut deleted: u64 = 0;
    let mut batches = 0u64;
    let mut stopped = "complete";
    loop {
        let room = a.max_rows.saturating_sub(deleted);
        if room == 0 {
            stopped = "max_rows";
            break;
        }
        let limit = batch.min(i64::try_from(room).unwrap_or(i64::MAX));
        let n = client
            .execute(&stmt, &[&older_ms, &limit])
            .await
            .map_err(|e| pg_err(h, &e))?;
        batches += 1;
        deleted += n;
        if n < u64::try_from(limit).unwrap_or(0) {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    Ok(Outcome {
        result: json!({ "deleted": deleted, "batches": batches, "stopped": stopped }),
        ..Outcome::default()
    })
}

/// The JSON a webhook receives: the rule, its instance, the value and the event, plus the
/// action's own fields with templates filled.
pub fn webhook_body(w: &Webhook, req: &ActionRequest) -> Value {
    let labels = labels_map(req);
    let mut body = serde_json::Map::new();
    body.insert("rule".into(), json!(req.rule));
    body.insert("labels".into(), json!(labels));
    body.insert(
        "value".into(),
        if req.value.is_finite() {
            json!(req.value)
        } else {
            Value::Null
        },
    );
    body.insert("event".into(), json!(req.event));
    body.insert("annotations".into(), json!(req.annotations));
    for (k, v) in &w.body {
        let v = match v {
            Value::String(t) => Value::String(template(t, &labels, req.value)),
            other => other.clone(),
        };
        body.insert(k.clone(), v);
    }
    Value::Object(body)
}

/// POSTs `body` to `url` with a per-attempt timeout and `retries` further attempts after a
/// failure, backing off 200 ms, 400 ms, 800 ms… between them.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    timeout: Duration,
    retries: u32,
) -> Result<Outcome, String> {
    let mut attempts = Vec::new();
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200u64 << (attempt - 1).min(6))).await;
        }
        match http.post(url).timeout(timeout).json(body).send().await {
            Ok(r) if r.status().is_success() => {
                return Ok(Outcome {
                    result: json!({ "status": r.status().as_u16(), "attempts": attempt + 1 }),
                    ..Outcome::default()
                });
            }
            Ok(r) => attempts.push(format!("HTTP {}", r.status().as_u16())),
            Err(e) => attempts.push(error_chain(&e.without_url())),
        }
    }
    Err(format!(
        "{} attempts failed: {}",
        attempts.len(),
        attempts.join("; ")
    ))
}

/// `webhook`.
pub async fn webhook(s: &Services, w: &Webhook, req: &ActionRequest) -> Result<Outcome, String> {
    post_json(
        &s.http,
        &w.url,
        &webhook_body(w, req),
        w.timeout.map_or(Duration::from_secs(5), |d| d.0),
        w.retries.unwrap_or(2),
    )
    .await
}

/// What `exec` keeps of each of the program's output streams, in bytes: enough for a message,
/// bounded whatever the program writes.
pub const EXEC_OUTPUT_BOUND: usize = 4096;

/// The only environment variables `exec` passes on (from the autotuner's own environment,
/// where set): where programs are, the home directory, the locale and the time zone. Nothing
/// else: the autotuner's environment carries its targets' URLs and tokens.
fn exec_env_allowed(name: &str) -> bool {
    matches!(name, "PATH" | "HOME" | "LANG" | "LANGUAGE" | "TZ") || name.starts_with("LC_")
}

/// The arguments with their templates filled. An argument that starts with `-` only because
/// of a substituted value (a label such as `--delete-all`) would be read by the program as an
/// option the rule never wrote: refused unless the action sets `allow_option_values`.
pub fn exec_args(e: &Exec, req: &ActionRequest) -> Result<Vec<String>, String> {
    let labels = labels_map(req);
    e.command
        .iter()
        .skip(1)
        .enumerate()
        .map(|(i, a)| {
            let filled = template(a, &labels, req.value);
            if filled.starts_with('-') && !a.starts_with('-') && !e.allow_option_values {
                Err(format!(
                    "argument {} ({a:?}) starts with `-` once filled in: a value would be read as \
                     an option; refused (the action's `allow_option_values: true` permits it)",
                    i + 1
                ))
            } else {
                Ok(filled)
            }
        })
        .collect()
}

/// One output stream, of which the first `EXEC_OUTPUT_BOUND` bytes are kept and the rest read
/// and dropped, so the program never blocks on a full pipe and memory stays bounded.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(stream: Option<R>) -> (Vec<u8>, u64) {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut total = 0u64;
    let Some(mut stream) = stream else {
        return (kept, total);
    };
    let mut buf = [0u8; 8192];
    // A read error ends the stream as EOF would: what was read is still reported.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n as u64;
        let room = EXEC_OUTPUT_BOUND.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    (kept, total)
}

/// The program's process group, killed when this is dropped unless the program finished:
/// a timeout, or the runner abandoning the action, must not leave the program or anything it
/// started (a shell's children) running.
struct GroupGuard {
    pgid: Option<rustix::process::Pid>,
}

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // Already gone is fine: the group has no member left.
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `exec`: a program from the allow list, no shell, an environment cleared down to
/// `exec_env_allowed`, templated arguments that may not turn into options, at most
/// `EXEC_OUTPUT_BOUND` bytes of each output kept, and its whole process group killed at the
/// timeout.
pub async fn exec(s: &Services, e: &Exec, req: &ActionRequest) -> Result<Outcome, String> {
    let Some(program) = e.command.first() else {
        return Err("empty command".into());
    };
    if !s.exec_allow.iter().any(|p| p == program) {
        return Err(format!("{program:?} is not in actions.exec_allow; refused"));
    }
    let args = exec_args(e, req)?;
    let timeout = e.timeout.map_or(Duration::from_secs(30), |d| d.0);
    let mut child = tokio::process::Command::new(program)
        .args(&args)
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(exec_env_allowed)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // A group of its own, so that the kill reaches whatever it started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("starting {program}: {err}"))?;
    let mut group = GroupGuard {
        pgid: child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?)),
    };
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (out, err, status) =
            tokio::join!(read_bounded(stdout), read_bounded(stderr), child.wait());
        (out, err, status)
    };
    let Ok((out, err, status)) = tokio::time::timeout(timeout, run).await else {
        group.kill();
        // Reaped here, so the program is gone when the action's record says so.
        let _ = child.kill().await;
        return Err(format!(
            "{program} still running after {timeout:?} (or something it started still held its \
             output); its process group was killed"
        ));
    };
    // Finished: whatever it left behind in its group on purpose is its business.
    group.pgid = None;
    let status = status.map_err(|err| format!("waiting for {program}: {err}"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let result = json!({
        "exit_code": status.code(),
        "stdout": text(&out.0),
        "stderr": text(&err.0),
        "stdout_bytes": out.1,
        "stderr_bytes": err.1,
    });
    if status.success() {
        Ok(Outcome {
            result,
            ..Outcome::default()
        })
    } else {
        Err(format!(
            "{program} exited with {status}: {}",
            text(&err.0).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_table("events").unwrap(), "\"events\"");
        assert_eq!(quote_table("app.events").unwrap(), "\"app\".\"events\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert!(quote_table("a.b.c").is_err());
        assert!(quote_table("").is_err());
    }

    fn exec_spec(command: &[&str], allow_option_values: bool) -> Exec {
        Exec {
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            timeout: None,
            allow_option_values,
        }
    }

    fn exec_request(labels: &[(&str, &str)]) -> ActionRequest {
        ActionRequest {
            rule: "r".into(),
            labels: crate::sample::Labels::new(labels.iter().copied()),
            value: 1.0,
            event: super::super::Event::Firing,
            episode_ms: 0,
            mode: None,
            cooldown: Duration::ZERO,
            allow_destructive: true,
            actions: Vec::new(),
            verify: None,
            annotations: BTreeMap::new(),
            rule_version: String::new(),
            at_ms: 0,
            actor: "engine".into(),
        }
    }

    #[test]
    fn substituted_values_never_become_options_unless_allowed() {
        let req = exec_request(&[("name", "-rf"), ("plain", "cache")]);
        let e = exec_spec(&["/bin/echo", "{{ $labels.name }}"], false);
        assert!(exec_args(&e, &req).unwrap_err().contains("argument 1"));
        // The rule's own options stay options; values inside them stay values.
        let e = exec_spec(
            &[
                "/bin/echo",
                "--name={{ $labels.name }}",
                "{{ $labels.plain }}",
            ],
            false,
        );
        assert_eq!(exec_args(&e, &req).unwrap(), ["--name=-rf", "cache"]);
        let e = exec_spec(&["/bin/echo", "{{ $labels.name }}"], true);
        assert_eq!(exec_args(&e, &req).unwrap(), ["-rf"]);
        let e = exec_spec(&["/bin/echo", "{{ $value }}"], false);
        let mut negative = req.clone();
        negative.value = -1.0;
        assert!(exec_args(&e, &negative).is_err());
    }

    #[test]
    fn only_the_allowed_environment_is_passed_on() {
        for ok in ["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ"] {
            assert!(exec_env_allowed(ok), "{ok}");
        }
        for no in [
            "DATABASE_URL",
            "REDIS_URL",
            "AUTOTUNER_TOKEN",
            "PGPASSWORD",
            "LD_PRELOAD",
        ] {
            assert!(!exec_env_allowed(no), "{no}");
        }
    }

    #[test]
    fn row_templates_take_columns() {
        let row: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"id": 7, "name": "x", "gone": null}"#).unwrap();
        assert_eq!(
            row_template("product:{{ id }}:{{name}}", &row).unwrap(),
            "product:7:x"
        );
        assert!(row_template("p:{{ gone }}", &row).is_err());
        assert!(row_template("p:{{ nope }}", &row).is_err());
        assert!(row_template("p:{{ id", &row).is_err());
    }
}
