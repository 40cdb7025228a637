//! Secrets never shown: through the real binary, rules and playbooks whose actions carry secrets
//! the way real integrations do (a Slack, Discord and Teams webhook's secret in its URL path, a
//! PagerDuty routing key in a body, `CONFIG SET requirepass` to a real Redis, an Alertmanager URL
//! with a password), targets with secret URL parameters (`?password=`, `?sslpassword=`) and
//! tokens. The actions really run (a local receiver sees the secrets arrive); afterwards none of
//! the secrets is in the audit files, any API answer, the landing page, `/metrics` or the log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Autotuner, PgEnv, RedisServer};
use tokio::net::TcpListener;

const SLACK: &str = "slack-s3cret-path-4a1b";
const DISCORD: &str = "discord-s3cret-token-7c2d";
const TEAMS: &str = "teams-s3cret-9e3f";
const PAGERDUTY: &str = "pd-routing-s3cret-0b4e";
const REQUIREPASS: &str = "redis-requirepass-s3cret-5d6a";
const AM_PASSWORD: &str = "am-s3cret-8f7b";
const SSLPASSWORD: &str = "probe-sslpassword-s3cret-1c9d";
const PG_PASSWORD_PARAM: &str = "autotuner-test-monitor-pw";
const READ_TOKEN: &str = "read-token-s3cret-0123456789";
const OPERATE_TOKEN: &str = "operate-token-s3cret-0123456789";
const FILE_TOKEN: &str = "file-token-s3cret-0123456789";
const WRONG_TOKEN: &str = "wrong-token-s3cret-0123456789";

/// An HTTP receiver on port 0: answers 200 to every request and keeps each request's path and
/// body. With `once`, it stops listening after its first request (so later sends fail).
struct Receiver {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start(once: bool) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Arc::new(Mutex::new(Some(stop_tx)));
        let sink = seen.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: String| {
            let sink = sink.clone();
            let stop = stop.clone();
            async move {
                sink.lock().unwrap().push(format!("{uri} {body}"));
                if once && let Some(tx) = stop.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                "ok"
            }
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Receiver { port, seen }
    }

    fn saw(&self, needle: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|r| r.contains(needle))
    }
}

/// Every secret of the scenario, none of which may be shown.
const SECRETS: [&str; 12] = [
    SLACK,
    DISCORD,
    TEAMS,
    PAGERDUTY,
    REQUIREPASS,
    AM_PASSWORD,
    SSLPASSWORD,
    PG_PASSWORD_PARAM,
    READ_TOKEN,
    OPERATE_TOKEN,
    FILE_TOKEN,
    WRONG_TOKEN,
];

fn assert_no_secret(place: &str, text: &str) {
    for s in SECRETS {
        assert!(
            !text.contains(s),
            "{place} shows the secret {s:?}:\n{}",
            &text[text.find(s).unwrap().saturating_sub(300)..]
                .chars()
                .take(700)
                .collect::<String>()
        );
    }
}

