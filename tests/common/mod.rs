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
}

impl Autotuner {
    /// Starts the binary with `args` (plus a loopback listen address on port 0 and JSON logs)
    /// and `envs`, and waits until it says where it listens.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Autotuner {
        let mut child = Command::new(BIN)
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
        Autotuner { child, addr, log }
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
