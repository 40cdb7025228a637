//! `SecretUrl`: a URL whose password never reaches a log, an error or a metric.
//!
//! Uses the `url` crate only. `Debug` and `Display` show the redacted form; the full URL is
//! handed out only to the code that connects, through `expose`.

use std::fmt;

/// A URL that may hold a password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl {
    url: url::Url,
    redacted: String,
}

impl SecretUrl {
    /// Parses a URL. The error never repeats the input, which may hold a password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|err| format!("invalid URL: {err}"))?;
        let mut shown = url.clone();
        if shown.password().is_some() {
            // Only fails for URLs that cannot have credentials, which this one just had.
            let _ = shown.set_password(Some("****"));
        }
        // Secrets also travel as parameters (`?password=` for libpq, `?token=` for APIs).
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if secret_param(&k) {
                        "****".to_owned()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            shown.query_pairs_mut().clear().extend_pairs(pairs);
        }
        Ok(SecretUrl {
            redacted: shown.to_string(),
            url,
        })
    }

    /// The full URL, password included: for the connecting code only.
    pub fn expose(&self) -> &str {
        self.url.as_str()
    }

    /// The URL with its password replaced by `****`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The scheme, lower case.
    pub fn scheme(&self) -> &str {
        self.url.scheme()
    }

    /// The password, if the URL has one: to scrub it from third-party error messages.
    pub fn password(&self) -> Option<String> {
        self.url.password().map(|p| {
            // The URL holds it percent-encoded; the server and error texts see it decoded.
            percent_decode(p)
        })
    }

    /// Replaces every occurrence of the password (and of secret parameters) in `text` with
    /// `****`: for error messages from libraries that might echo what they were given.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (k, v) in self.url.query_pairs() {
            if secret_param(&k) && !v.is_empty() {
                out = out.replace(v.as_ref(), "****");
            }
        }
        if let Some(raw) = self.url.password().filter(|p| !p.is_empty()) {
            out = out.replace(raw, "****");
        }
        if let Some(decoded) = self.password().filter(|p| !p.is_empty()) {
            out = out.replace(&decoded, "****");
        }
        out
    }
}

fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Whether a URL parameter carries a secret.
fn secret_param(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password", "passwd", "token", "secret", "apikey", "api_key", "key",
    ]
    .iter()
    .any(|s| n == *s || n.ends_with(&format!("_{s}")) || n.ends_with(s) && n.contains("password"))
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_scrubbed() {
        let u = SecretUrl::parse("redis://user:p%40ss@host:6379/1").unwrap();
        assert_eq!(u.redacted(), "redis://user:****@host:6379/1");
        assert_eq!(format!("{u}"), u.redacted());
        assert_eq!(format!("{u:?}"), "SecretUrl(redis://user:****@host:6379/1)");
        assert_eq!(u.password().as_deref(), Some("p@ss"));
        assert_eq!(
            u.scrub("auth failed for p@ss and p%40ss"),
            "auth failed for **** and ****"
        );
        assert!(u.expose().contains("p%40ss"));
        let plain = SecretUrl::parse("http://host/x").unwrap();
        assert_eq!(plain.redacted(), "http://host/x");
        assert!(
            !SecretUrl::parse("redis://user:secret@[")
                .unwrap_err()
                .contains("secret")
        );
    }
}
