//! Parsing of scraped exposition bodies: the Prometheus text format (0.0.4, with the 1.0.0
//! quoted-name extension) and OpenMetrics 1.0 text, into samples and declared families.
//!
//! Owns the wire syntax (escapes, values, timestamps, exemplars, `# EOF`), the choice of format
//! from a Content-Type, and which declared family (and so which kind) each sample belongs to.
//! Uses nothing of ours: std, and `thiserror` for the error type.
//!
//! It accepts what Prometheus's own parsers (`promparse.go`, `openmetricsparse.go`) accept, so
//! a target Prometheus can scrape can be scraped here (including their odd corners: labels
//! separated by spaces instead of commas, a raw line break inside a text-format label value),
//! and refuses what a Prometheus scrape fails on: duplicate label names (a `__name__` label
//! counts, as it repeats the metric name), a sample without a metric name, an unknown `# TYPE`
//! word, in OpenMetrics a blank line, a plain comment, a missing `# EOF` or anything after it.
//! Where Prometheus is needlessly strict this is more lenient: CRLF line ends, spaces and tabs
//! anywhere between tokens (OpenMetrics demands single spaces), blanks around the `# TYPE`
//! word, a negative or `+`-signed text timestamp, `# HELP name` with no text, and `# UNIT`
//! lines whatever unit they name.
//!
//! One pass over the bytes, no regex, no backtracking: a body of n bytes costs O(n), plus one
//! hash look-up per `# HELP`/`# TYPE` and a few per sample to find its family. Strings are only
//! allocated for what is returned.
//!
//! Families: the last `# TYPE` for a name wins and applies to all of its samples wherever they
//! are in the body (Prometheus neither refuses a repeated `# TYPE` nor one after the samples). A
//! `# HELP` without a `# TYPE` declares the family as `Kind::Unknown`, as the text format says an
//! undeclared family is untyped.

use std::collections::HashMap;

/// The two wire formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format (`text/plain`, version 0.0.4 or 1.0.0).
    Text,
    /// OpenMetrics 1.0 text (`application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    /// From a response's Content-Type. `text/plain` (any version param, any charset,
    /// case-insensitive media type) -> Text; `application/openmetrics-text` (any version) ->
    /// OpenMetrics. Missing, empty or anything else -> Err with a message saying which content
    /// type was received (Prometheus 3 fails such a scrape too).
    pub fn from_content_type(content_type: Option<&str>) -> Result<Format, String> {
        let raw = content_type.unwrap_or("").trim();
        if raw.is_empty() {
            return Err(
                "the target sent no Content-Type (expected text/plain or application/openmetrics-text)"
                    .to_owned(),
            );
        }
        // Only the media type decides; parameters (version, charset, escaping) change nothing
        // this parser does, so a malformed parameter is no reason to fail the scrape.
        let media = raw.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("text/plain") {
            Ok(Format::Text)
        } else if media.eq_ignore_ascii_case("application/openmetrics-text") {
            Ok(Format::OpenMetrics)
        } else {
            Err(format!(
                "unsupported Content-Type {} (expected text/plain or application/openmetrics-text)",
                excerpt(raw)
            ))
        }
    }
}

/// The Accept header Prometheus sends (OpenMetrics 1.0.0 and 0.0.1 first, then the text format,
/// then anything), with q-values.
pub const ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

/// A family's type as declared by `# TYPE` (Unknown when undeclared; text `untyped` maps to
/// Unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`: samples `name_total` (OpenMetrics) or the declared name, and `name_created`.
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram`: `_bucket`, `_sum`, `_count`, `_created`.
    Histogram,
    /// `gaugehistogram` (OpenMetrics): `_bucket`, `_gsum`, `_gcount` (and `_sum`, `_count`,
    /// `_created`).
    GaugeHistogram,
    /// `summary`: the quantiles under the family name, `_sum`, `_count`, `_created`.
    Summary,
    /// `info` (OpenMetrics): `name_info`.
    Info,
    /// `stateset` (OpenMetrics): one sample per state under the family name.
    StateSet,
    /// `untyped` (text), `unknown` (OpenMetrics), or no `# TYPE` at all.
    Unknown,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name as written (e.g. `http_request_duration_seconds_bucket`), unescaped when
    /// it was quoted.
    pub name: String,
    /// Label pairs in the order written, unescaped. Duplicate label names in one sample are a
    /// parse error.
    pub labels: Vec<(String, String)>,
    /// The value (NaN, +Inf, -Inf allowed; Go-ParseFloat-like leniency: `Inf`, `+Inf`, `-Inf`,
    /// `NaN`, exponent forms, any letter case for the special values).
    pub value: f64,
    /// Milliseconds since the epoch when the line carries a timestamp: text format = integer ms;
    /// OpenMetrics = float seconds, times 1000 truncated toward zero (Prometheus's
    /// `int64(ts * 1000)`).
    pub timestamp_ms: Option<i64>,
    /// The kind of the family this sample belongs to: the declared family of the same name, or
    /// the one this name is a known suffix of (`_bucket`, `_total`, ...), else `Unknown`.
    pub kind: Kind,
}

/// A parsed payload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Every sample line, in order.
    pub samples: Vec<Sample>,
    /// Declared families (from `# TYPE`, or `# HELP` alone) with their kind and help text (from
    /// `# HELP`, unescaped; empty when none), by family name.
    pub families: HashMap<String, (Kind, String)>,
}

/// A parse failure: the 1-based line and what was wrong (short, no payload echo longer than
/// ~60 chars).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// The 1-based line the problem is on (for an unterminated quote, the line it opened on).
    pub line: usize,
    /// What was wrong.
    pub message: String,
}

/// Parses a whole body.
pub fn parse(body: &str, format: Format) -> Result<Exposition, ParseError> {
    let mut parser = Parser {
        s: body,
        i: 0,
        line: 1,
        om: format == Format::OpenMetrics,
    };
    let mut out = Exposition::default();
    parser.body(&mut out)?;
    // Kinds are assigned once every `# TYPE` has been seen, so that all samples of a family
    // agree on its kind whatever the order of lines.
    let Exposition { samples, families } = &mut out;
    for sample in samples.iter_mut() {
        sample.kind = kind_of(&sample.name, families);
    }
    Ok(out)
}

/// The suffixes a family's samples may add to its name. `_gsum` and `_gcount` end with `_sum`
/// and `_count`, so both readings are tried; each is one hash look-up.
const SUFFIXES: [&str; 8] = [
    "_bucket", "_sum", "_count", "_created", "_gsum", "_gcount", "_total", "_info",
];

/// Whether a family of `kind` has samples named with `suffix`.
fn suffix_fits(suffix: &str, kind: Kind) -> bool {
    use Kind::*;
    match suffix {
        "_bucket" => matches!(kind, Histogram | GaugeHistogram),
        "_sum" | "_count" => matches!(kind, Histogram | GaugeHistogram | Summary),
        "_created" => matches!(kind, Histogram | GaugeHistogram | Summary | Counter),
        "_gsum" | "_gcount" => kind == GaugeHistogram,
        "_total" => kind == Counter,
        "_info" => kind == Info,
        _ => false,
    }
}

/// The kind of the family `name` belongs to. An exact declaration wins (the Python client
/// declares `x_created` as a gauge in the text format); an exact entry that is only `Unknown`
/// (a `# HELP` alone, or `untyped`) does not hide a typed family the name is a suffix of.
fn kind_of(name: &str, families: &HashMap<String, (Kind, String)>) -> Kind {
    if let Some((kind, _)) = families.get(name)
        && *kind != Kind::Unknown
    {
        return *kind;
    }
    for suffix in SUFFIXES {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some((kind, _)) = families.get(base)
            && suffix_fits(suffix, *kind)
        {
            return *kind;
        }
    }
    Kind::Unknown
}

/// The `# TYPE` word, per format: each accepts only its own vocabulary, like Prometheus.
fn kind_from_word(word: &str, om: bool) -> Option<Kind> {
    Some(match (word, om) {
        ("counter", _) => Kind::Counter,
        ("gauge", _) => Kind::Gauge,
        ("histogram", _) => Kind::Histogram,
        ("summary", _) => Kind::Summary,
        ("untyped", false) => Kind::Unknown,
        ("gaugehistogram", true) => Kind::GaugeHistogram,
        ("info", true) => Kind::Info,
        ("stateset", true) => Kind::StateSet,
        ("unknown", true) => Kind::Unknown,
        _ => return None,
    })
}

