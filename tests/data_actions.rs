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
        &format!(
            "SELECT count(*) FROM {table}_child WHERE created_at > now() - interval '30 days'"
        ),
    )
    .await;
    let child_old = count(
        &db,
        &format!(
            "SELECT count(*) FROM {table}_child WHERE created_at < now() - interval '30 days'"
        ),
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

// ---------------------------------------------------------------------------------------------
// exec

fn exec_spec(yaml: &str) -> autotuner::actions::Exec {
    let ActionSpec::Exec(e) = spec(yaml) else {
        panic!("not an exec: {yaml}")
    };
    e
}

fn exec_services() -> Services {
    let mut s = services(None, None);
    s.exec_allow = ["/bin/sh", "/usr/bin/env", "/usr/bin/printf", "/bin/echo"]
        .map(String::from)
        .to_vec();
    s
}

/// Whether a process is still running (a zombie nobody reaped is not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[tokio::test]
async fn exec_runs_an_allowed_program_with_its_templated_arguments() {
    let s = exec_services();
    let e = exec_spec(
        r#"exec: {command: [/usr/bin/printf, "%s|%s|%s", "{{ $labels.cache }}", "v={{ $value }}", "--literal"]}"#,
    );
    let out = exec::exec(&s, &e, &request(&[("cache", "sessions")], 0.5))
        .await
        .unwrap();
    assert_eq!(out.result["stdout"], "sessions|v=0.5|--literal", "{out:?}");
    assert_eq!(out.result["exit_code"], 0);
    // Not on the allow list: refused without running.
    let e = exec_spec("exec: {command: [/bin/true]}");
    let err = exec::exec(&s, &e, &request(&[], 0.0)).await.unwrap_err();
    assert!(err.contains("exec_allow"), "{err}");
}

#[tokio::test]
async fn exec_a_non_zero_exit_fails_with_its_exit_code_and_stderr() {
    let s = exec_services();
    let e = exec_spec(
        r#"exec: {command: [/bin/sh, -c, "echo partial; echo 'disk full' >&2; exit 3"]}"#,
    );
    let err = exec::exec(&s, &e, &request(&[], 0.0)).await.unwrap_err();
    assert!(err.contains("exit status: 3"), "{err}");
    assert!(err.contains("disk full"), "{err}");
}

#[tokio::test]
async fn exec_passes_only_the_allowed_environment() {
    // The test's own environment carries the provisioned server's URL with its password, as
    // the autotuner's carries DATABASE_URL: the program must not see it.
    let Some(env) = PgEnv::get() else {
        return;
    };
    let password = url::Url::parse(&env.url)
        .unwrap()
        .password()
        .unwrap()
        .to_owned();
    let s = exec_services();
    let out = exec::exec(
        &s,
        &exec_spec("exec: {command: [/usr/bin/env]}"),
        &request(&[], 0.0),
    )
    .await
    .unwrap();
    let text = out.result["stdout"].as_str().unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(names.contains(&"PATH"), "{text}");
    for n in &names {
        assert!(
            ["PATH", "HOME", "LANG", "LANGUAGE", "TZ"].contains(n) || n.starts_with("LC_"),
            "{n} passed to the program: {text}"
        );
    }
    assert!(!text.contains(&password), "a secret reached the program");
}

#[tokio::test]
async fn exec_refuses_a_value_that_would_become_an_option_unless_the_action_allows_it() {
    let s = exec_services();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    // Were it run, the program would leave a marker: a refusal runs nothing.
    let e = exec_spec(&format!(
        r#"exec: {{command: [/bin/sh, -c, "touch {}; echo \"$0\"", "{{{{ $labels.name }}}}"]}}"#,
        marker.display()
    ));
    let err = exec::exec(&s, &e, &request(&[("name", "-i")], 0.0))
        .await
        .unwrap_err();
    assert!(err.contains("allow_option_values"), "{err}");
    assert!(!marker.exists(), "the program ran");
    // A value that does not start with `-` passes.
    let out = exec::exec(&s, &e, &request(&[("name", "orders")], 0.0))
        .await
        .unwrap();
    assert_eq!(out.result["stdout"], "orders\n");
    // Allowed by the action: echo reads the value as its option.
    let e = exec_spec(
        r#"exec: {command: [/bin/echo, "{{ $labels.flag }}", x], allow_option_values: true}"#,
    );
    let out = exec::exec(&s, &e, &request(&[("flag", "-n")], 0.0))
        .await
        .unwrap();
    assert_eq!(out.result["stdout"], "x", "{out:?}");
}

#[tokio::test]
async fn exec_keeps_at_most_its_bound_of_output_and_lets_the_program_finish() {
    let s = exec_services();
    // A megabyte on stdout (far beyond a pipe's buffer: the program only finishes if its
    // output is drained) and a line on stderr.
    let e = exec_spec(
        r#"exec: {command: [/bin/sh, -c, "head -c 1000000 /dev/zero | tr '\\0' a; echo end >&2"], timeout: 60s}"#,
    );
    let out = exec::exec(&s, &e, &request(&[], 0.0)).await.unwrap();
    let stdout = out.result["stdout"].as_str().unwrap();
    assert_eq!(stdout.len(), exec::EXEC_OUTPUT_BOUND);
    assert!(stdout.bytes().all(|b| b == b'a'));
    assert_eq!(out.result["stdout_bytes"], 1_000_000, "{}", out.result);
    assert_eq!(out.result["stderr"], "end\n");
    assert_eq!(out.result["stderr_bytes"], 4);
}

#[tokio::test]
async fn exec_at_its_timeout_kills_the_program_and_what_it_started() {
    let s = exec_services();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // The shell starts a child of its own and waits: both must be gone after the timeout.
    let e = exec_spec(&format!(
        r#"exec: {{command: [/bin/sh, -c, "sleep 300 & echo $$ $! > {}; wait"], timeout: 3s}}"#,
        pids.display()
    ));
    let started = Instant::now();
    let err = exec::exec(&s, &e, &request(&[], 0.0)).await.unwrap_err();
    assert!(err.contains("killed"), "{err}");
    // A bound on behaviour, not speed: it ends, long before the program would.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let text = std::fs::read_to_string(&pids).unwrap();
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    // The kill is immediate; reaping an orphan may take its new parent a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| running(p)) {
        assert!(
            Instant::now() < deadline,
            "still running after the timeout: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// redis

#[tokio::test]
async fn the_redis_action_runs_its_one_command_with_templates_on_the_real_server() {
    let Some(server) = RedisServer::start(&[]) else {
        return;
    };
    let s = services(None, Some(&server.url()));
    let key = unique("cfg");
    let command: Vec<String> = ["SET", &key, "{{ $labels.policy }}", "PX", "60000"]
        .map(String::from)
        .to_vec();
    let out = exec::redis_command(
        &s,
        &command,
        None,
        &request(&[("policy", "allkeys-lru")], 0.0),
    )
    .await
    .unwrap();
    assert_eq!(out.result["reply"], "ok", "{out:?}");
    let mut c = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (value, ttl): (String, i64) = redis::pipe()
        .cmd("GET")
        .arg(&key)
        .cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(value, "allkeys-lru");
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
    // A command the server refuses is the action's error.
    let bad: Vec<String> = ["INCR", &key].map(String::from).to_vec();
    let err = exec::redis_command(&s, &bad, None, &request(&[], 0.0))
        .await
        .unwrap_err();
    assert!(err.contains("not an integer"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// pg_terminate_idle

#[tokio::test]
async fn pg_terminate_idle_spares_the_autotuners_own_connection_that_matches_every_other_filter() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    // A role of this test's own: the sweep's user filter then matches only this test's
    // connections, however many other tests run beside it.
    let role = unique("sweep");
    let password = "sweep-test-pw";
    let admin = pg_connect(&env.url).await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .unwrap();
    let mut as_role = url::Url::parse(&env.url).unwrap();
    as_role.set_username(&role).unwrap();
    as_role.set_password(Some(password)).unwrap();
    let database = as_role.path().trim_start_matches('/').to_owned();
    let connect = |name: &'static str| {
        let url = as_role.to_string();
        async move {
            let mut cfg: tokio_postgres::Config = url.parse().unwrap();
            cfg.application_name(name);
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
            (client, tokio::spawn(conn))
        }
    };
    // Two idle workers and the autotuner's collector-style connection: same role, same
    // database, idle as long; only the application name tells them apart.
    let (_w1, h1) = connect("worker").await;
    let (_w2, h2) = connect("worker").await;
    let (ours, h_ours) = connect("autotuner").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The action's own connection is that role's as well.
    let s = services(Some(as_role.as_str()), None);
    let ActionSpec::PgTerminateIdle(a) = spec(&format!(
        "pg_terminate_idle: {{idle_for: 1s, user: {role}, database: {database}, max: 100}}"
    )) else {
        panic!()
    };
    let out = exec::pg_terminate_idle(&s, &a).await.unwrap();
    let terminated = out.result["terminated"].clone();
    let apps: Vec<String> = out.result["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["application"].as_str().unwrap_or("").to_owned())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(h1.is_finished() && h2.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ours_alive = ours.simple_query("SELECT 1").await.is_ok() && !h_ours.is_finished();
    drop(ours);
    drop(s);
    let _ = admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await;
    // Terminated backends leave pg_stat_activity shortly after; the role goes once they have.
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "role {role} still in use");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(terminated, 2, "{out:?}");
    assert_eq!(apps, ["worker", "worker"], "{out:?}");
    assert!(
        h1.is_finished() && h2.is_finished(),
        "the workers' connections stay open"
    );
    assert!(ours_alive, "the autotuner's own connection was terminated");
}
