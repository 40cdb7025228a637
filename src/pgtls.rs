//! TLS to PostgreSQL and PgBouncer with libpq's meaning: `sslmode` `disable`, `prefer` (the
//! default), `require`, `verify-ca`, `verify-full`, with `sslrootcert`, `sslcert` and `sslkey`,
//! given as parameters of the target's URL (`postgres://…/db?sslmode=verify-full&sslrootcert=/etc/ssl/pg-ca.pem`).
//!
//! Owns the reading of those parameters and the rustls client configuration they mean. Uses
//! `settings::secret::SecretUrl`; every PostgreSQL and PgBouncer connection (collectors,
//! actions, the advisor, cancel requests) is made through `connect_config` here.
//!
//! As in libpq: `prefer` tries TLS and falls back to plaintext when the server has none, and,
//! like `require`, checks no certificate (encryption without authentication) unless
//! `sslrootcert` is given, in which case `require` verifies the chain as `verify-ca` does;
//! `verify-ca` checks the chain against `sslrootcert`; `verify-full` also checks that the
//! certificate names the host. tokio-postgres knows only disable/prefer/require, so the
//! parameters are taken out of the URL here and the verification is ours.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::settings::secret::SecretUrl;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS when the server offers it, no certificate check.
    Prefer,
    /// TLS or nothing, no certificate check (a chain check with `sslrootcert`).
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // `allow` tries plaintext first: a downgrade by design, refused rather than mapped.
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

/// A connection's settings: tokio-postgres's configuration (TLS parameters taken out) and the
/// TLS connector that means what `sslmode` means.
pub struct PgConnect {
    /// The rest of the URL, for tokio-postgres.
    pub config: tokio_postgres::Config,
    /// The TLS side (unused with `sslmode=disable`, whose configuration forbids TLS).
    pub tls: MakeRustlsConnect,
    /// The mode asked for.
    pub mode: SslMode,
}

/// Reads the URL of a PostgreSQL or PgBouncer target. Errors name the parameter or file, never
/// the URL's secrets.
pub fn connect_config(url: &SecretUrl) -> Result<PgConnect, String> {
    let mut parsed =
        url::Url::parse(url.expose()).map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
    let (mut mode, mut root, mut cert, mut key) = (SslMode::Prefer, None, None, None);
    let mut rest: Vec<(String, String)> = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => mode = SslMode::parse(&v)?,
            "sslrootcert" => root = Some(v.into_owned()),
            "sslcert" => cert = Some(v.into_owned()),
            "sslkey" => key = Some(v.into_owned()),
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    if rest.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(rest);
    }
    let mut config: tokio_postgres::Config = parsed
        .as_str()
        .parse()
        .map_err(|e| url.scrub(&format!("invalid PostgreSQL URL: {e}")))?;
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(
        mode,
        root.as_deref(),
        cert.as_deref(),
        key.as_deref(),
    )?);
    Ok(PgConnect { config, tls, mode })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(
    mode: SslMode,
    root: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?;
    let verify_chain = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)
        || (mode == SslMode::Require && root.is_some());
    let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
        let Some(root) = root else {
            return Err(format!(
                "sslmode={} needs sslrootcert: the CA file to check the server's certificate against",
                if mode == SslMode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                }
            ));
        };
        let pem = std::fs::read(root).map_err(|e| format!("reading sslrootcert {root}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            let c = c.map_err(|e| format!("sslrootcert {root}: {e}"))?;
            roots
                .add(c)
                .map_err(|e| format!("sslrootcert {root}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("sslrootcert {root} holds no certificate"));
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("sslrootcert {root}: {e}"))?;
        Arc::new(Verify {
            inner: webpki,
            check_name: mode == SslMode::VerifyFull,
        })
    } else {
        Arc::new(Unverified(provider))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (cert, key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let pem = std::fs::read(cert).map_err(|e| format!("reading sslcert {cert}: {e}"))?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("sslcert {cert}: {e}"))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert/sslkey: {e}"))
        }
        _ => Err("sslcert and sslkey go together".to_owned()),
    }
}

/// `verify-ca` and `verify-full`: the chain against the roots, and the host name only for the
/// latter (a `verify-ca` certificate may name another host, as libpq allows).
#[derive(Debug)]
struct Verify {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encrypted, the certificate not checked
/// (libpq's meaning); the handshake's signatures still are, so the session key belongs to
/// whoever holds the certificate's key.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> SecretUrl {
        SecretUrl::parse(s).unwrap()
    }

    #[test]
    fn the_parameters_are_read_and_taken_out_of_the_url() {
        let c = connect_config(&url(
            "postgres://u:p@db.internal:5433/app?sslmode=require&application_name=x",
        ))
        .unwrap();
        assert_eq!(c.mode, SslMode::Require);
        assert_eq!(c.config.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(c.config.get_dbname(), Some("app"));
        assert_eq!(c.config.get_application_name(), Some("x"));
        let c = connect_config(&url("postgres://u@db/app")).unwrap();
        assert_eq!(c.mode, SslMode::Prefer);
        let c = connect_config(&url("postgres://u@db/app?sslmode=disable")).unwrap();
        assert_eq!(c.config.get_ssl_mode(), PgSslMode::Disable);
    }

    #[test]
    fn mistakes_are_clear_and_keep_the_password_out() {
        let err = |s: &str| connect_config(&url(s)).err().unwrap();
        assert!(err("postgres://u:s3cret@db/app?sslmode=allow").contains("not one of"));
        let e = err("postgres://u:s3cret@db/app?sslmode=verify-full");
        assert!(e.contains("needs sslrootcert"), "{e}");
        let e = err("postgres://u:s3cret@db/app?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(e.contains("reading sslrootcert /nonexistent/ca.pem"), "{e}");
        assert!(!e.contains("s3cret"));
        let e = err("postgres://u:s3cret@db/app?sslcert=/x.pem");
        assert!(e.contains("go together"), "{e}");
    }
}