/// Spaces between tokens. A carriage return counts as one, which is what makes CRLF bodies
/// parse (Prometheus refuses them; nothing is gained by that).
fn is_blank(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r')
}

fn is_metric_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_metric_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

fn is_label_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_label_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// `s` quoted for a message, cut to about 60 bytes (at a character boundary).
fn excerpt(s: &str) -> String {
    const MAX: usize = 60;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", s.get(..end).unwrap_or(""))
}

/// Undoes the escapes of a quoted string or help text: `\\` and `\n`, and `\"` when `quote`.
/// Any other backslash sequence is kept as written, as Prometheus's replacers do.
fn unescape(raw: &str, quote: bool) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some((before, after)) = rest.split_once('\\') {
        out.push_str(before);
        let mut chars = after.chars();
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if quote => out.push('"'),
            Some(c) => {
                out.push('\\');
                out.push(c);
            }
            None => out.push('\\'),
        }
        rest = chars.as_str();
    }
    out.push_str(rest);
    out
}

/// Go's `strconv.ParseFloat` as Prometheus calls it: decimal with optional exponent, `inf` /
/// `infinity` with an optional sign and `nan` without one (any letter case); no hex, no `_`,
/// and a finite literal too large for an f64 is an error (Go's ErrRange), not infinity.
fn parse_float(token: &str) -> Option<f64> {
    let (negative, unsigned) = match token.as_bytes().first() {
        Some(b'-') => (true, token.get(1..).unwrap_or("")),
        Some(b'+') => (false, token.get(1..).unwrap_or("")),
        _ => (false, token),
    };
    if unsigned.eq_ignore_ascii_case("inf") || unsigned.eq_ignore_ascii_case("infinity") {
        return Some(if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if token.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    if !is_decimal(unsigned) {
        return None;
    }
    token.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// `digits [. digits] [e [sign] digits]`, at least one mantissa digit (`1.` and `.5` are fine).
fn is_decimal(s: &str) -> bool {
    let mut it = s.bytes().peekable();
    let mut digits = 0usize;
    while it.next_if(u8::is_ascii_digit).is_some() {
        digits += 1;
    }
    if it.next_if_eq(&b'.').is_some() {
        while it.next_if(u8::is_ascii_digit).is_some() {
            digits += 1;
        }
    }
    if digits == 0 {
        return false;
    }
    if it.next_if(|c| matches!(c, b'e' | b'E')).is_some() {
        it.next_if(|c| matches!(c, b'+' | b'-'));
        let mut exponent = 0usize;
        while it.next_if(u8::is_ascii_digit).is_some() {
            exponent += 1;
        }
        if exponent == 0 {
            return false;
        }
    }
    it.next().is_none()
}

/// Refuses label sets Prometheus's scrape refuses: a duplicate name, an empty name, and
/// `__name__` (the metric name is not a label here; Prometheus sees it as a duplicate).
fn check_labels(labels: &[(String, String)]) -> Result<(), String> {
    for (name, _) in labels {
        if name.is_empty() {
            return Err("empty label name".to_owned());
        }
        if name == "__name__" {
            return Err(
                "label __name__ is not allowed (it would repeat the metric name)".to_owned(),
            );
        }
    }
    let duplicate = if labels.len() <= 8 {
        // The usual case: a few labels, compared pairwise without allocating.
        labels.iter().enumerate().find_map(|(i, (a, _))| {
            labels
                .iter()
                .skip(i + 1)
                .any(|(b, _)| a == b)
                .then_some(a.as_str())
        })
    } else {
        // Many labels: sort the names so a hostile line cannot cost quadratic time.
        let mut names: Vec<&str> = labels.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.windows(2).find_map(|w| match w {
            [a, b] if a == b => Some(*a),
            _ => None,
        })
    };
    match duplicate {
        Some(name) => Err(format!("duplicate label name {}", excerpt(name))),
        None => Ok(()),
    }
}

/// Where a label list's contents go: a sample keeps them (and may take its metric name from a
/// lone quoted string), an exemplar's are checked and dropped.
enum Dest<'x> {
    Sample {
        name: &'x mut Option<String>,
        labels: &'x mut Vec<(String, String)>,
    },
    Exemplar,
}

/// A cursor over the body. `i` is always at a character boundary between tokens: every token
/// ends on an ASCII byte or at the end.
struct Parser<'a> {
    s: &'a str,
    i: usize,
    /// The 1-based line `i` is on.
    line: usize,
    om: bool,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.i).copied()
    }

    fn slice(&self, from: usize, to: usize) -> &'a str {
        self.s.get(from..to).unwrap_or("")
    }

    fn rest(&self) -> &'a str {
        self.s.get(self.i..).unwrap_or("")
    }

    fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            message: message.into(),
        }
    }

    /// What is at the cursor, for an error message.
    fn got(&self) -> String {
        match self.peek() {
            None => "end of input".to_owned(),
            Some(b'\n') => "a line break".to_owned(),
            Some(_) => {
                let rest = self.rest();
                let line = rest.split('\n').next().unwrap_or(rest);
                excerpt(line.trim_end_matches('\r'))
            }
        }
    }

    /// Skips spaces, tabs and carriage returns; whether there were any.
    fn skip_blanks(&mut self) -> bool {
        let start = self.i;
        while self.peek().is_some_and(is_blank) {
            self.i += 1;
        }
        self.i > start
    }

    /// Consumes one line break.
    fn newline(&mut self) {
        self.i += 1;
        self.line += 1;
    }

    /// The rest of the current line (without its line break or a trailing CR), leaving the
    /// cursor after the line break.
    fn take_line(&mut self) -> &'a str {
        let rest = self.rest();
        let (line, consumed) = match rest.split_once('\n') {
            Some((line, _)) => (line, line.len() + 1),
            None => (rest, rest.len()),
        };
        self.i += consumed;
        if consumed > line.len() {
            self.line += 1;
        }
        line.strip_suffix('\r').unwrap_or(line)
    }

    /// Requires the end of the line (blanks allowed) and consumes it.
    fn end_of_line(&mut self, after: &str) -> Result<(), ParseError> {
        self.skip_blanks();
        match self.peek() {
            None => Ok(()),
            Some(b'\n') => {
                self.newline();
                Ok(())
            }
            Some(_) => Err(self.err(format!(
                "expected the end of the line after {after}, got {}",
                self.got()
            ))),
        }
    }

    /// A name made of one `first` byte then `rest` bytes; empty when there is none.
    fn take_name(&mut self, first: fn(u8) -> bool, rest: fn(u8) -> bool) -> &'a str {
        let start = self.i;
        if self.peek().is_some_and(first) {
            self.i += 1;
            while self.peek().is_some_and(rest) {
                self.i += 1;
            }
        }
        self.slice(start, self.i)
    }

    /// A value or timestamp: everything up to the next blank or line break.
    fn token(&mut self) -> &'a str {
        let start = self.i;
        while self.peek().is_some_and(|c| !is_blank(c) && c != b'\n') {
            self.i += 1;
        }
        self.slice(start, self.i)
    }

    /// A double-quoted string at the cursor, returned raw (escapes intact, quotes stripped).
    /// A backslash escapes the next character, except a line break; a raw line break inside
    /// the quotes is allowed only when `multiline` (Prometheus's lexers allow it everywhere
    /// except in OpenMetrics label values).
    fn quoted(&mut self, multiline: bool) -> Result<&'a str, ParseError> {
        let opened = self.line;
        let unterminated = |what: &str| ParseError {
            line: opened,
            message: format!("unterminated quoted string{what}"),
        };
        self.i += 1;
        let start = self.i;
        let bytes = self.s.as_bytes();
        loop {
            match bytes.get(self.i) {
                None => return Err(unterminated("")),
                Some(b'"') => {
                    let raw = self.slice(start, self.i);
                    self.i += 1;
                    return Ok(raw);
                }
                Some(b'\\') => match bytes.get(self.i + 1) {
                    None => return Err(unterminated("")),
                    Some(b'\n') => {
                        return Err(self.err("line break after a backslash in a quoted string"));
                    }
                    // A multi-byte character after the backslash: its continuation bytes are
                    // stepped over one by one below, none of them is a quote or backslash.
                    Some(_) => self.i += 2,
                },
                Some(b'\n') if multiline => self.newline(),
                Some(b'\n') => return Err(unterminated(" (line break inside the quotes)")),
                Some(_) => self.i += 1,
            }
        }
    }

    /// The whole body.
    fn body(&mut self, out: &mut Exposition) -> Result<(), ParseError> {
        loop {
            self.skip_blanks();
            match self.peek() {
                None if self.om => {
                    // Name the last line rather than the empty one after its line break.
                    let line = if self.s.ends_with('\n') {
                        self.line.saturating_sub(1).max(1)
                    } else {
                        self.line
                    };
                    return Err(ParseError {
                        line,
                        message: "data does not end with # EOF".to_owned(),
                    });
                }
                None => return Ok(()),
                Some(b'\n') if self.om => {
                    return Err(self.err("blank line (OpenMetrics allows none)"));
                }
                Some(b'\n') => self.newline(),
                Some(b'#') => {
                    if self.comment(out)? {
                        return Ok(());
                    }
                }
                Some(_) => self.sample(out)?,
            }
        }
    }

    /// A line starting with `#`. Returns true at `# EOF` (OpenMetrics only), which must end
    /// the body.
    fn comment(&mut self, out: &mut Exposition) -> Result<bool, ParseError> {
        self.i += 1;
        if !self.skip_blanks() {
            if self.om {
                return Err(self.err(format!("expected a space after '#', got {}", self.got())));
            }
            self.take_line();
            return Ok(false);
        }
        let rest = self.rest().as_bytes();
        let keyword = |word: &[u8]| {
            rest.starts_with(word)
                && rest
                    .get(word.len())
                    .is_some_and(|c| matches!(c, b' ' | b'\t'))
        };
        if keyword(b"HELP") {
            self.metadata(Meta::Help, out)?;
        } else if keyword(b"TYPE") {
            self.metadata(Meta::Type, out)?;
        } else if self.om && keyword(b"UNIT") {
            self.metadata(Meta::Unit, out)?;
        } else if self.om && rest.starts_with(b"EOF") {
            self.i += 3;
            self.skip_blanks();
            if self.peek() == Some(b'\n') {
                self.newline();
            }
            if self.peek().is_some() {
                return Err(self.err("unexpected data after # EOF"));
            }
            return Ok(true);
        } else if self.om {
            return Err(self.err(format!(
                "unsupported comment {} (OpenMetrics allows only # HELP, # TYPE, # UNIT and # EOF)",
                self.got()
            )));
        } else {
            // Any other comment of the text format carries nothing.
            self.take_line();
        }
        Ok(false)
    }

    /// `# HELP`, `# TYPE` or `# UNIT` with the cursor on the keyword.
    fn metadata(&mut self, meta: Meta, out: &mut Exposition) -> Result<(), ParseError> {
        self.i += 4;
        self.skip_blanks();
        let keyword = meta.keyword();
        let name = if self.peek() == Some(b'"') {
            unescape(self.quoted(true)?, true)
        } else {
            self.take_name(is_metric_start, is_metric_char).to_owned()
        };
        if name.is_empty() {
            return Err(self.err(format!(
                "expected a metric name after # {keyword}, got {}",
                self.got()
            )));
        }
        let line = self.line;
        let whole = self.take_line();
        // The text after the single separator that follows the name. Prometheus's text lexer
        // drops whatever character is there; OpenMetrics requires a space.
        let mut chars = whole.chars();
        let text = match chars.next() {
            None => "",
            Some(' ' | '\t') => chars.as_str(),
            Some(_) if !self.om => chars.as_str(),
            Some(_) => {
                return Err(ParseError {
                    line,
                    message: format!(
                        "expected a space after the metric name in # {keyword}, got {}",
                        excerpt(whole)
                    ),
                });
            }
        };
        match meta {
            Meta::Help => {
                let help = unescape(text, self.om);
                family(&mut out.families, name).1 = help;
            }
            Meta::Type => {
                let word = text.trim_matches([' ', '\t']);
                let Some(kind) = kind_from_word(word, self.om) else {
                    return Err(ParseError {
                        line,
                        message: format!("invalid metric type {}", excerpt(word)),
                    });
                };
                family(&mut out.families, name).0 = kind;
            }
            // The unit changes nothing a scrape stores (Prometheus 2.x/3.x without the
            // type-and-unit labels feature ignores it too).
            Meta::Unit => {}
        }
        Ok(())
    }

    /// A sample line with the cursor on its first character.
    fn sample(&mut self, out: &mut Exposition) -> Result<(), ParseError> {
        let mut name = None;
        if self.peek() != Some(b'{') {
            let plain = self.take_name(is_metric_start, is_metric_char);
            if plain.is_empty() {
                return Err(self.err(format!("expected a metric name, got {}", self.got())));
            }
            name = Some(plain.to_owned());
            self.skip_blanks();
        }
        let mut labels = Vec::new();
        if self.peek() == Some(b'{') {
            self.labels(Dest::Sample {
                name: &mut name,
                labels: &mut labels,
            })?;
        }
        let Some(name) = name else {
            return Err(self.err("no metric name (neither before the braces nor quoted inside)"));
        };
        check_labels(&labels).map_err(|message| self.err(message))?;

        self.skip_blanks();
        let token = self.token();
        if token.is_empty() {
            return Err(self.err(format!(
                "expected a value after the metric, got {}",
                self.got()
            )));
        }
        let value = parse_float(token)
            .ok_or_else(|| self.err(format!("invalid value {}", excerpt(token))))?;

        let mut timestamp_ms = None;
        let spaced = self.skip_blanks();
        match self.peek() {
            None | Some(b'\n') => {}
            Some(b'#') if self.om && spaced => self.exemplar()?,
            Some(_) if !spaced => {
                return Err(self.err(format!(
                    "expected a space after the value, got {}",
                    self.got()
                )));
            }
            Some(_) => {
                let token = self.token();
                timestamp_ms = Some(if self.om {
                    match parse_float(token).filter(|t| t.is_finite()) {
                        // As Prometheus: int64(ts * 1000), which truncates toward zero.
                        Some(seconds) => (seconds * 1000.0) as i64,
                        None => {
                            return Err(self.err(format!("invalid timestamp {}", excerpt(token))));
                        }
                    }
                } else {
                    token.parse::<i64>().map_err(|_| {
                        self.err(format!(
                            "invalid timestamp {} (expected integer milliseconds)",
                            excerpt(token)
                        ))
                    })?
                });
                if self.skip_blanks() && self.om && self.peek() == Some(b'#') {
                    self.exemplar()?;
                }
            }
        }
        self.end_of_line(if timestamp_ms.is_some() {
            "the timestamp"
        } else {
            "the value"
        })?;
        out.samples.push(Sample {
            name,
            labels,
            value,
            timestamp_ms,
            kind: Kind::Unknown,
        });
        Ok(())
    }

    /// An OpenMetrics exemplar, `# {labels} value [timestamp]`, with the cursor on the `#`:
    /// checked and dropped (nothing here stores exemplars).
    fn exemplar(&mut self) -> Result<(), ParseError> {
        self.i += 1;
        self.skip_blanks();
        if self.peek() != Some(b'{') {
            return Err(self.err(format!(
                "expected '{{' to open an exemplar's labels, got {}",
                self.got()
            )));
        }
        self.labels(Dest::Exemplar)?;
        self.skip_blanks();
        let token = self.token();
        if token.is_empty() {
            return Err(self.err(format!("expected an exemplar value, got {}", self.got())));
        }
        if parse_float(token).is_none() {
            return Err(self.err(format!("invalid exemplar value {}", excerpt(token))));
        }
        self.skip_blanks();
        let token = self.token();
        if !token.is_empty() && parse_float(token).is_none_or(|t| !t.is_finite()) {
            return Err(self.err(format!("invalid exemplar timestamp {}", excerpt(token))));
        }
        Ok(())
    }

    /// A brace-enclosed label list with the cursor on the `{`. A quoted string followed by a
    /// comma or the closing brace is the metric name (the 1.0.0 extension), not a label.
    fn labels(&mut self, mut dest: Dest<'_>) -> Result<(), ParseError> {
        self.i += 1;
        loop {
            self.skip_blanks();
            let label = match self.peek() {
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'"') => {
                    let raw = self.quoted(true)?;
                    self.skip_blanks();
                    if let Some(c @ (b',' | b'}')) = self.peek() {
                        match &mut dest {
                            Dest::Exemplar => {
                                return Err(self.err("an exemplar cannot name a metric"));
                            }
                            Dest::Sample { name, .. } => {
                                if name.is_some() {
                                    return Err(self.err("the metric name is given twice"));
                                }
                                if raw.is_empty() {
                                    return Err(self.err("empty metric name"));
                                }
                                **name = Some(unescape(raw, true));
                            }
                        }
                        if c == b',' {
                            self.i += 1;
                        }
                        continue;
                    }
                    raw
                }
                Some(c) if is_label_start(c) => self.take_name(is_label_start, is_label_char),
                _ => {
                    return Err(self.err(format!("expected a label name, got {}", self.got())));
                }
            };
            self.skip_blanks();
            if self.peek() != Some(b'=') {
                return Err(self.err(format!(
                    "expected '=' after label name {}, got {}",
                    excerpt(label),
                    self.got()
                )));
            }
            self.i += 1;
            self.skip_blanks();
            if self.peek() != Some(b'"') {
                return Err(self.err(format!(
                    "expected a quoted value for label {}, got {}",
                    excerpt(label),
                    self.got()
                )));
            }
            let value = self.quoted(!self.om)?;
            if let Dest::Sample { labels, .. } = &mut dest {
                labels.push((unescape(label, true), unescape(value, true)));
            }
            self.skip_blanks();
            // The comma is optional: Prometheus's text parser takes labels separated by spaces.
            if self.peek() == Some(b',') {
                self.i += 1;
            }
        }
    }
}