fn rule(name: &str, action: &str, destructive: bool) -> String {
    format!(
        "      - name: {name}\n        expr: host_cpus > 0\n        mode: enforce\n        allow_destructive: {destructive}\n        actions:\n          - {action}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_no_audit_record_api_answer_page_metric_or_log_line() {
    let Some(redis) = RedisServer::start(&[]) else {
        return;
    };
    let Some(pg) = PgEnv::get() else {
        return;
    };
    // One receiver per webhook: one action at a time runs per target (host and port).
    let hooks = [
        Receiver::start(false).await,
        Receiver::start(false).await,
        Receiver::start(false).await,
        Receiver::start(false).await,
    ];
    // Takes the first alert, then is gone: every resend fails and is logged.
    let am = Receiver::start(true).await;
    let closed = common::free_port();
    let slack = format!(
        "http://127.0.0.1:{}/services/T0000/B0000/{SLACK}",
        hooks[0].port
    );
    let discord = format!(
        "http://127.0.0.1:{}/api/webhooks/1234/{DISCORD}",
        hooks[1].port
    );
    let teams = format!(
        "http://127.0.0.1:{}/webhookb2/a1@b2/IncomingWebhook/{TEAMS}/c3",
        hooks[2].port
    );
    let pagerduty = format!(
        "{{url: 'http://127.0.0.1:{}/v2/enqueue', body: {{routing_key: {PAGERDUTY}, event_action: trigger}}}}",
        hooks[3].port
    );
    let redis_cmd =
        format!("{{command: [CONFIG, SET, requirepass, {REQUIREPASS}], target: cache}}");
    let am_url = format!("http://am-user:{AM_PASSWORD}@127.0.0.1:{}", am.port);

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    let mut rules = String::from("groups:\n  - name: secrets\n    interval: 1s\n    rules:\n");
    for (name, action, destructive) in [
        ("Slack", format!("webhook: {{url: '{slack}'}}"), false),
        ("Discord", format!("webhook: {{url: '{discord}'}}"), false),
        ("Teams", format!("webhook: {{url: '{teams}'}}"), false),
        ("PagerDuty", format!("webhook: {pagerduty}"), false),
        ("RequirePass", format!("redis: {redis_cmd}"), true),
        (
            "Alertmanager",
            format!("alertmanager: {{url: '{am_url}'}}"),
            false,
        ),
    ] {
        rules.push_str(&rule(name, &action, destructive));
    }
    std::fs::write(rules_dir.join("secrets.yml"), rules).unwrap();
    let playbooks = dir.path().join("playbooks.yml");
    std::fs::write(
        &playbooks,
        format!(
            "playbooks:\n  notify:\n    allow_destructive: true\n    steps:\n      - webhook: {{url: '{slack}'}}\n      - webhook: {{url: '{discord}'}}\n      - webhook: {{url: '{teams}'}}\n      - webhook: {pagerduty}\n      - redis: {redis_cmd}\n      - alertmanager: {{url: 'http://am-user:{AM_PASSWORD}@127.0.0.1:{}'}}\n",
            hooks[0].port
        ),
    )
    .unwrap();
    let tokens = dir.path().join("tokens.yml");
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: filed, role: read, token: {FILE_TOKEN}}}\n"),
    )
    .unwrap();
    // The PostgreSQL target's password as a libpq URL parameter; an HTTP probe whose URL has
    // `?sslpassword=` and whose port is closed, so it fails and is logged with its URL.
    let mut pg_url = url::Url::parse(&pg.monitor_url).unwrap();
    pg_url.set_password(None).unwrap();
    pg_url
        .query_pairs_mut()
        .append_pair("password", PG_PASSWORD_PARAM);
    let config = format!(
        "collectors:\n  host: {{interval: 1s}}\n  redis: {{interval: 1s}}\n  postgres: {{interval: 1s}}\n  http_probe: {{interval: 1s}}\ntargets:\n  redis: [{{name: cache, url: '{redis}'}}]\n  postgres: [{{name: main, url: '{pg_url}'}}]\n  http: [{{name: api, url: 'http://127.0.0.1:{closed}/health?sslpassword={SSLPASSWORD}', timeout: 500ms}}]\nactions:\n  mode: enforce\n  alert_resend: 1s\n  rate_limits:\n    global: {{count: 100, per: 1m}}\n    per_target: {{count: 100, per: 1m}}\n",
        redis = redis.url(),
    );
    let config_path = common::write_config(&dir, &config);
    let app = Autotuner::start(
        &[
            &format!("--config.file={config_path}"),
            &format!("--rules.dir={}", rules_dir.display()),
            &format!("--data.dir={}", data.display()),
            &format!("--playbooks.file={}", playbooks.display()),
            &format!("--web.tokens-file={}", tokens.display()),
            "--log.level=debug",
        ],
        &[
            ("AUTOTUNER_READ_TOKEN", READ_TOKEN),
            ("AUTOTUNER_OPERATE_TOKEN", OPERATE_TOKEN),
        ],
    )
    .await_ready()
    .await;
    let http = common::client();

    // Every rule acted (the receivers saw the real secrets), the playbook ran, and the
    // Alertmanager resend failed and was logged.
    let audit_text = || {
        let mut all = String::new();
        for e in std::fs::read_dir(&data).unwrap() {
            let p = e.unwrap().path();
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("audit")
            {
                all.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            }
        }
        all
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let audit = audit_text();
        let acted = [
            "Slack",
            "Discord",
            "Teams",
            "PagerDuty",
            "RequirePass",
            "Alertmanager",
        ]
        .iter()
        .all(|r| {
            audit.lines().any(|l| {
                l.contains(&format!("\"rule\":\"{r}\"")) && l.contains("\"decision\":\"applied\"")
            })
        });
        let resent = app
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("resending an alert failed"));
        let probed = app
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("HTTP probe failing"));
        if acted && resent && probed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acted {acted}, resent {resent}, probed {probed}; audit:\n{audit}\nlog: {:#?}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let run = http
        .post(app.url("/api/v1/playbooks/notify/run"))
        .bearer_auth(OPERATE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 200, "{}", run.text().await.unwrap());
    let run_text = run.text().await.unwrap();
    assert_no_secret("the playbook run's answer", &run_text);
    for (hook, s) in hooks.iter().zip([SLACK, DISCORD, TEAMS, PAGERDUTY]) {
        assert!(hook.saw(s), "the webhook with {s} was not sent");
    }
    assert!(am.saw("/api/v2/alerts"), "the alert was not sent");
    // The password really is set: the action ran against the real Redis.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let denied: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(denied.is_err(), "CONFIG SET requirepass did not run");

    // Tokens: wrong ones, right ones, from the file and the environment, and a broken edit of
    // the file that holds one.
    for t in [WRONG_TOKEN, READ_TOKEN, FILE_TOKEN] {
        http.get(app.url("/api/v1/status"))
            .bearer_auth(t)
            .send()
            .await
            .unwrap();
    }
    std::fs::write(
        &tokens,
        format!("tokens:\n  - {{name: filed, role: read, tokn: {FILE_TOKEN}}}\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("tokens file unreadable"))
    {
        assert!(
            Instant::now() < deadline,
            "the broken tokens file was never re-read"
        );
        http.get(app.url("/api/v1/status"))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // What is shown: the audit files, every read route, the landing page, /metrics, the log.
    let audit = audit_text();
    assert_no_secret("the audit log", &audit);
    assert!(
        audit.contains(&format!("http://127.0.0.1:{}/…", hooks[0].port)),
        "the webhook's host is still shown: {audit}"
    );
    let mut paths = vec![
        "/api/v1/status".to_owned(),
        "/api/v1/rules".to_owned(),
        "/api/v1/audit?limit=1000".to_owned(),
        "/api/v1/playbooks".to_owned(),
        "/api/v1/knobs".to_owned(),
        "/api/v1/breakers".to_owned(),
        "/api/v1/recommendations".to_owned(),
        "/".to_owned(),
        "/metrics".to_owned(),
    ];
    for r in [
        "Slack",
        "Discord",
        "Teams",
        "PagerDuty",
        "RequirePass",
        "Alertmanager",
    ] {
        paths.push(format!("/api/v1/rules/{r}"));
        paths.push(format!("/api/v1/audit?rule={r}"));
    }
    for p in &paths {
        let resp = http
            .get(app.url(p))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{p}");
        let text = resp.text().await.unwrap();
        assert_no_secret(p, &text);
    }
    let playbooks: serde_json::Value = http
        .get(app.url("/api/v1/playbooks"))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let steps = &playbooks["data"]["notify"]["steps"];
    assert_eq!(steps.as_array().unwrap().len(), 6, "{playbooks}");
    assert_eq!(
        steps[0]["webhook"]["url"],
        format!("http://127.0.0.1:{}/…", hooks[0].port),
        "{playbooks}"
    );
    assert_eq!(steps[4]["redis"]["command"][0], "CONFIG", "{playbooks}");
    let log = app.log.lock().unwrap().join("\n");
    assert_no_secret("the log", &log);
}

#[test]
fn a_secret_url_parameter_of_a_refused_postgres_target_is_not_repeated() {
    // tokio-postgres takes no `sslpassword`: the start is refused, and the refusal names the
    // target without the parameter's value.
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        &dir,
        &format!(
            "targets:\n  postgres: [{{name: main, url: 'postgres://monitor:{PG_PASSWORD_PARAM}@127.0.0.1:1/app?sslpassword={SSLPASSWORD}'}}]\n"
        ),
    );
    let out = std::process::Command::new(common::BIN)
        .args([
            format!("--config.file={config}"),
            "--web.listen-address=127.0.0.1:0".into(),
            format!("--data.dir={}", dir.path().display()),
            format!("--rules.dir={}", dir.path().display()),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("main"), "{err}");
    assert_no_secret("the refusal", &err);
}
