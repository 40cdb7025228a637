//! Shared harness for the integration tests: runs the real binary on an ephemeral loopback port,
//! learns the port from its JSON log, waits for readiness, and scrapes and parses `/metrics`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_autotuner");

/// A running autotuner, killed when dropped.
pub struct Autotuner {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Its data directory, unless the test gave one.
    pub data: Option<tempfile::TempDir>,
    /// The empty rules directory it was given, unless the test gave one.
    pub rules: Option<tempfile::TempDir>,
}

impl Autotuner {
    /// Starts the binary with `args` (plus a loopback listen address on port 0 and JSON logs)
    /// and `envs`, and waits until it says where it listens.
    ///
    /// Unless the test names a rules directory (`--rules.dir` or `AUTOTUNER_RULES_DIR`), the
    /// binary gets an empty one: the shipped `./rules` would otherwise load from the crate
    /// root, and a shipped rule switched to `enforce` could act on a test's target. Tests of
    /// the shipped rules pass `--rules.dir` themselves. The listen port is the kernel's choice
    /// (port 0, learnt from the log), so no other process can take it between choice and bind.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Autotuner {
        Autotuner::start_in(&[], args, envs)
    }

    /// [`Autotuner::start`], the binary run through `wrapper` (a program and its arguments that
    /// end by executing the binary in its own process, e.g. `unshare --mount`), so the process
    /// the test holds is still the autotuner.
    pub fn start_in(wrapper: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Autotuner {
        let data = (!args.iter().any(|a| a.starts_with("--data.dir")))
            .then(|| tempfile::tempdir().unwrap());
        let rules = (!args.iter().any(|a| a.starts_with("--rules.dir"))
            && !envs.iter().any(|(k, _)| *k == "AUTOTUNER_RULES_DIR"))
        .then(|| tempfile::tempdir().unwrap());
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        if let Some(d) = &data {
            command.arg(format!("--data.dir={}", d.path().display()));
        }
        if let Some(r) = &rules {
            command.arg(format!("--rules.dir={}", r.path().display()));
        }
        let mut child = command
            .args(["--web.listen-address=127.0.0.1:0", "--log.format=json"])
            .args(args)
            .env_remove("AUTOTUNER_RULES_DIR")
            .envs(envs.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting autotuner");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && let Some(a) = v["address"].as_str()
                {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "autotuner never said where it listens; log: {:#?}",
                    log.lock().unwrap()
                );
            }
        };
        Autotuner {
            child,
            addr,
            log,
            data,
            rules,
        }
    }

    /// `wait_ready`, returning the process, for chaining after `start`.
    pub async fn await_ready(self) -> Autotuner {
        self.wait_ready().await;
        self
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Polls `/-/ready` until it answers 200.
    pub async fn wait_ready(&self) {
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(self.url("/-/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready after 20s; log: {:#?}",
                self.log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Scrapes and parses the exposition.
    pub async fn scrape(&self) -> Scrape {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Scrape::parse(&text)
    }

    /// GETs `path` and parses the answer as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        client()
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Sends SIGTERM and waits for the exit, at most `limit`.
    pub fn terminate(&mut self, limit: Duration) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (Some(s), started.elapsed());
            }
            if started.elapsed() > limit {
                return (None, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Autotuner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client as plain as curl: it asks for no compression and decodes none, so a test sees
/// the bytes and headers the server sent (the crate's reqwest has gzip on for scraping).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_gzip()
        .build()
        .unwrap()
}

/// A parsed exposition.
pub struct Scrape {
    pub samples: Vec<prometheus_parse::Sample>,
    pub text: String,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("exposition parses");
        Scrape {
            samples: parsed.samples,
            text: text.to_owned(),
        }
    }

    /// The value of the one sample of `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} samples",
            found.len()
        );
        found.first().copied()
    }

    /// Every sample of `name`.
    pub fn all(&self, name: &str) -> Vec<&prometheus_parse::Sample> {
        self.samples.iter().filter(|s| s.metric == name).collect()
    }
}

/// A field of /proc/meminfo, in bytes.
pub fn meminfo(field: &str) -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kib: f64 = rest.trim().trim_end_matches("kB").trim().parse().unwrap();
            return kib * 1024.0;
        }
    }
    panic!("{field} not in /proc/meminfo");
}

