//! Shared harness for the integration tests: runs the real binary on an ephemeral loopback port,
//! learns the port from its JSON log, waits for readiness, and scrapes and parses `/metrics`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
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
}

impl Autotuner {
    /// Starts the binary with `args` (plus a loopback listen address on port 0 and JSON logs)
    /// and `envs`, and waits until it says where it listens.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Autotuner {
        let data = (!args.iter().any(|a| a.starts_with("--data.dir")))
            .then(|| tempfile::tempdir().unwrap());
        let mut command = Command::new(BIN);
        if let Some(d) = &data {
            command.arg(format!("--data.dir={}", d.path().display()));
        }
        let mut child = command
            .args(["--web.listen-address=127.0.0.1:0", "--log.format=json"])
            .args(args)
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

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
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

/// True when tests that need a provisioned tool must fail rather than skip (the test command
/// sets it; a plain `cargo test` on a bare machine skips them and says so).
pub fn strict() -> bool {
    std::env::var_os("AUTOTUNER_TEST_STRICT").is_some()
}

/// Finds a program the test needs; without it the test fails in strict mode and otherwise
/// prints that it did not run.
pub fn require(program: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !strict(),
            "{program} is not installed; scripts/test installs it"
        );
        eprintln!("NOT RUN: {program} is not installed (scripts/test installs it)");
    }
    found
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; a tiny race with other processes is
/// accepted).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throw-away redis-server on its own loopback port and directory, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    pub child: Option<Child>,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl RedisServer {
    /// Starts one, or `None` (after saying so) when redis-server is not installed. `{port}` in
    /// an argument is replaced by the server's port.
    pub fn start(args: &[&str]) -> Option<RedisServer> {
        require("redis-server")?;
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.restart();
        Some(server)
    }

    /// Starts (again) on the same port, and waits until it accepts connections.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
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
            ])
            .args(
                self.args
                    .iter()
                    .map(|a| a.replace("{port}", &self.port.to_string())),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
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
                assert!(
                    !strict(),
                    "AUTOTUNER_TEST_PG_* not set: scripts/test provisions PostgreSQL"
                );
                eprintln!("NOT RUN: no provisioned PostgreSQL (run scripts/test)");
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
        let cluster = PgCluster {
            port: free_port(),
            bin: bin.to_owned(),
            data,
            dir,
        };
        cluster.pg_ctl_start();
        cluster
    }

    pub fn pg_ctl_start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        let out = as_postgres(&format!("{}/pg_ctl", self.bin))
            .args(["-D", self.data.to_str().unwrap(), "-w", "-l"])
            .arg(self.dir.path().join("log"))
            .args(["start", "-o", &opts])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {out:?}");
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
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Median time of `n` sequential scrapes (printed by the outage tests: timings are measured,
/// never asserted).
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
