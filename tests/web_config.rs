//! `--web.config.file` through the real binary and a real TLS client: certificates made here
//! with rcgen, basic auth with bcrypt hashes, client certificates, a certificate renewed and a
//! user added while it runs, a broken edit ignored, failed attempts limited, and a broken file
//! stopping the start with its line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Autotuner;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `names`, and its key, as PEM.
    fn sign(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A client that trusts only `ca`, on a fresh connection each time it is built.
fn client(ca: &Ca, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap()])
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// A cheap bcrypt hash (cost 4) so the test spends its time on the server's work, not here.
fn hash(password: &str) -> String {
    bcrypt::hash(password, 4).unwrap()
}

fn https(app: &Autotuner, path: &str) -> String {
    format!("https://localhost:{}{path}", app.addr.port())
}

async fn status(c: &reqwest::Client, url: &str, user: Option<(&str, &str)>) -> u16 {
    let mut req = c.get(url);
    if let Some((u, p)) = user {
        req = req.basic_auth(u, Some(p));
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn tls_and_basic_auth_guard_every_route_and_reload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.sign(&["localhost", "127.0.0.1"], false);
    write(dir.path(), "server.crt", &cert);
    write(dir.path(), "server.key", &key);
    // Relative paths: read from the web config file's own directory.
    let web = dir.path().join("web.yml");
    let config = format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\nhttp_server_config:\n  headers:\n    Strict-Transport-Security: max-age=31536000\nbasic_auth_users:\n  prometheus: '{}'\n",
        hash("scrape-secret")
    );
    std::fs::write(&web, &config).unwrap();
    let app = Autotuner::start(
        &[&format!("--web.config.file={}", web.display())],
        &[("AUTOTUNER_OPERATE_TOKEN", "operate-token-0123456789")],
    );
    let c = client(&ca, None);
    let good = Some(("prometheus", "scrape-secret"));

    // Every route needs the password, /metrics and the health checks included.
    for path in ["/metrics", "/-/healthy", "/"] {
        let r = c.get(https(&app, path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Basic realm=\"autotuner\"",
            "{path}"
        );
        assert_eq!(status(&c, &https(&app, path), good).await, 200, "{path}");
    }
    assert_eq!(
        status(&c, &https(&app, "/metrics"), Some(("prometheus", "wrong"))).await,
        401
    );
    // An unknown user is refused the same way.
    assert_eq!(
        status(
            &c,
            &https(&app, "/metrics"),
            Some(("nobody", "scrape-secret"))
        )
        .await,
        401
    );
    // Basic auth takes the Authorization header; the admin API's token rides beside it.
    let reload = |token: Option<&'static str>| {
        let mut r = c
            .post(https(&app, "/-/reload"))
            .basic_auth("prometheus", Some("scrape-secret"));
        if let Some(t) = token {
            r = r.header("X-Autotuner-Token", t);
        }
        r.send()
    };
    assert_eq!(reload(None).await.unwrap().status(), 401);
    assert_eq!(
        reload(Some("operate-token-0123456789"))
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c
        .get(https(&app, "/metrics"))
        .basic_auth("prometheus", Some("scrape-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["strict-transport-security"], "max-age=31536000");
    let text = r.text().await.unwrap();
    let scrape = common::Scrape::parse(&text);
    assert_eq!(
        scrape.value(
            "autotuner_http_basic_auth_failures_total",
            &[("reason", "invalid")]
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        scrape
            .value(
                "autotuner_http_basic_auth_failures_total",
                &[("reason", "missing")]
            )
            .unwrap()
            >= 3.0
    );

    // Plain HTTP to the TLS port gets no answer a client could read.
    let plain = common::client()
        .get(format!("http://127.0.0.1:{}/metrics", app.addr.port()))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain HTTP must not be served"
    );
    // A client that does not trust the CA refuses the server.
    let other = Ca::new("other CA");
    assert!(
        client(&other, None)
            .get(https(&app, "/-/healthy"))
            .send()
            .await
            .is_err()
    );

    // A broken edit keeps the running settings.
    std::fs::write(&web, "tls_server_config: [\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(status(&c, &https(&app, "/-/healthy"), good).await, 200);
    assert!(
        app.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("web configuration unusable")),
        "the broken edit is logged"
    );

    // A renewed certificate (from a new CA) and a new user take effect without a restart.
    let ca2 = Ca::new("renewed CA");
    let (cert2, key2) = ca2.sign(&["localhost"], false);
    write(dir.path(), "server.crt", &cert2);
    write(dir.path(), "server.key", &key2);
    std::fs::write(
        &web,
        format!("{config}  grafana: '{}'\n", hash("dashboards-secret")),
    )
    .unwrap();
    let c2 = client(&ca2, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = c2
            .get(https(&app, "/-/healthy"))
            .basic_auth("grafana", Some("dashboards-secret"))
            .send()
            .await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate never took effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        client(&ca, None)
            .get(https(&app, "/-/healthy"))
            .send()
            .await
            .is_err(),
        "the old certificate is no longer served"
    );

    // Ten wrong passwords in a minute (two above, eight here) and that address waits, even
    // with the right one.
    for _ in 0..8 {
        assert_eq!(
            status(&c2, &https(&app, "/-/healthy"), Some(("grafana", "guess"))).await,
            401
        );
    }
    assert_eq!(
        status(
            &c2,
            &https(&app, "/-/healthy"),
            Some(("grafana", "dashboards-secret"))
        )
        .await,
        429
    );
}

#[tokio::test]
async fn client_certificates_are_verified_against_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let clients = Ca::new("clients CA");
    let (cert, key) = ca.sign(&["localhost"], false);
    write(dir.path(), "server.crt", &cert);
    write(dir.path(), "server.key", &key);
    write(dir.path(), "clients.crt", &clients.pem());
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients.crt\n  min_version: TLS13\n",
    )
    .unwrap();
    let app = Autotuner::start(&[&format!("--web.config.file={}", web.display())], &[]);
    let (ccert, ckey) = clients.sign(&["prometheus"], true);
    let ok = client(&ca, Some((&ccert, &ckey)));
    assert_eq!(status(&ok, &https(&app, "/metrics"), None).await, 200);
    // No certificate, or one from another CA: no connection.
    assert!(
        client(&ca, None)
            .get(https(&app, "/metrics"))
            .send()
            .await
            .is_err()
    );
    let stranger = Ca::new("stranger CA");
    let (scert, skey) = stranger.sign(&["intruder"], true);
    assert!(
        client(&ca, Some((&scert, &skey)))
            .get(https(&app, "/metrics"))
            .send()
            .await
            .is_err()
    );
    let text = ok
        .get(https(&app, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = common::Scrape::parse(&text);
    assert!(
        scrape
            .value(
                "autotuner_http_tls_handshake_failures_total",
                &[("reason", "error")]
            )
            .unwrap()
            >= 2.0,
        "{text}"
    );
}

/// Starts the binary with `text` as its web config (next to a valid certificate and key) and
/// returns its stderr; the start must fail (a process still running after 30 s started).
fn refused_start(dir: &Path, text: &str) -> String {
    use std::io::Read;
    let web = dir.join("web.yml");
    std::fs::write(&web, text).unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .args([
            format!("--web.config.file={}", web.display()),
            "--web.listen-address=127.0.0.1:0".into(),
            format!("--data.dir={}", dir.display()),
            format!("--rules.dir={}", dir.join("no-rules").display()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{text:?} started");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{text:?} started");
    assert!(err.contains("--web.config.file"), "{text:?}: {err}");
    err
}

#[test]
fn a_broken_web_config_stops_the_start_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    let cases = [
        (
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
            ":2:",
            "missing.crt",
        ),
        (
            "basic_auth_users:\n  prometheus: plaintext\n",
            ":2:",
            "bcrypt",
        ),
    ];
    for (text, line, what) in cases {
        let err = refused_start(dir.path(), text);
        assert!(
            err.contains(&format!("{}{line}", web.display())),
            "{text:?}: {err}"
        );
        assert!(err.contains(what), "{text:?}: {err}");
    }
}

/// What rustls cannot do safely is refused for that reason, at that line: the certificate and
/// key are valid, so nothing else could fail first.
#[test]
fn unsafe_tls_settings_are_refused_for_their_own_reason_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let (cert, key) = ca.sign(&["localhost"], false);
    write(dir.path(), "server.crt", &cert);
    write(dir.path(), "server.key", &key);
    write(dir.path(), "clients.crt", &Ca::new("clients CA").pem());
    let web = dir.path().join("web.yml");
    let base = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";
    // The same file without the refused setting starts: the certificates are not the problem.
    std::fs::write(&web, base).unwrap();
    let ok = Autotuner::start(&[&format!("--web.config.file={}", web.display())], &[]);
    drop(ok);
    for (extra, line, what) in [
        (
            "  min_version: TLS10\n",
            ":4:",
            "TLS10 is not offered: TLS 1.0 and 1.1 are broken",
        ),
        (
            "  max_version: TLS11\n",
            ":4:",
            "TLS11 is not offered: TLS 1.0 and 1.1 are broken",
        ),
        (
            "  client_auth_type: RequestClientCert\n",
            ":4:",
            "RequestClientCert accepts certificates nobody verified",
        ),
        (
            "  client_auth_type: RequireAnyClientCert\n  client_ca_file: clients.crt\n",
            ":4:",
            "RequireAnyClientCert accepts certificates nobody verified",
        ),
        (
            "  client_ca_file: clients.crt\n  client_allowed_sans: [prometheus]\n",
            ":5:",
            "client_allowed_sans is not supported",
        ),
    ] {
        let text = format!("{base}{extra}");
        let err = refused_start(dir.path(), &text);
        assert!(
            err.contains(&format!("{}{line}", web.display())),
            "{text:?}: {err}"
        );
        assert!(err.contains(what), "{text:?}: {err}");
    }
}

/// Wrong passwords sent all at once from one address: each is counted before its bcrypt runs,
/// so ten are checked and the rest answered 429 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_sent_at_once_cost_at_most_ten_bcrypts() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web.yml");
    // Cost 8: long enough that every request of the burst arrives before ten checks finished.
    std::fs::write(
        &web,
        format!(
            "basic_auth_users:\n  prometheus: '{}'\n",
            bcrypt::hash("scrape-secret", 8).unwrap()
        ),
    )
    .unwrap();
    let app = Autotuner::start(&[&format!("--web.config.file={}", web.display())], &[]);
    let http = common::client();
    let calls = (0..30).map(|i| {
        let req = http
            .get(app.url("/-/healthy"))
            .basic_auth("prometheus", Some(format!("guess-{i}")));
        async move { req.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        20,
        "{statuses:?}"
    );
    // The address waits out the minute, even with the right password.
    let r = http
        .get(app.url("/metrics"))
        .basic_auth("prometheus", Some("scrape-secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}
