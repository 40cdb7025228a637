//! The data-side executors against the real services: `retention_delete` on partitioned and
//! inheritance tables, `exec` with real programs (environment, option-like arguments, output
//! bound, exit codes, the kill at its timeout), the `redis` command on a throw-away Redis, and
//! `pg_terminate_idle` sparing the autotuner's own connections when every other filter matches
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use autotuner::actions::exec::{self, Services};
use autotuner::actions::{ActionRequest, ActionSpec, Event, Mode};
use autotuner::sample::Labels;
use autotuner::settings::Target;
use autotuner::settings::secret::SecretUrl;
use autotuner::targets::{PgHandle, RedisHandle};
use common::{PgEnv, RedisServer, pg_connect};

fn target(name: &str, url: &str) -> Target {
    Target {
        name: name.into(),
        url: SecretUrl::parse(url).unwrap(),
        tls_ca_file: None,
    }
}

fn services(pg: Option<&str>, redis: Option<&str>) -> Services {
    let mut s = Services {
        http: reqwest::Client::new(),
        ..Services::default()
    };
    if let Some(url) = pg {
        s.postgres.insert(
            "default".into(),
            PgHandle::new(
                &target("default", url),
                Duration::from_secs(30),
                Duration::from_secs(5),
                1,
            )
            .unwrap(),
        );
    }
    if let Some(url) = redis {
        s.redis.insert(
            "default".into(),
            RedisHandle::new(&target("default", url), Duration::from_secs(5)).unwrap(),
        );
    }
    s
}

fn spec(yaml: &str) -> ActionSpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn request(labels: &[(&str, &str)], value: f64) -> ActionRequest {
    ActionRequest {
        rule: "DataActions".into(),
        labels: Labels::new(labels.iter().copied()),
        value,
        event: Event::Firing,
        episode_ms: 1,
        mode: Some(Mode::Enforce),
        cooldown: Duration::ZERO,
        allow_destructive: true,
        actions: Vec::new(),
        verify: None,
        annotations: BTreeMap::new(),
        rule_version: "v1".into(),
        at_ms: 1,
        actor: "engine".into(),
    }
}

/// A unique name for this test's tables, keys and connections.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

async fn count(db: &tokio_postgres::Client, q: &str) -> i64 {
    db.query_one(q, &[]).await.unwrap().get(0)
}

fn retention(yaml: &str) -> autotuner::actions::RetentionDelete {
    let ActionSpec::RetentionDelete(a) = spec(yaml) else {
        panic!("not a retention_delete: {yaml}")
    };
    a
}

#[tokio::test]
async fn retention_delete_on_a_partitioned_table_removes_only_the_old_partitions_rows() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let table = unique("ret_part");
    let db = pg_connect(&env.url).await;
    // By month: an old month and the current one, each filled the same way, so that every
    // old row's ctid is also the ctid of a current row in the other partition.
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, created_at timestamptz NOT NULL) PARTITION BY RANGE (created_at);
         CREATE TABLE {table}_old PARTITION OF {table}
           FOR VALUES FROM (date_trunc('month', now() - interval '3 months'))
                        TO (date_trunc('month', now() - interval '2 months'));
         CREATE TABLE {table}_now PARTITION OF {table}
           FOR VALUES FROM (date_trunc('month', now())) TO (date_trunc('month', now()) + interval '1 month');
         INSERT INTO {table} SELECT g, date_trunc('month', now() - interval '3 months') + interval '1 day'
           FROM generate_series(1, 900) g;
         INSERT INTO {table} SELECT g, date_trunc('month', now()) FROM generate_series(1, 900) g;"
    ))
    .await
    .unwrap();
    let s = services(Some(&env.url), None);
    let a = retention(&format!(
        "retention_delete: {{table: {table}, column: created_at, older_than: 30d, batch_size: 250, pause: 1ms, max_rows: 100000}}"
    ));
    let out = exec::retention_delete(&s, &a).await.unwrap();
    let old = count(&db, &format!("SELECT count(*) FROM {table}_old")).await;
    let now = count(&db, &format!("SELECT count(*) FROM {table}_now")).await;
    db.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    assert_eq!((old, now), (0, 900), "only the old partition's rows go");
    assert_eq!(out.result["deleted"], 900, "{out:?}");
    assert_eq!(out.result["stopped"], "complete", "{out:?}");
}

#[tokio::test]
async fn retention_delete_on_an_inheritance_parent_keeps_its_childs_recent_rows() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let table = unique("ret_inh");
    let db = pg_connect(&env.url).await;
    // Old rows in the parent, recent ones in the child (same ctids), and a few old ones in
    // the child as well: those go too, the child's recent ones stay.
    db.batch_execute(&format!(
        "CREATE TABLE {table} (id int, created_at timestamptz NOT NULL);
         CREATE TABLE {table}_child () INHERITS ({table});
         INSERT INTO {table} SELECT g, now() - interval '90 days' FROM generate_series(1, 600) g;
         INSERT INTO {table}_child SELECT g, now() - interval '1 hour' FROM generate_series(1, 600) g;
         INSERT INTO {table}_child SELECT g, now() - interval '90 days' FROM generate_series(601, 650) g;"
    ))
    .await
    .unwrap();
    let s = services(Some(&env.url), None);
    let a = retention(&format!(
        "retention_delete: {{table: {table}, column: created_at, older_than: 30d, batch_size: 200, pause: 1ms, max_rows: 100000}}"
    ));
    let out = exec::retention_delete(&s, &a).await.unwrap();
    let parent = count(&db, &format!("SELECT count(*) FROM ONLY {table}")).await;
    let child_new = count(
        &db,
        &format!("SELECT count(*) FROM {table}_child WHERE created_at > now() - interval '30 days'"),
    )
    .await;
    let child_old = count(
        &db,
        &format!("SELECT count(*) FROM {table}_child WHERE created_at < now() - interval '30 days'"),
    )
    .await;
    db.batch_execute(&format!("DROP TABLE {table} CASCADE"))
        .await
        .unwrap();
    assert_eq!(
        (parent, child_new, child_old),
        (0, 600, 0),
        "old rows of parent and child go, the child's recent rows stay"
    );
    assert_eq!(out.result["deleted"], 650, "{out:?}");
}