/// True when tests that need a provisioned tool must fail rather than skip (scripts/test sets
/// it).
pub fn strict() -> bool {
    std::env::var_os("AUTOTUNER_TEST_STRICT").is_some()
}

/// True when the developer asked that tests whose service or tool is missing be skipped
/// (`AUTOTUNER_TEST_ALLOW_SKIP=1`) rather than fail. Strict mode wins over it.
pub fn allow_skip() -> bool {
    !strict() && std::env::var("AUTOTUNER_TEST_ALLOW_SKIP").is_ok_and(|v| v == "1")
}

/// The one way a test says it cannot run here because `reason` (a service or tool) is missing.
///
/// A test that silently passes without running is the one thing a suite must not do, and
/// libtest captures what a passing test prints, so: by default (a plain `cargo test`) and under
/// scripts/test the test fails with `NOT RUN: <reason>`, and the summary line counts it. Only
/// with `AUTOTUNER_TEST_ALLOW_SKIP=1` does it pass, and then the `NOT RUN` line is written to
/// the process's standard error directly, past libtest's capture, so it shows in the run's
/// output next to the test's name. Callers return right after it returns.
pub fn not_run(reason: &str) {
    assert!(
        !strict(),
        "NOT RUN: {reason} (scripts/test provides it; this run is strict)"
    );
    assert!(
        allow_skip(),
        "NOT RUN: {reason}. Run scripts/test, which provisions every service, or set \
         AUTOTUNER_TEST_ALLOW_SKIP=1 to skip the tests that need one"
    );
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("a test");
    // `writeln!` on the handle, not `eprintln!`: only the macros are captured by libtest.
    let _ = writeln!(std::io::stderr(), "NOT RUN: {name}: {reason}");
}

/// Finds a program the test needs; without it, says so through [`not_run`] (which fails the
/// test unless skipping was asked for).
pub fn require(program: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        not_run(&format!(
            "{program} is not installed (scripts/test installs it)"
        ));
    }
    found
}

/// A free TCP port on 127.0.0.1 (the kernel's choice). Another process can take it before the
/// program the test starts binds it: start such programs with [`spawn_on_free_port`], which
/// retries on another port, or hand over a listener ([`listener`]) where the server is
/// in-process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A listener on a loopback port of the kernel's choice, for servers run inside the test: the
/// port is held from the moment it is chosen, so nothing can take it.
pub fn listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Starts a program that must bind a port given on its command line, on a free port, retrying
/// on another port when it could not bind (it exited, or its log says the address is in use)
/// because another process took the port between our choice and its bind. `spawn` starts it on
/// the given port; `log` reads what it said so far. Returns the port and the running child,
/// once something accepts connections on the port and the child is still alive a moment later
/// (a child that lost the race exits at once).
pub fn spawn_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Child,
    log: impl Fn() -> String,
) -> (u16, Child) {
    let lost = |log: &str| {
        let l = log.to_ascii_lowercase();
        l.contains("address already in use") || l.contains("address in use")
    };
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Err(format!("exited with {status}"));
            }
            if lost(&log()) {
                break Err("address in use".to_owned());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Someone accepts; make sure it is ours and not the one that took the port.
                std::thread::sleep(Duration::from_millis(200));
                if child.try_wait().unwrap().is_none() && !lost(&log()) {
                    break Ok(());
                }
                break Err("lost the port".to_owned());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} did not listen on {port} within 30 s; log:\n{}",
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match outcome {
            Ok(()) => return (port, child),
            Err(why) if lost(&log()) || why == "address in use" || why == "lost the port" => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(why) => panic!("{what} failed to start on {port}: {why}; log:\n{}", log()),
        }
    }
    panic!("{what}: five ports in a row were taken by other processes")
}