/// The metadata comments.
#[derive(Clone, Copy)]
enum Meta {
    Help,
    Type,
    Unit,
}

impl Meta {
    fn keyword(self) -> &'static str {
        match self {
            Meta::Help => "HELP",
            Meta::Type => "TYPE",
            Meta::Unit => "UNIT",
        }
    }
}

/// The family entry for `name`, created undeclared (`Unknown`, no help) when new.
fn family(families: &mut HashMap<String, (Kind, String)>, name: String) -> &mut (Kind, String) {
    families
        .entry(name)
        .or_insert_with(|| (Kind::Unknown, String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(body: &str) -> Exposition {
        match parse(body, Format::Text) {
            Ok(e) => e,
            Err(e) => panic!("text body refused: {e}\n{body}"),
        }
    }

    fn om(body: &str) -> Exposition {
        match parse(body, Format::OpenMetrics) {
            Ok(e) => e,
            Err(e) => panic!("OpenMetrics body refused: {e}\n{body}"),
        }
    }

    fn refused(body: &str, format: Format) -> ParseError {
        match parse(body, format) {
            Ok(e) => panic!("accepted {body:?} as {format:?}: {e:?}"),
            Err(e) => e,
        }
    }

    /// The first sample named `name`.
    fn find<'e>(e: &'e Exposition, name: &str) -> &'e Sample {
        e.samples
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no sample {name} in {:?}", e.samples))
    }

    fn labels(s: &Sample) -> Vec<(&str, &str)> {
        s.labels
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    fn value(body: &str) -> f64 {
        text(&format!("m {body}\n")).samples[0].value
    }

    #[test]
    fn content_types_choose_the_format() {
        let ok = |ct: &str| Format::from_content_type(Some(ct));
        assert_eq!(ok("text/plain"), Ok(Format::Text));
        assert_eq!(
            ok("text/plain; version=0.0.4; charset=utf-8"),
            Ok(Format::Text)
        );
        assert_eq!(
            ok("Text/Plain;Version=1.0.0;escaping=allow-utf-8"),
            Ok(Format::Text)
        );
        assert_eq!(
            ok("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            Ok(Format::OpenMetrics)
        );
        assert_eq!(
            ok("APPLICATION/OpenMetrics-Text;version=0.0.1"),
            Ok(Format::OpenMetrics)
        );
        for missing in [None, Some(""), Some("   ")] {
            let err = Format::from_content_type(missing).unwrap_err();
            assert!(err.contains("no Content-Type"), "{err}");
        }
        let err = ok("application/json; charset=utf-8").unwrap_err();
        assert!(err.contains("\"application/json; charset=utf-8\""), "{err}");
        let err = ok("application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily")
            .unwrap_err();
        assert!(err.contains("application/vnd.google.protobuf"), "{err}");
        // A hostile header is not echoed whole.
        let long = format!("x/{}", "y".repeat(500));
        assert!(ok(&long).unwrap_err().len() < 160);
    }

    #[test]
    fn accept_prefers_openmetrics_then_text() {
        let types: Vec<&str> = ACCEPT.split(',').collect();
        assert_eq!(types.len(), 4);
        assert!(types[0].starts_with("application/openmetrics-text;version=1.0.0;q=0.5"));
        assert!(types[1].starts_with("application/openmetrics-text;version=0.0.1;q=0.4"));
        assert!(types[2].starts_with("text/plain;version=0.0.4;q=0.3"));
        assert_eq!(types[3], "*/*;q=0.2");
    }

    #[test]
    fn label_values_unescape_every_escape() {
        let body = r#"m{q="say \"hi\"",b="C:\\dir\\",n="one\ntwo",p="a,b=c}d{e",w="\\n"} 1
"#;
        let e = text(body);
        assert_eq!(
            labels(&e.samples[0]),
            vec![
                ("q", "say \"hi\""),
                ("b", "C:\\dir\\"),
                ("n", "one\ntwo"),
                ("p", "a,b=c}d{e"),
                ("w", "\\n"),
            ]
        );
        // The same in OpenMetrics.
        let e = om(&format!("{body}# EOF\n"));
        assert_eq!(labels(&e.samples[0])[0], ("q", "say \"hi\""));
        assert_eq!(labels(&e.samples[0])[4], ("w", "\\n"));
    }

    #[test]
    fn unknown_escapes_are_kept_as_written() {
        let e = text("m{a=\"tab\\there\",b=\"\\x41\",c=\"\\é\",d=\"end\\\\\"} 1\n");
        assert_eq!(
            labels(&e.samples[0]),
            vec![
                ("a", "tab\\there"),
                ("b", "\\x41"),
                ("c", "\\é"),
                ("d", "end\\"),
            ]
        );
    }

    #[test]
    fn help_escapes_differ_by_format() {
        let e = text("# HELP m a \\\\ b\\nc \\\"d\\\" \\t\n");
        assert_eq!(
            e.families["m"],
            (Kind::Unknown, "a \\ b\nc \\\"d\\\" \\t".into())
        );
        let e = om("# HELP m a \\\\ b\\nc \\\"d\\\" \\t\n# EOF\n");
        assert_eq!(e.families["m"].1, "a \\ b\nc \"d\" \\t");
        // Everything after the one separator space is the text, spaces included.
        let e = text("# HELP m   spaced  \n# HELP n\n");
        assert_eq!(e.families["m"].1, "  spaced  ");
        assert_eq!(e.families["n"].1, "");
    }

    #[test]
    fn special_and_exponent_values() {
        assert!(value("NaN").is_nan());
        assert!(value("nan").is_nan());
        assert_eq!(value("+Inf"), f64::INFINITY);
        assert_eq!(value("Inf"), f64::INFINITY);
        assert_eq!(value("inf"), f64::INFINITY);
        assert_eq!(value("+infinity"), f64::INFINITY);
        assert_eq!(value("-Inf"), f64::NEG_INFINITY);
        assert_eq!(value("-INF"), f64::NEG_INFINITY);
        assert_eq!(value("1.2345e+06"), 1_234_500.0);
        assert_eq!(value("8.3146551296e+10"), 83_146_551_296.0);
        assert_eq!(value("1E-3"), 0.001);
        assert_eq!(value(".5"), 0.5);
        assert_eq!(value("1."), 1.0);
        assert_eq!(value("-0"), 0.0);
        assert_eq!(value("+17"), 17.0);
        assert_eq!(value("1e-400"), 0.0, "underflow is zero, as in Go");
        for bad in [
            "abc", "0x10", "0x1p3", "1_000", "1p3", "+nan", "-NaN", "infin", "1e", "1e+", ".", "-",
            "1.2.3", "1e400", "--1", "١",
        ] {
            let err = refused(&format!("m {bad}\n"), Format::Text);
            assert_eq!(err.line, 1);
            assert!(err.message.contains("invalid value"), "{bad}: {err}");
        }
    }

    #[test]
    fn text_timestamps_are_integer_milliseconds() {
        let e = text("a 1 1700000000123\nb 2 -5\nc 3\t+7\nd 4\n");
        let ts: Vec<Option<i64>> = e.samples.iter().map(|s| s.timestamp_ms).collect();
        assert_eq!(ts, vec![Some(1_700_000_000_123), Some(-5), Some(7), None]);
        for bad in ["a 1 1.5", "a 1 1e3", "a 1 9223372036854775808", "a 1 x"] {
            let err = refused(bad, Format::Text);
            assert!(err.message.contains("invalid timestamp"), "{bad}: {err}");
        }
        let err = refused("a 1 2 3\n", Format::Text);
        assert!(err.message.contains("end of the line"), "{err}");
    }

    #[test]
    fn openmetrics_timestamps_are_float_seconds_truncated_to_ms() {
        let e = om("a 1 1700000000\nb 1 1.5\nc 1 -1.25\nd 1 0.0019\ne 1 -0.0019\nf 1 1e3\n# EOF\n");
        let ts: Vec<Option<i64>> = e.samples.iter().map(|s| s.timestamp_ms).collect();
        // Truncated toward zero like Prometheus's int64(ts*1000), not rounded.
        assert_eq!(
            ts,
            vec![
                Some(1_700_000_000_000),
                Some(1500),
                Some(-1250),
                Some(1),
                Some(-1),
                Some(1_000_000)
            ]
        );
        for bad in ["NaN", "+Inf", "x", "1_0"] {
            let err = refused(&format!("a 1 {bad}\n# EOF\n"), Format::OpenMetrics);
            assert!(err.message.contains("invalid timestamp"), "{bad}: {err}");
        }
    }

    #[test]
    fn suffixes_map_samples_to_their_family_kind() {
        let e = om(r#"# TYPE h histogram
h_bucket{le="1"} 1
h_bucket{le="+Inf"} 2
h_sum 3
h_count 2
h_created 1.7e9
# TYPE s summary
s{quantile="0.5"} 1
s_sum 1
s_count 1
s_created 1.7e9
# TYPE c counter
c_total 5
c_created 1.7e9
# TYPE gh gaugehistogram
gh_bucket{le="+Inf"} 1
gh_gsum 1
gh_gcount 1
# TYPE i info
i_info{v="1"} 1
# TYPE st stateset
st{st="a"} 1
# TYPE g gauge
g 1
g_total 1
g_bucket 1
# TYPE u unknown
u 1
u_sum 1
loose_bucket 1
s_total 1
c_sum 1
i 1
# EOF
"#);
        let kind = |name: &str| find(&e, name).kind;
        for name in ["h_bucket", "h_sum", "h_count", "h_created"] {
            assert_eq!(kind(name), Kind::Histogram, "{name}");
        }
        for name in ["s", "s_sum", "s_count", "s_created"] {
            assert_eq!(kind(name), Kind::Summary, "{name}");
        }
        assert_eq!(kind("c_total"), Kind::Counter);
        assert_eq!(kind("c_created"), Kind::Counter);
        for name in ["gh_bucket", "gh_gsum", "gh_gcount"] {
            assert_eq!(kind(name), Kind::GaugeHistogram, "{name}");
        }
        assert_eq!(kind("i_info"), Kind::Info);
        assert_eq!(kind("st"), Kind::StateSet);
        // The family's own name belongs to it whatever its kind.
        assert_eq!(kind("i"), Kind::Info);
        assert_eq!(kind("g"), Kind::Gauge);
        // A suffix counts only for the kinds that have it.
        for name in [
            "g_total",
            "g_bucket",
            "u",
            "u_sum",
            "loose_bucket",
            "s_total",
            "c_sum",
        ] {
            assert_eq!(kind(name), Kind::Unknown, "{name}");
        }
        assert_eq!(e.families.len(), 8);
        assert_eq!(e.families["gh"], (Kind::GaugeHistogram, String::new()));
    }

    #[test]
    fn text_counters_and_untyped() {
        let e = text(
            "# TYPE a_total counter\na_total 1\n# TYPE b counter\nb_total 2\nb 3\n# TYPE u untyped\nu 4\n",
        );
        assert_eq!(find(&e, "a_total").kind, Kind::Counter);
        assert_eq!(find(&e, "b_total").kind, Kind::Counter);
        assert_eq!(find(&e, "b").kind, Kind::Counter);
        assert_eq!(find(&e, "u").kind, Kind::Unknown);
        assert_eq!(e.families["u"].0, Kind::Unknown);
    }

    #[test]
    fn type_words_are_per_format() {
        for (line, format) in [
            ("# TYPE x gaugehistogram\n", Format::Text),
            ("# TYPE x info\n", Format::Text),
            ("# TYPE x unknown\n", Format::Text),
            ("# TYPE x Counter\n", Format::Text),
            ("# TYPE x\n", Format::Text),
            ("# TYPE x untyped\n# EOF\n", Format::OpenMetrics),
            ("# TYPE x bogus\n# EOF\n", Format::OpenMetrics),
        ] {
            let err = refused(line, format);
            assert_eq!(err.line, 1);
            assert!(err.message.contains("invalid metric type"), "{line}: {err}");
        }
        // Surrounding blanks around the word are forgiven.
        assert_eq!(text("# TYPE x\tgauge \n").families["x"].0, Kind::Gauge);
    }

    #[test]
    fn late_and_repeated_type_lines_are_accepted_last_wins() {
        let e = text("x 1\n# TYPE x counter\nx 2\n# TYPE x gauge\n# HELP x second\n");
        assert!(e.samples.iter().all(|s| s.kind == Kind::Gauge));
        assert_eq!(e.families["x"], (Kind::Gauge, "second".into()));
    }

    #[test]
    fn help_alone_declares_an_unknown_family() {
        let e = text("# HELP x Some help.\nx 1\n");
        assert_eq!(e.families["x"], (Kind::Unknown, "Some help.".into()));
        assert_eq!(e.samples[0].kind, Kind::Unknown);
        // An untyped exact entry does not hide the typed family it is a suffix of.
        let e = text("# TYPE h histogram\n# HELP h_sum Sum.\nh_sum 1\n");
        assert_eq!(e.samples[0].kind, Kind::Histogram);
    }

    #[test]
    fn quoted_names_of_the_utf8_extension() {
        let body = r#"# HELP "my.metric.name" Dotted.
# TYPE "my.metric.name" counter
{"my.metric.name", "label.with.dots"="v", plain="p"} 1
{"label.first"="x", "my.metric.name"} 2
{"only.name"} 3
{"esc\"aped\\name","new\nline"="v"} 4
"#;
        for e in [text(body), om(&format!("{body}# EOF\n"))] {
            assert_eq!(e.samples[0].name, "my.metric.name");
            assert_eq!(
                labels(&e.samples[0]),
                vec![("label.with.dots", "v"), ("plain", "p")]
            );
            assert_eq!(e.samples[0].kind, Kind::Counter);
            assert_eq!(e.samples[1].name, "my.metric.name");
            assert_eq!(labels(&e.samples[1]), vec![("label.first", "x")]);
            assert_eq!(e.samples[2].name, "only.name");
            assert!(e.samples[2].labels.is_empty());
            assert_eq!(e.samples[3].name, "esc\"aped\\name");
            assert_eq!(labels(&e.samples[3]), vec![("new\nline", "v")]);
            assert_eq!(e.families["my.metric.name"].1, "Dotted.");
        }
        // A name both outside and inside, twice inside, or nowhere, is refused.
        for bad in [
            r#"m{"n"} 1"#,
            r#"{"n","o"} 1"#,
            r#"{a="b"} 1"#,
            "{} 1",
            r#"{""} 1"#,
        ] {
            let err = refused(bad, Format::Text);
            assert!(err.message.contains("metric name"), "{bad}: {err}");
        }
    }

    #[test]
    fn lenient_spacing_trailing_commas_and_empty_braces() {
        let e = text(
            "a{x=\"1\",} 1\nb{} 2\n\tc\t{ x = \"1\" ,\ty=\"2\" }\t3\t4\n  d 5  \ne{x=\"1\" y=\"2\"} 6\nf{x=\"1\"}7\n\n   \n:g_h:i 8\n",
        );
        let got: Vec<(&str, usize, f64)> = e
            .samples
            .iter()
            .map(|s| (s.name.as_str(), s.labels.len(), s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 1, 1.0),
                ("b", 0, 2.0),
                ("c", 2, 3.0),
                ("d", 0, 5.0),
                ("e", 2, 6.0),
                ("f", 1, 7.0),
                (":g_h:i", 0, 8.0),
            ]
        );
        assert_eq!(e.samples[2].timestamp_ms, Some(4));
        assert_eq!(labels(&e.samples[2]), vec![("x", "1"), ("y", "2")]);
        // Empty values are kept: dropping them is the caller's business.
        let e = text("m{a=\"\",b=\"x\"} 1\n");
        assert_eq!(labels(&e.samples[0]), vec![("a", ""), ("b", "x")]);
    }

    #[test]
    fn crlf_line_ends_are_accepted() {
        let e = text("# HELP m Help.\r\n# TYPE m gauge\r\nm{a=\"b\"} 1 5\r\nn 2\r\n\r\n");
        assert_eq!(e.families["m"], (Kind::Gauge, "Help.".into()));
        assert_eq!(e.samples.len(), 2);
        assert_eq!(e.samples[0].timestamp_ms, Some(5));
        assert_eq!(e.samples[1].value, 2.0);
        let e = om("# TYPE m gauge\r\nm 1\r\n# EOF\r\n");
        assert_eq!(e.samples[0].kind, Kind::Gauge);
    }

    #[test]
    fn text_comments_are_ignored_openmetrics_comments_refused() {
        let e = text(
            "# just a comment\n#HELP x not metadata\n# HELPx y\n#\n# UNIT x bytes\n# EOF\nm 1\n",
        );
        assert_eq!(e.samples.len(), 1);
        assert!(e.families.is_empty());
        for (body, line) in [
            ("m 1\n# just a comment\n# EOF\n", 2),
            ("#HELP x y\n# EOF\n", 1),
            ("m 1\n\n# EOF\n", 2),
            ("m 1\n   \n# EOF\n", 2),
        ] {
            assert_eq!(refused(body, Format::OpenMetrics).line, line, "{body:?}");
        }
    }

    #[test]
    fn openmetrics_requires_eof_and_nothing_after() {
        assert_eq!(om("m 1\n# EOF\n").samples.len(), 1);
        assert_eq!(om("m 1\n# EOF").samples.len(), 1);
        assert!(om("# EOF\n").samples.is_empty());
        let err = refused("m 1\nn 2\n", Format::OpenMetrics);
        assert_eq!(err.message, "data does not end with # EOF");
        assert_eq!(err.line, 2);
        assert_eq!(refused("", Format::OpenMetrics).line, 1);
        for body in [
            "m 1\n# EOF\nn 2\n",
            "# EOF\n\n",
            "# EOF\n# EOF\n",
            "# EOF extra\n",
        ] {
            let err = refused(body, Format::OpenMetrics);
            assert_eq!(err.message, "unexpected data after # EOF", "{body:?}");
        }
        // In the text format `# EOF` is only a comment.
        assert_eq!(text("# EOF\nm 1\n").samples.len(), 1);
    }

    #[test]
    fn openmetrics_exemplars_are_checked_and_dropped() {
        let e = om(r#"# TYPE h histogram
h_bucket{le="0.1"} 3 # {trace_id="abc",span="x,y}"} 0.05 1700000000.5
h_bucket{le="+Inf"} 4 1700000001 # {} NaN
c_total 2 # {trace_id="d"} 1
# EOF
"#);
        assert_eq!(e.samples.len(), 3);
        assert_eq!(labels(&e.samples[0]), vec![("le", "0.1")]);
        assert_eq!(e.samples[0].value, 3.0);
        assert_eq!(e.samples[0].timestamp_ms, None);
        assert_eq!(e.samples[1].timestamp_ms, Some(1_700_000_001_000));
        assert_eq!(e.samples[2].value, 2.0);
        for bad in [
            "c_total 2 # {a=\"b\"}\n",
            "c_total 2 # {a=\"b\"} x\n",
            "c_total 2 # {a=\"b\"} 1 NaN\n",
            "c_total 2 # {a=\"b\"} 1 2 3\n",
            "c_total 2 # a=\"b\" 1\n",
            "c_total 2 # {\"name\"} 1\n",
            "c_total 2 # {a=\"b} 1\n",
        ] {
            let err = refused(&format!("{bad}# EOF\n"), Format::OpenMetrics);
            assert_eq!(err.line, 1, "{bad}: {err}");
        }
        // The text format has no exemplars.
        assert!(refused("c_total 2 # {a=\"b\"} 1\n", Format::Text).line == 1);
    }

    #[test]
    fn openmetrics_unit_is_ignored() {
        let e = om(
            "# TYPE m_bytes gauge\n# UNIT m_bytes bytes\n# UNIT other seconds\nm_bytes 1\n# EOF\n",
        );
        assert_eq!(e.samples[0].kind, Kind::Gauge);
        assert_eq!(e.families.len(), 1, "a UNIT declares nothing");
    }

    #[test]
    fn errors_name_their_line() {
        let cases: &[(&str, Format, usize, &str)] = &[
            ("a 1\nb 2\nc{x=\"1\" 3\n", Format::Text, 3, "expected"),
            ("a 1\n\nb\n", Format::Text, 3, "expected a value"),
            ("a 1\nb{x=1} 2\n", Format::Text, 2, "quoted value"),
            ("a 1\nb{x} 2\n", Format::Text, 2, "expected '='"),
            ("a 1\nb{,} 2\n", Format::Text, 2, "label name"),
            (
                "a 1\nb{x=\"1\",,y=\"2\"} 2\n",
                Format::Text,
                2,
                "label name",
            ),
            ("a 1\n1b 2\n", Format::Text, 2, "metric name"),
            ("a 1\nb{1x=\"1\"} 2\n", Format::Text, 2, "label name"),
            (
                "a 1\n# HELP\t\n",
                Format::Text,
                2,
                "metric name after # HELP",
            ),
            ("a 1\nb 1 {\n", Format::Text, 2, "timestamp"),
            (
                "a 1\nb{x=\"1\"}{y=\"2\"} 2\n",
                Format::Text,
                2,
                "invalid value",
            ),
            (
                "a 1\nb 2\n# HELP m x\nc{x=\"1\\\n\"} 2\n# EOF\n",
                Format::OpenMetrics,
                4,
                "backslash",
            ),
            (
                "a 1\nb{x=\"1\n\"} 2\n# EOF\n",
                Format::OpenMetrics,
                2,
                "unterminated",
            ),
        ];
        for (body, format, line, needle) in cases {
            let err = refused(body, *format);
            assert_eq!(err.line, *line, "{body:?}: {err}");
            assert!(err.message.contains(needle), "{body:?}: {err}");
            assert_eq!(err.to_string(), format!("line {line}: {}", err.message));
        }
    }

    #[test]
    fn an_unterminated_quote_is_reported_where_it_opened() {
        let err = refused("a 1\nb{x=\"open} 1\nc 2\nd 3\n", Format::Text);
        assert_eq!(err.line, 2);
        assert!(err.message.contains("unterminated"), "{err}");
        let err = refused("a 1\n# HELP \"open name\n", Format::Text);
        assert_eq!(err.line, 2);
    }

    #[test]
    fn raw_line_breaks_in_text_label_values_are_accepted_as_prometheus_does() {
        let e = text("a{x=\"one\ntwo\"} 1\nb 2\n");
        assert_eq!(labels(&e.samples[0]), vec![("x", "one\ntwo")]);
        assert_eq!(e.samples[1].name, "b");
        // Line counting goes on past such a value.
        assert_eq!(refused("a{x=\"one\ntwo\"} 1\nb\n", Format::Text).line, 3);
    }

    #[test]
    fn duplicate_and_reserved_label_names_are_refused() {
        for bad in [
            "m{a=\"1\",a=\"2\"} 1\n",
            "m{a=\"1\",\"a\"=\"2\"} 1\n",
            "m{__name__=\"x\"} 1\n",
            "m{\"\"=\"x\"} 1\n",
        ] {
            let err = refused(bad, Format::Text);
            assert_eq!(err.line, 1);
            assert!(err.message.contains("label"), "{bad}: {err}");
        }
        // Many labels take the sorting path.
        let many: Vec<String> = (0..20).map(|i| format!("l{i}=\"v\"")).collect();
        let body = format!("m{{{},l7=\"again\"}} 1\n", many.join(","));
        let err = refused(&body, Format::Text);
        assert_eq!(err.message, "duplicate label name \"l7\"");
        let body = format!("m{{{}}} 1\n", many.join(","));
        assert_eq!(text(&body).samples[0].labels.len(), 20);
    }

    #[test]
    fn error_messages_do_not_echo_long_payloads() {
        let junk = "x".repeat(10_000);
        for (body, format) in [
            (format!("m{{a=\"1\"}} {junk}\n"), Format::Text),
            (format!("m{{a=\"1\"}} 1 {junk}\n"), Format::Text),
            (format!("-{junk}\n"), Format::Text),
            (format!("# TYPE m {junk}\n"), Format::Text),
            (format!("# {junk}\n# EOF\n"), Format::OpenMetrics),
            (format!("m{{a=\"1\"{junk}}} 1\n"), Format::Text),
        ] {
            let err = refused(&body, format);
            assert!(err.message.len() < 150, "{}", err.message);
        }
        // Cutting never splits a character.
        let err = refused(&format!("m {}\n", "é".repeat(100)), Format::Text);
        assert!(err.message.ends_with('…'), "{}", err.message);
    }

    #[test]
    fn node_exporter_text_output() {
        let e = text(NODE_EXPORTER);
        assert_eq!(e.samples.len(), 32);
        assert_eq!(e.families.len(), 12);
        let gc: Vec<(&str, Kind)> = e
            .samples
            .iter()
            .filter(|s| s.name.starts_with("go_gc_duration_seconds"))
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        assert_eq!(gc.len(), 7);
        assert!(gc.iter().all(|(_, k)| *k == Kind::Summary), "{gc:?}");
        let median = &e.samples[2];
        assert_eq!(labels(median), vec![("quantile", "0.5")]);
        let idle = find(&e, "node_cpu_seconds_total");
        assert_eq!(labels(idle), vec![("cpu", "0"), ("mode", "idle")]);
        assert_eq!(idle.value, 241.5);
        assert_eq!(idle.kind, Kind::Counter);
        assert_eq!(find(&e, "node_boot_time_seconds").value, 1.796666748e9);
        assert_eq!(
            find(&e, "node_netstat_Icmp6_InErrors").kind,
            Kind::Unknown,
            "untyped"
        );
        let info = find(&e, "node_network_info");
        assert_eq!(info.kind, Kind::Gauge);
        assert_eq!(labels(info)[3], ("duplex", ""));
        let os = find(&e, "node_os_info");
        assert_eq!(os.labels.len(), 12);
        assert_eq!(
            labels(os)[6],
            ("pretty_name", "Debian GNU/Linux 12 (bookworm)")
        );
        let cpu = e
            .samples
            .iter()
            .find(|s| {
                s.name == "node_scrape_collector_success" && labels(s) == vec![("collector", "cpu")]
            })
            .map(|s| s.value);
        assert_eq!(cpu, Some(1.0));
        assert_eq!(
            e.families["node_os_info"].1,
            "A metric with a constant '1' value labeled by build_id, id, id_like, image_id, image_version, name, pretty_name, variant, variant_id, version, version_codename, version_id."
        );
        assert!(e.samples.iter().all(|s| s.timestamp_ms.is_none()));
        // As OpenMetrics the body fails at its first `untyped`, a word of the text format only.
        let err = refused(NODE_EXPORTER, Format::OpenMetrics);
        assert_eq!(
            (err.line, err.message.as_str()),
            (36, "invalid metric type \"untyped\"")
        );
    }

    #[test]
    fn python_client_text_output() {
        let e = text(PYTHON_TEXT);
        assert_eq!(e.samples.len(), 17);
        let bucket = find(&e, "request_latency_seconds_bucket");
        assert_eq!(labels(bucket), vec![("le", "0.005"), ("method", "GET")]);
        assert_eq!(bucket.kind, Kind::Histogram);
        assert_eq!(
            find(&e, "request_latency_seconds_sum").kind,
            Kind::Histogram
        );
        assert_eq!(find(&e, "request_latency_seconds_count").value, 2.0);
        // The text format declares each `_created` as a gauge of its own.
        let created = find(&e, "request_latency_seconds_created");
        assert_eq!(created.kind, Kind::Gauge);
        assert!(created.value > 1.7e9);
        let jobs = find(&e, "jobs_processed_total");
        assert_eq!(jobs.kind, Kind::Counter);
        assert_eq!(labels(jobs), vec![("queue", "a\\b \"c\"\nd")]);
        assert_eq!(
            e.families["jobs_processed_total"].1,
            "Jobs processed, by \"queue\"."
        );
        assert_eq!(find(&e, "build_info").kind, Kind::Gauge);
        assert_eq!(find(&e, "task_state").kind, Kind::Gauge);
        let depth = find(&e, "queue_depth");
        assert!(depth.value.is_nan());
        assert_eq!(
            e.families["queue_depth"].1,
            "Items waiting.\nSecond line \\ backslash."
        );
        assert_eq!(find(&e, "payload_bytes_sum").kind, Kind::Summary);
        assert_eq!(find(&e, "payload_bytes_created").kind, Kind::Gauge);
        // Without `# EOF` this is no OpenMetrics body.
        assert!(parse(PYTHON_TEXT, Format::OpenMetrics).is_err());
    }

    #[test]
    fn python_client_openmetrics_output() {
        let e = om(PYTHON_OPENMETRICS);
        assert_eq!(e.samples.len(), 17);
        let kinds: Vec<(&str, Kind)> = e
            .samples
            .iter()
            .map(|s| (s.name.as_str(), s.kind))
            .collect();
        use Kind::*;
        assert_eq!(
            kinds,
            vec![
                ("request_latency_seconds_bucket", Histogram),
                ("request_latency_seconds_bucket", Histogram),
                ("request_latency_seconds_bucket", Histogram),
                ("request_latency_seconds_bucket", Histogram),
                ("request_latency_seconds_count", Histogram),
                ("request_latency_seconds_sum", Histogram),
                ("request_latency_seconds_created", Histogram),
                ("jobs_processed_total", Counter),
                ("jobs_processed_created", Counter),
                ("build_info", Info),
                ("task_state", StateSet),
                ("task_state", StateSet),
                ("task_state", StateSet),
                ("queue_depth", Gauge),
                ("payload_bytes_count", Summary),
                ("payload_bytes_sum", Summary),
                ("payload_bytes_created", Summary),
            ]
        );
        // The exemplar after the 1.0 bucket is gone; the sample is intact.
        let bucket = &e.samples[2];
        assert_eq!(labels(bucket), vec![("le", "1.0"), ("method", "GET")]);
        assert_eq!((bucket.value, bucket.timestamp_ms), (2.0, None));
        assert_eq!(labels(&e.samples[7]), vec![("queue", "a\\b \"c\"\nd")]);
        assert_eq!(e.samples[7].value, 3.0);
        assert_eq!(labels(&e.samples[11]), vec![("task_state", "running")]);
        assert_eq!(e.samples[11].value, 1.0);
        assert!(e.samples[13].value.is_nan());
        assert_eq!(
            e.families["jobs_processed"],
            (Counter, "Jobs processed, by \"queue\".".into())
        );
        assert_eq!(e.families["build"].0, Info);
        assert_eq!(e.families.len(), 6);
        // Anything after the `# EOF` fails the whole body.
        let extra = format!("{PYTHON_OPENMETRICS}x 1\n");
        assert_eq!(refused(&extra, Format::OpenMetrics).line, 32);
    }

    #[test]
    fn a_hundred_thousand_lines_parse() {
        let families = 1_000;
        let mut body = String::new();
        for f in 0..families {
            body.push_str(&format!("# HELP fam_{f} Family {f}, with \\\\ and \\n.\n"));
            body.push_str(&format!("# TYPE fam_{f} histogram\n"));
            for b in 0..94 {
                body.push_str(&format!(
                    "fam_{f}_bucket{{instance=\"host-{f}:9100\",path=\"/a\\\"b\\\\c\",le=\"{b}.5\"}} {b}e+3 1700000000{b:03}\n"
                ));
            }
            body.push_str(&format!("fam_{f}_bucket{{le=\"+Inf\"}} +Inf\n"));
            body.push_str(&format!("fam_{f}_sum 1.5\nfam_{f}_count 95\n"));
            body.push_str(&format!("fam_{f}_created 1.7e9\n"));
        }
        assert_eq!(body.lines().count(), 100_000);
        let e = text(&body);
        assert_eq!(e.samples.len(), 98_000);
        assert_eq!(e.families.len(), families);
        assert!(e.samples.iter().all(|s| s.kind == Kind::Histogram));
        assert_eq!(labels(&e.samples[1])[1], ("path", "/a\"b\\c"));
        assert_eq!(e.samples[1].timestamp_ms, Some(1_700_000_000_001));

        // The same as OpenMetrics, one family per sample (the family map's worst case).
        let mut body = String::new();
        for i in 0..50_000 {
            body.push_str(&format!(
                "# TYPE c{i} counter\nc{i}_total{{a=\"{i}\"}} {i} # {{t=\"x\"}} 1\n"
            ));
        }
        body.push_str("# EOF\n");
        let e = om(&body);
        assert_eq!(e.samples.len(), 50_000);
        assert!(e.samples.iter().all(|s| s.kind == Kind::Counter));
    }

    /// Lines of real node_exporter 1.5.0 output (`/metrics`, text format 0.0.4), cut down to a few families of each kind.
    const NODE_EXPORTER: &str = r##"# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 0
go_gc_duration_seconds{quantile="0.25"} 0
go_gc_duration_seconds{quantile="0.5"} 0
go_gc_duration_seconds{quantile="0.75"} 0
go_gc_duration_seconds{quantile="1"} 0
go_gc_duration_seconds_sum 0
go_gc_duration_seconds_count 0
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 7
# HELP go_info Information about the Go environment.
# TYPE go_info gauge
go_info{version="go1.19.8"} 1
# HELP node_boot_time_seconds Node boot time, in unixtime.
# TYPE node_boot_time_seconds gauge
node_boot_time_seconds 1.796666748e+09
# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 241.5
node_cpu_seconds_total{cpu="0",mode="iowait"} 1.99
node_cpu_seconds_total{cpu="0",mode="irq"} 0
node_cpu_seconds_total{cpu="0",mode="nice"} 0
node_cpu_seconds_total{cpu="0",mode="softirq"} 0.65
node_cpu_seconds_total{cpu="0",mode="steal"} 7.09
node_cpu_seconds_total{cpu="0",mode="system"} 46.49
node_cpu_seconds_total{cpu="0",mode="user"} 172.43
# HELP node_filesystem_avail_bytes Filesystem space available to non-root users in bytes.
# TYPE node_filesystem_avail_bytes gauge
node_filesystem_avail_bytes{device="/dev/vda",fstype="ext4",mountpoint="/"} 8.3146551296e+10
# HELP node_load1 1m load average.
# TYPE node_load1 gauge
node_load1 2.05
# HELP node_netstat_Icmp6_InErrors Statistic Icmp6InErrors.
# TYPE node_netstat_Icmp6_InErrors untyped
node_netstat_Icmp6_InErrors 1
# HELP node_network_info Non-numeric data from /sys/class/net/<iface>, value is always 1.
# TYPE node_network_info gauge
node_network_info{address="00:00:00:00:00:00",broadcast="00:00:00:00:00:00",device="lo",duplex="",ifalias="",operstate="unknown"} 1
# HELP node_os_info A metric with a constant '1' value labeled by build_id, id, id_like, image_id, image_version, name, pretty_name, variant, variant_id, version, version_codename, version_id.
# TYPE node_os_info gauge
node_os_info{build_id="",id="debian",id_like="",image_id="",image_version="",name="Debian GNU/Linux",pretty_name="Debian GNU/Linux 12 (bookworm)",variant="",variant_id="",version="12 (bookworm)",version_codename="bookworm",version_id="12"} 1
# HELP node_scrape_collector_success node_exporter: Whether a collector succeeded.
# TYPE node_scrape_collector_success gauge
node_scrape_collector_success{collector="arp"} 1
node_scrape_collector_success{collector="bcache"} 1
node_scrape_collector_success{collector="bonding"} 0
node_scrape_collector_success{collector="btrfs"} 1
node_scrape_collector_success{collector="conntrack"} 1
node_scrape_collector_success{collector="cpu"} 1
# HELP promhttp_metric_handler_requests_total Total number of scrapes by HTTP status code.
# TYPE promhttp_metric_handler_requests_total counter
promhttp_metric_handler_requests_total{code="200"} 0
promhttp_metric_handler_requests_total{code="500"} 0
promhttp_metric_handler_requests_total{code="503"} 0
"##;

    /// Real prometheus_client 0.16.0 output, `prometheus_client.generate_latest` (text format): a histogram, a counter with an escaped label value, an info, an enum, a gauge with an escaped help and a NaN value, a summary.
    const PYTHON_TEXT: &str = r##"# HELP request_latency_seconds Time spent serving a request.
# TYPE request_latency_seconds histogram
request_latency_seconds_bucket{le="0.005",method="GET"} 0.0
request_latency_seconds_bucket{le="0.1",method="GET"} 1.0
request_latency_seconds_bucket{le="1.0",method="GET"} 2.0
request_latency_seconds_bucket{le="+Inf",method="GET"} 2.0
request_latency_seconds_count{method="GET"} 2.0
request_latency_seconds_sum{method="GET"} 0.75
# HELP request_latency_seconds_created Time spent serving a request.
# TYPE request_latency_seconds_created gauge
request_latency_seconds_created{method="GET"} 1.7966672310753686e+09
# HELP jobs_processed_total Jobs processed, by "queue".
# TYPE jobs_processed_total counter
jobs_processed_total{queue="a\\b \"c\"\nd"} 3.0
# HELP jobs_processed_created Jobs processed, by "queue".
# TYPE jobs_processed_created gauge
jobs_processed_created{queue="a\\b \"c\"\nd"} 1.7966672310755064e+09
# HELP build_info Build information.
# TYPE build_info gauge
build_info{commit="abc123",version="1.2.3"} 1.0
# HELP task_state Task state.
# TYPE task_state gauge
task_state{task_state="starting"} 0.0
task_state{task_state="running"} 1.0
task_state{task_state="stopped"} 0.0
# HELP queue_depth Items waiting.\nSecond line \\ backslash.
# TYPE queue_depth gauge
queue_depth NaN
# HELP payload_bytes Payload size.
# TYPE payload_bytes summary
payload_bytes_count 1.0
payload_bytes_sum 512.0
# HELP payload_bytes_created Payload size.
# TYPE payload_bytes_created gauge
payload_bytes_created 1.796667231075635e+09
"##;

    /// The same registry through `prometheus_client.openmetrics.exposition.generate_latest`: `_created` samples, exemplars, `# UNIT`, `info`, `stateset`, `# EOF`.
    const PYTHON_OPENMETRICS: &str = r##"# HELP request_latency_seconds Time spent serving a request.
# TYPE request_latency_seconds histogram
request_latency_seconds_bucket{le="0.005",method="GET"} 0.0
request_latency_seconds_bucket{le="0.1",method="GET"} 1.0
request_latency_seconds_bucket{le="1.0",method="GET"} 2.0 # {trace_id="abc123"} 0.7 1796667231.075448
request_latency_seconds_bucket{le="+Inf",method="GET"} 2.0
request_latency_seconds_count{method="GET"} 2.0
request_latency_seconds_sum{method="GET"} 0.75
request_latency_seconds_created{method="GET"} 1.7966672310753686e+09
# HELP jobs_processed Jobs processed, by \"queue\".
# TYPE jobs_processed counter
jobs_processed_total{queue="a\\b \"c\"\nd"} 3.0 # {trace_id="def456"} 3.0 1796667231.0755181
jobs_processed_created{queue="a\\b \"c\"\nd"} 1.7966672310755064e+09
# HELP build Build information.
# TYPE build info
build_info{commit="abc123",version="1.2.3"} 1.0
# HELP task_state Task state.
# TYPE task_state stateset
task_state{task_state="starting"} 0.0
task_state{task_state="running"} 1.0
task_state{task_state="stopped"} 0.0
# HELP queue_depth Items waiting.\nSecond line \\ backslash.
# TYPE queue_depth gauge
queue_depth NaN
# HELP payload_bytes Payload size.
# TYPE payload_bytes summary
# UNIT payload_bytes bytes
payload_bytes_count 1.0
payload_bytes_sum 512.0
payload_bytes_created 1.796667231075635e+09
# EOF
"##;
}
