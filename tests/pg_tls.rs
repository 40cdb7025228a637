//! PostgreSQL over TLS (issue 19, item 1): a private cluster that accepts TLS only, with a
//! certificate from a private CA. `sslmode` means what it means in libpq: `verify-full`
//! connects when the CA and host name match, and is refused with the reason when the CA or the
//! host name does not; `verify-ca` checks the chain only; `prefer` (the default) and `require`
//! encrypt without checking; `disable` is refused by a TLS-only server; `require` against a
//! server without TLS fails. Every refusal sets `pg_up 0` with a reason and says why in the
//! log, and the password never appears there.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Autotuner, PgCluster, PgEnv, write_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_means_what_it_means_in_libpq() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    let cluster = PgCluster::start(&env.bin);
    let issuer = ca("autotuner test CA");
    let other = ca("some other CA");
    // The certificate names `localhost` only: connecting to 127.0.0.1 is a host-name mismatch.
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    cluster.enable_tls(&cert.pem(), &key.serialize_pem(), true);

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let other_file = dir.path().join("other.pem");
    std::fs::write(&ca_file, issuer.pem()).unwrap();
    std::fs::write(&other_file, other.pem()).unwrap();
    let port = cluster.port;
    let base = |host: &str| format!("postgres://postgres:pw-s3cret@{host}:{port}/postgres");
    let (ca, other) = (ca_file.display(), other_file.display());
    // The provisioned server has no TLS.
    let plain_server = url::Url::parse(&env.monitor_url).unwrap();
    let targets = [
        (
            "full",
            format!("{}?sslmode=verify-full&sslrootcert={ca}", base("localhost")),
            true,
        ),
        (
            "ca_by_ip",
            format!("{}?sslmode=verify-ca&sslrootcert={ca}", base("127.0.0.1")),
            true,
        ),
        ("prefer", base("127.0.0.1"), true),
        (
            "require",
            format!("{}?sslmode=require", base("127.0.0.1")),
            true,
        ),
        (
            "wrong_ca",
            format!(
                "{}?sslmode=verify-full&sslrootcert={other}",
                base("localhost")
            ),
            false,
        ),
        (
            "wrong_host",
            format!("{}?sslmode=verify-full&sslrootcert={ca}", base("127.0.0.1")),
            false,
        ),
        (
            "disable",
            format!("{}?sslmode=disable", base("127.0.0.1")),
            false,
        ),
        (
            "require_no_tls",
            format!(
                "{}?sslmode=require",
                plain_server.as_str().replace("?", "&")
            ),
            false,
        ),
    ];
    let mut config = String::from(
        "collectors:\n  host:\n    enabled: false\n  postgres:\n    interval: 2s\ntargets:\n  postgres:\n",
    );
    for (name, url, _) in &targets {
        config.push_str(&format!("    - name: {name}\n      url: '{url}'\n"));
    }
    let cdir = tempfile::tempdir().unwrap();
    let path = write_config(&cdir, &config);
    let app = Autotuner::start(&[&format!("--config.file={path}")], &[])
        .await_ready()
        .await;
    let s = app
        .scrape_until(Duration::from_secs(30), "every target measured", |s| {
            targets
                .iter()
                .all(|(n, _, _)| s.value("pg_up", &[("target", n)]).is_some())
        })
        .await;
    for (name, _, up) in &targets {
        assert_eq!(
            s.value("pg_up", &[("target", name)]),
            Some(if *up { 1.0 } else { 0.0 }),
            "{name}: {}",
            s.text
        );
        if !up {
            let reasons: f64 = ["connect", "auth", "timeout", "missing_database", "error"]
                .iter()
                .filter_map(|r| {
                    s.value(
                        "autotuner_target_error",
                        &[("kind", "postgres"), ("target", name), ("reason", r)],
                    )
                })
                .sum();
            assert_eq!(reasons, 1.0, "{name}: one reason");
        }
    }
    // The log says why each was refused, and never the password.
    let log = app.log.lock().unwrap().join("\n");
    assert!(!log.contains("pw-s3cret"), "{log}");
    let line = |target: &str| {
        app.log
            .lock()
            .unwrap()
            .iter()
            .find(|l| {
                l.contains(&format!("\"target_name\":\"{target}\"")) && l.contains("unreachable")
            })
            .cloned()
            .unwrap_or_else(|| panic!("no log line for {target}:\n{log}"))
    };
    let wrong_ca = line("wrong_ca");
    assert!(wrong_ca.contains("UnknownIssuer"), "{wrong_ca}");
    let wrong_host = line("wrong_host");
    assert!(wrong_host.contains("not valid for name"), "{wrong_host}");
    let disable = line("disable");
    assert!(
        disable.contains("no encryption") || disable.contains("pg_hba.conf"),
        "{disable}"
    );
    let no_tls = line("require_no_tls");
    assert!(
        no_tls.to_lowercase().contains("tls") || no_tls.contains("ssl"),
        "{no_tls}"
    );
}

/// PgBouncer's admin console over TLS (`client_tls_sslmode = require`): `verify-full` with
/// the CA connects, plaintext is refused by PgBouncer, a wrong CA by us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_over_tls() {
    let Some(env) = PgEnv::get() else {
        return;
    };
    if common::require("pgbouncer").is_none() {
        return;
    }
    let issuer = ca("autotuner test CA");
    let other = ca("some other CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let bouncer = common::Bouncer::start_with(
        &env,
        "client_tls_sslmode = require\nclient_tls_cert_file = {dir}/server.crt\nclient_tls_key_file = {dir}/server.key\n",
        &[("server.crt", &cert_pem), ("server.key", &key_pem)],
    );
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, other_file) = (dir.path().join("ca.pem"), dir.path().join("other.pem"));
    std::fs::write(&ca_file, issuer.pem()).unwrap();
    std::fs::write(&other_file, other.pem()).unwrap();
    let admin = url::Url::parse(&bouncer.admin_url).unwrap();
    let with = |host: &str, params: &str| {
        let mut u = admin.clone();
        u.set_host(Some(host)).unwrap();
        format!("{u}?{params}")
    };
    let targets = [
        (
            "full",
            with(
                "localhost",
                &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
            ),
            1.0,
        ),
        ("plain", with("127.0.0.1", "sslmode=disable"), 0.0),
        (
            "wrong_ca",
            with(
                "localhost",
                &format!("sslmode=verify-ca&sslrootcert={}", other_file.display()),
            ),
            0.0,
        ),
    ];
    let mut config = String::from(
        "collectors:\n  host:\n    enabled: false\n  pgbouncer:\n    interval: 2s\ntargets:\n  pgbouncer:\n",
    );
    for (name, url, _) in &targets {
        config.push_str(&format!("    - name: {name}\n      url: '{url}'\n"));
    }
    let cdir = tempfile::tempdir().unwrap();
    let path = write_config(&cdir, &config);
    let app = Autotuner::start(&[&format!("--config.file={path}")], &[])
        .await_ready()
        .await;
    let s = app
        .scrape_until(Duration::from_secs(30), "every console measured", |s| {
            targets
                .iter()
                .all(|(n, _, _)| s.value("pgbouncer_up", &[("target", n)]).is_some())
        })
        .await;
    for (name, _, up) in &targets {
        assert_eq!(
            s.value("pgbouncer_up", &[("target", name)]),
            Some(*up),
            "{name}: {}",
            s.text
        );
    }
    let log = app.log.lock().unwrap().join("\n");
    assert!(log.contains("UnknownIssuer"), "{log}");
}