/// A throw-away redis-server on its own loopback port and directory, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    pub child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl RedisServer {
    /// Starts one, or `None` (after [`not_run`]) when redis-server is not installed. `{port}`
    /// in an argument is replaced by the server's port. A port taken by another process between
    /// our choice and redis-server's bind is retried on another one.
    pub fn start(args: &[&str]) -> Option<RedisServer> {
        RedisServer::start_with_env(args, &[])
    }

    /// [`RedisServer::start`] with `envs` added to the server's environment (`MALLOC_CONF`,
    /// say).
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Option<RedisServer> {
        require("redis-server")?;
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let (port, child) =
            spawn_on_free_port("redis-server", |port| server.spawn(port), || server.log());
        server.port = port;
        server.child = Some(child);
        server.wait_ready();
        Some(server)
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&self, port: u16) -> Child {
        // Each attempt's log on its own: an earlier "address in use" must not fail a retry.
        let _ = std::fs::remove_file(self.log_path());
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args([
                "--appendonly",
                "no",
                "--dir",
                self.dir.path().to_str().unwrap(),
                "--logfile",
                self.log_path().to_str().unwrap(),
            ])
            .args(
                self.args
                    .iter()
                    .map(|a| a.replace("{port}", &port.to_string())),
            )
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Waits until this server (not another process on its port) accepts connections.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("Ready to accept connections") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}; log:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts (again) on the same port, and waits until it accepts connections. (The port is
    /// the test's point here; if another process took it meanwhile, this fails saying so.)
    pub fn restart(&mut self) {
        self.child = Some(self.spawn(self.port));
        self.wait_ready();
    }

    /// Stops it (SIGKILL, as a crash would) and waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (STOP, CONT, ...).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process does not die of SIGKILL until continued on some kernels.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Writes a configuration file into `dir` and returns its path as a string.
pub fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("autotuner.yml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

impl Autotuner {
    /// Polls `/metrics` until `check` accepts a scrape, and returns that scrape.
    pub async fn scrape_until(
        &self,
        limit: Duration,
        what: &str,
        check: impl Fn(&Scrape) -> bool,
    ) -> Scrape {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.scrape().await;
            if check(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not seen within {limit:?}; last scrape:\n{}",
                s.text
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The PostgreSQL and PgBouncer that scripts/test provisions.
pub struct PgEnv {
    /// Superuser, database `autotuner_test`: for setting up workloads.
    pub url: String,
    /// A `pg_monitor` role: what autotuner connects as.
    pub monitor_url: String,
    /// PgBouncer's admin console, as its stats user.
    pub pgbouncer_url: String,
    /// A client of PgBouncer's `autotuner_test` pool (size 2).
    pub pgbouncer_db_url: String,
    /// PostgreSQL's bin directory, for private clusters.
    pub bin: String,
}

impl PgEnv {
    /// The provisioned servers, or `None` (after saying so) when not running under scripts/test.
    pub fn get() -> Option<PgEnv> {
        let var = |n: &str| std::env::var(n).ok();
        match (
            var("AUTOTUNER_TEST_PG_URL"),
            var("AUTOTUNER_TEST_PG_MONITOR_URL"),
            var("AUTOTUNER_TEST_PGBOUNCER_URL"),
            var("AUTOTUNER_TEST_PGBOUNCER_DB_URL"),
            var("AUTOTUNER_TEST_PG_BIN"),
        ) {
            (
                Some(url),
                Some(monitor_url),
                Some(pgbouncer_url),
                Some(pgbouncer_db_url),
                Some(bin),
            ) => Some(PgEnv {
                url,
                monitor_url,
                pgbouncer_url,
                pgbouncer_db_url,
                bin,
            }),
            _ => {
                not_run(
                    "no provisioned PostgreSQL: AUTOTUNER_TEST_PG_* not set (scripts/test provisions it)",
                );
                None
            }
        }
    }

    /// `monitor_url` with another database or password.
    pub fn monitor_url_with(&self, password: Option<&str>, database: Option<&str>) -> String {
        let mut u = url::Url::parse(&self.monitor_url).unwrap();
        if let Some(p) = password {
            u.set_password(Some(p)).unwrap();
        }
        if let Some(d) = database {
            u.set_path(&format!("/{d}"));
        }
        u.to_string()
    }
}

/// A database of the test's own on the provisioned server, with `pg_stat_statements` created
/// in it, dropped (with its connections) when dropped. Tests whose assertions count statements
/// or connections use one, so test binaries running in parallel cannot disturb each other: a
/// statement-statistics reset is then limited to this database
/// (`pg_stat_statements_reset(0, <its oid>, 0)`), never the whole server's.
pub struct ScratchDb {
    pub name: String,
    /// As the superuser.
    pub url: String,
    /// As the `pg_monitor` role.
    pub monitor_url: String,
    admin_url: String,
}

impl PgEnv {
    /// Creates a [`ScratchDb`] named `<prefix>_<pid>_<n>`.
    pub async fn scratch_db(&self, prefix: &str) -> ScratchDb {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}_{}_{n}", std::process::id());
        let admin = pg_connect(&self.url).await;
        // Two statements: a multi-statement string runs as one transaction, which neither
        // allows.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let with_db = |u: &str| {
            let mut u = url::Url::parse(u).unwrap();
            u.set_path(&format!("/{name}"));
            u.to_string()
        };
        let db = ScratchDb {
            url: with_db(&self.url),
            monitor_url: with_db(&self.monitor_url),
            admin_url: self.url.clone(),
            name,
        };
        pg_connect(&db.url)
            .await
            .batch_execute("CREATE EXTENSION pg_stat_statements")
            .await
            .unwrap();
        db
    }
}

impl ScratchDb {
    /// Forgets the statement statistics of this database only.
    pub async fn reset_statements(&self, client: &tokio_postgres::Client) {
        client
            .batch_execute(
                "SELECT pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
            )
            .await
            .unwrap();
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Async cleanup from a synchronous drop: on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A plain connection (application_name unset), its connection task spawned.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Runs a command as the postgres user when we are root (PostgreSQL refuses root).
pub fn as_postgres(program: &str) -> Command {
    if rustix::process::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

/// A private PostgreSQL cluster on its own port, for tests that stop and start it.
pub struct PgCluster {
    pub port: u16,
    bin: String,
    data: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl PgCluster {
    pub fn start(bin: &str) -> PgCluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let is_root = rustix::process::geteuid().is_root();
        if is_root {
            assert!(
                Command::new("chown")
                    .args(["postgres:", dir.path().to_str().unwrap()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let out = as_postgres(&format!("{bin}/initdb"))
            .args([
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {out:?}");
        let mut cluster = PgCluster {
            port: 0,
            bin: bin.to_owned(),
            data,
            dir,
        };
        // Another process can take the chosen port before the postmaster binds it: retry on
        // another one when the start failed for that reason.
        for attempt in 1.. {
            cluster.port = free_port();
            match cluster.try_pg_ctl_start() {
                Ok(()) => break,
                Err(why) if why.contains("already in use") && attempt < 5 => continue,
                Err(why) => panic!("pg_ctl start: {why}"),
            }
        }
        cluster
    }

    pub fn pg_ctl_start(&self) {
        if let Err(why) = self.try_pg_ctl_start() {
            panic!("pg_ctl start: {why}");
        }
    }

    fn try_pg_ctl_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let out = as_postgres(&format!("{}/pg_ctl", self.bin))
            .args(["-D", self.data.to_str().unwrap(), "-w", "-l"])
            .arg(&log)
            .args(["start", "-o", &opts])
            .output()
            .unwrap();
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{out:?}; server log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ))
    }

    pub fn stop(&self) {
        let _ = as_postgres(&format!("{}/pg_ctl", self.bin))
            .args([
                "-D",
                self.data.to_str().unwrap(),
                "-w",
                "-m",
                "fast",
                "stop",
            ])
            .output();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
    /// Turns TLS on with `cert_pem`/`key_pem` and, with `only`, refuses every connection
    /// without it (`hostnossl … reject`), as managed databases do; restarts the server.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str, only: bool) {
        let write = |name: &str, text: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt as _;
            let path = self.data.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            if rustix::process::geteuid().is_root() {
                assert!(
                    Command::new("chown")
                        .args(["postgres:", path.to_str().unwrap()])
                        .status()
                        .unwrap()
                        .success()
                );
            }
        };
        write("server.crt", cert_pem, 0o644);
        write("server.key", key_pem, 0o600);
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text).unwrap();
        if only {
            let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
            write("pg_hba.conf", hba, 0o600);
        }
        self.stop();
        self.pg_ctl_start();
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Median time of `n` sequential scrapes (the outage tests compare the median during an outage
/// with the one before, through [`assert_scrapes_unaffected`]).
pub async fn scrape_median(app: &Autotuner, n: usize) -> Duration {
    let client = client();
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// Asserts that `/metrics` answers as before while a target is down or hung: the median scrape
/// during the outage under three times the median before plus 50 ms. That bound is about
/// behaviour, not speed: a scrape that waited on the dead target would take the collector's
/// timeout (hundreds of milliseconds at least), far past it, while a loaded machine only
/// spreads both medians alike.
pub fn assert_scrapes_unaffected(before: Duration, during: Duration, what: &str) {
    let bound = before * 3 + Duration::from_millis(50);
    assert!(
        during <= bound,
        "median scrape {during:?} with {what}, against {before:?} before (bound {bound:?})"
    );
}

/// A hold on the machine's CPUs, shared between test processes through a lock file, released
/// when dropped.
///
/// The end-to-end test that keeps every core busy takes it exclusively
/// ([`CpuHold::exclusive`]); tests whose assertions bound a duration take it shared
/// ([`CpuHold::shared`]), so no such test shares its window with the burn, whether the two are
/// in one test binary or in binaries run in parallel (the lock is the kernel's `flock`, per
/// open file, so it also orders threads of one process).
pub struct CpuHold(std::fs::File);

impl CpuHold {
    fn open() -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(std::env::temp_dir().join("autotuner-tests-cpu.lock"))
            .unwrap()
    }

    /// For a test that bounds a duration: waits while a CPU burn runs.
    pub fn shared() -> CpuHold {
        let f = Self::open();
        f.lock_shared().unwrap();
        CpuHold(f)
    }

    /// For a test that keeps every core busy: waits until no timing-bound test runs.
    pub fn exclusive() -> CpuHold {
        let f = Self::open();
        f.lock().unwrap();
        CpuHold(f)
    }
}

/// A real Alertmanager (Debian's `prometheus-alertmanager`) on a loopback port of its own, with
/// clustering off, killed when dropped.
pub struct Alertmanager {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Alertmanager {
    /// Starts one with `config` (its YAML), or `None` (after [`not_run`]) when it is not
    /// installed; returns once `/-/ready` answers. A port taken between our choice and its bind
    /// is retried on another one ([`spawn_on_free_port`]).
    pub async fn start(config: &str) -> Option<Alertmanager> {
        let bin = require("prometheus-alertmanager")?;
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("alertmanager.yml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("alertmanager.log");
        let (port, child) = spawn_on_free_port(
            "alertmanager",
            |port| {
                let log = std::fs::File::create(&log_path).unwrap();
                Command::new(&bin)
                    .arg(format!("--config.file={}", config_path.display()))
                    .arg(format!("--storage.path={}", dir.path().display()))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .arg("--cluster.listen-address=")
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap()
            },
            || std::fs::read_to_string(&log_path).unwrap_or_default(),
        );
        let am = Alertmanager {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let http = client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/-/ready", am.base)).send().await
                && r.status().is_success()
            {
                return Some(am);
            }
            assert!(
                Instant::now() < deadline,
                "alertmanager did not become ready; log:\n{}",
                std::fs::read_to_string(am._dir.path().join("alertmanager.log"))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The active (not resolved, not expired) alerts named `name`.
    pub async fn active(&self, name: &str) -> Vec<serde_json::Value> {
        client()
            .get(format!(
                "{}/api/v2/alerts?filter=alertname%3D%22{name}%22",
                self.base
            ))
            .send()
            .await
            .unwrap()
            .json::<Vec<serde_json::Value>>()
            .await
            .unwrap()
    }
}

/// Polls `check` every 250 ms until it returns `Ok`, or panics with `what` and the last `Err`
/// at the deadline.
pub async fn until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what} not seen within {limit:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A private PgBouncer in front of the provisioned PostgreSQL, with the configuration of
/// scripts/lib/provision.sh (`start_pgbouncer`), on its own port: the test may kill it. Killed
/// when dropped.
pub struct Bouncer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_url: String,
    pub client_url: String,
}

impl Bouncer {
    pub fn start(env: &PgEnv) -> Bouncer {
        Bouncer::start_with(env, "", &[])
    }

    /// [`Bouncer::start`] with `extra` lines in its `[pgbouncer]` section and `files` (name,
    /// content) written beside its configuration first (certificates for TLS); `{dir}` in
    /// `extra` is that directory.
    pub fn start_with(env: &PgEnv, extra: &str, files: &[(&str, &str)]) -> Bouncer {
        let pg = url::Url::parse(&env.url).unwrap();
        let monitor = url::Url::parse(&env.monitor_url).unwrap();
        let (pg_port, super_pw, monitor_pw) = (
            pg.port().unwrap(),
            pg.password().unwrap().to_owned(),
            monitor.password().unwrap().to_owned(),
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::write(
            dir.path().join("userlist.txt"),
            format!("\"postgres\" \"{super_pw}\"\n\"monitor\" \"{monitor_pw}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\nautotuner_test = host=127.0.0.1 port={pg_port} dbname=autotuner_test pool_size=2\n\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = plain\nauth_file = {d}/userlist.txt\nadmin_users = postgres\nstats_users = monitor\n\
                 pool_mode = session\ndefault_pool_size = 2\nmax_client_conn = 100\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n{}",
                extra.replace("{dir}", &d.to_string())
            ),
        )
        .unwrap();
        if rustix::process::geteuid().is_root() {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres:", &d.to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
        }
        let b = Bouncer {
            admin_url: format!("postgres://monitor:{monitor_pw}@127.0.0.1:{port}/pgbouncer"),
            client_url: format!("postgres://postgres:{super_pw}@127.0.0.1:{port}/autotuner_test"),
            dir,
            port,
        };
        b.launch();
        b
    }

    /// Starts it (again, on the same port) and waits until it accepts connections.
    pub fn launch(&self) {
        let ini = self.dir.path().join("pgbouncer.ini");
        let out = as_postgres("pgbouncer")
            .arg("-d")
            .arg(&ini)
            .output()
            .unwrap();
        assert!(out.status.success(), "pgbouncer: {out:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PgBouncer did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would, and waits until the port refuses connections.
    pub fn kill(&self) {
        let pidfile = self.dir.path().join("pgbouncer.pid");
        let Ok(pid) = std::fs::read_to_string(&pidfile) else {
            return;
        };
        let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        let _ = std::fs::remove_file(&pidfile);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(Instant::now() < deadline, "PgBouncer did not die");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        self.kill();
    }
}
