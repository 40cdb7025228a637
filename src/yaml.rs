//! Located YAML: loads a YAML file into typed serde structures and reports **every** problem with
//! its line and column, not just the first.
//!
//! Owns: the span-aware reading of YAML text, duplicate-key detection, and the error-collecting
//! typed decode shared by the configuration file and (later) the rule files. Uses only serde,
//! `serde_yaml` (the `yaml_serde` fork), `serde_path_to_error` and `saphyr-parser`.
//!
//! Why three crates: `serde_yaml` gives the typed decode everyone knows (and its scalar
//! resolution), but stops at the first error and silently keeps the last of two duplicate keys.
//! Operators fixing a configuration want the whole list at once, as `promtool check` gives it. So
//! the text is read once with `saphyr-parser` events, which carry positions: that builds a
//! `serde_yaml::Value` plus an index from each path to where it was written, and flags duplicate
//! keys. The typed decode then runs over the value with `serde_path_to_error`; each error's path
//! is looked up in the index, the offending entry is removed, and the decode runs again, until it
//! succeeds or nothing more can be removed. Plain scalars are resolved by `serde_yaml` itself, so
//! `yes` stays a string and `010` stays `"010"` exactly as in a direct `serde_yaml` decode.

use std::collections::{HashMap, HashSet};
use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

/// Deeper nesting than this is refused: no configuration or rule file needs it, and it keeps a
/// hostile file from costing unbounded stack when the tree is dropped or walked.
const MAX_DEPTH: usize = 64;

/// Most nodes a document may expand to, aliases included: an alias is a copy, and a few lines of
/// nested aliases ("billion laughs") would otherwise expand to gigabytes.
const MAX_NODES: usize = 1_000_000;

/// After this many errors in one file the rest are not worth reading: the file is broken.
const MAX_ERRORS: usize = 100;

/// One problem found in a file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// One step of a path into the document: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    /// A key of a mapping.
    Key(String),
    /// An index into a sequence.
    Index(usize),
}

impl From<&str> for Seg {
    fn from(key: &str) -> Self {
        Seg::Key(key.to_owned())
    }
}

impl From<usize> for Seg {
    fn from(index: usize) -> Self {
        Seg::Index(index)
    }
}

/// A 1-based position in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl Mark {
    fn of(span: &Span) -> Self {
        Mark {
            line: span.start.line(),
            // saphyr counts columns from 0; editors and compilers count from 1.
            column: span.start.col() + 1,
        }
    }
}

/// Where each part of a document was written, to point validation errors at their line.
#[derive(Debug, Default, Clone)]
pub struct Locator {
    /// Position of the value at a path.
    values: HashMap<Vec<Seg>, Mark>,
    /// Position of the key of a mapping entry at a path.
    keys: HashMap<Vec<Seg>, Mark>,
}

impl Locator {
    /// Where the value at `path` starts; falls back to the nearest enclosing value that was
    /// written (a defaulted field has no position of its own), and to the top of the file.
    pub fn value(&self, path: &[Seg]) -> Mark {
        (0..=path.len())
            .rev()
            .find_map(|n| self.values.get(&path[..n]).copied())
            .unwrap_or(Mark { line: 1, column: 1 })
    }

    /// Where the key of the entry at `path` is written (the value's position if it has none).
    pub fn key(&self, path: &[Seg]) -> Mark {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value(path))
    }

    /// A diagnostic pointing at the value at `path`.
    pub fn error_at(&self, path: &[Seg], message: impl Into<String>) -> Diagnostic {
        let mark = self.value(path);
        Diagnostic {
            line: mark.line,
            column: mark.column,
            message: message.into(),
        }
    }
}

/// Reads `text` as one YAML document and decodes it into `T`.
///
/// An empty document decodes as an empty mapping, so a file holding only comments means "all
/// defaults". On failure every problem found is returned, sorted by position.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<(T, Locator), Vec<Diagnostic>> {
    match from_str_partial(text) {
        Partial {
            value: Some(v),
            locator,
            diagnostics,
        } if diagnostics.is_empty() => Ok((v, locator)),
        Partial { diagnostics, .. } => Err(diagnostics),
    }
}

/// What `from_str_partial` could make of a document.
#[derive(Debug)]
pub struct Partial<T> {
    /// The document with every part that had an error left out, when what remained decoded
    /// (so later checks can still report their own problems in the rest).
    pub value: Option<T>,
    /// Where each part was written.
    pub locator: Locator,
    /// Every problem found, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
}

/// Like `from_str`, but also returns what decoded once the erroneous parts were left out, so a
/// caller can validate the rest and report all problems of a file in one go.
pub fn from_str_partial<T: DeserializeOwned>(text: &str) -> Partial<T> {
    let (mut value, locator, mut diagnostics) = match read(text) {
        Ok(r) => r,
        Err(diagnostics) => {
            return Partial {
                value: None,
                locator: Locator::default(),
                diagnostics,
            };
        }
    };
    // Paths (as written) of the entries removed so far.
    let mut removed: HashSet<Vec<Seg>> = HashSet::new();
    // Sequence elements removed so far, by the sequence's path as written: decoding sees the
    // shifted indexes, the locator knows the written ones.
    let mut shifts: HashMap<Vec<Seg>, Vec<usize>> = HashMap::new();
    let mut decoded = None;
    loop {
        match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(v) => {
                decoded = Some(v);
                break;
            }
            Err(err) => {
                let current = path_of(err.path());
                let path = as_written(&current, &shifts);
                let message = err.inner().to_string();
                // An error about something we emptied by removing a bad part of it (a "missing
                // field" we removed, an entry left with nothing) is a consequence, not news.
                let consequence = removed
                    .iter()
                    .any(|r| r.len() > path.len() && r.starts_with(&path));
                if !consequence {
                    let mark = if message.starts_with("unknown field") {
                        locator.key(&path)
                    } else {
                        locator.value(&path)
                    };
                    diagnostics.push(Diagnostic {
                        line: mark.line,
                        column: mark.column,
                        message,
                    });
                }
                // Each removal shrinks the document, so this loop ends; the checks below only
                // stop it early when the error points at nothing that can be removed.
                if current.is_empty()
                    || diagnostics.len() >= MAX_ERRORS
                    || removed.contains(&path)
                    || !remove(&mut value, &current)
                {
                    break;
                }
                if let (Some((Seg::Index(i), parent)), Some((Seg::Index(_), _))) =
                    (path.split_last(), current.split_last())
                {
                    let list = shifts.entry(parent.to_vec()).or_default();
                    list.push(*i);
                    list.sort_unstable();
                }
                removed.insert(path);
            }
        }
    }
    diagnostics.sort_by_key(|d| (d.line, d.column));
    diagnostics.dedup();
    Partial {
        value: decoded,
        locator,
        diagnostics,
    }
}

/// Maps a path in the document as it is now (after removals) to the path as written.
fn as_written(current: &[Seg], shifts: &HashMap<Vec<Seg>, Vec<usize>>) -> Vec<Seg> {
    let mut out: Vec<Seg> = Vec::with_capacity(current.len());
    for seg in current {
        let seg = match seg {
            Seg::Index(i) => {
                let mut index = *i;
                if let Some(gone) = shifts.get(&out) {
                    // Walk the removed (written) indexes in order: each one at or before the
                    // candidate pushes it one further.
                    for g in gone {
                        if *g <= index {
                            index += 1;
                        }
                    }
                }
                Seg::Index(index)
            }
            key => key.clone(),
        };
        out.push(seg);
    }
    out
}

fn path_of(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            // An externally tagged enum is a one-entry mapping keyed by the variant.
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

/// Removes the node at `path`; false when there is nothing there to remove.
fn remove(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parent_path)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parent_path {
        let next = match (node, seg) {
            (Value::Mapping(map), Seg::Key(key)) => map.get_mut(key.as_str()),
            (Value::Sequence(seq), Seg::Index(i)) => seq.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return false,
        }
    }
    match (node, last) {
        (Value::Mapping(map), Seg::Key(key)) => map.remove(key.as_str()).is_some(),
        (Value::Sequence(seq), Seg::Index(i)) if *i < seq.len() => {
            seq.remove(*i);
            true
        }
        _ => false,
    }
}

/// A container being built while its events arrive.
enum Open {
    Seq {
        items: Vec<Value>,
        anchor: usize,
    },
    Map {
        map: Mapping,
        anchor: usize,
        /// The key read but whose value has not arrived yet.
        pending_key: Option<String>,
        /// First position of each key, for the duplicate message.
        seen: HashMap<String, Mark>,
        /// Set while skipping the value of a duplicate or unusable key.
        skip: bool,
    },
}

/// Parses the text into a value and its locator, collecting duplicate keys and unsupported
/// constructs as diagnostics. A syntax error ends the reading: nothing after it can be trusted.
fn read(text: &str) -> Result<(Value, Locator, Vec<Diagnostic>), Vec<Diagnostic>> {
    let mut locator = Locator::default();
    let mut diagnostics = Vec::new();
    // Each anchored value with its size in nodes and its depth, to bound what aliases expand to.
    let mut anchors: HashMap<usize, (Value, usize, usize)> = HashMap::new();
    let mut nodes = 0usize;
    let mut stack: Vec<Open> = Vec::new();
    let mut path: Vec<Seg> = Vec::new();
    let mut root: Option<Value> = None;
    let mut documents = 0usize;

    for item in Parser::new_from_str(text) {
        let (event, span) = match item {
            Ok(ok) => ok,
            Err(err) => {
                let marker = err.marker();
                return Err(vec![Diagnostic {
                    line: marker.line(),
                    column: marker.col() + 1,
                    message: format!("YAML syntax error: {}", err.info()),
                }]);
            }
        };
        let mark = Mark::of(&span);
        let is_seq = matches!(event, Event::SequenceStart(..));
        if matches!(
            event,
            Event::Scalar(..) | Event::SequenceStart(..) | Event::MappingStart(..)
        ) {
            nodes += 1;
        }
        // What this event completes, if it completes a node.
        let done: Option<(Value, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    diagnostics.push(diag(mark, "only one YAML document is allowed per file"));
                    break;
                }
                None
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some((value, size, depth)) => {
                    nodes += size;
                    if nodes > MAX_NODES || stack.len() + depth > MAX_DEPTH {
                        return Err(vec![diag(
                            mark,
                            format!(
                                "aliases expand beyond {MAX_NODES} nodes or {MAX_DEPTH} levels; refused"
                            ),
                        )]);
                    }
                    Some((value.clone(), 0))
                }
                None => {
                    diagnostics.push(diag(mark, "alias to an unknown anchor"));
                    Some((Value::Null, 0))
                }
            },
            Event::Scalar(text, style, anchor, tag) => {
                let value = match tag {
                    None => scalar(&text, style),
                    Some(tag) if tag.is_yaml_core_schema() && tag.suffix == "str" => {
                        Value::String(text.into_owned())
                    }
                    Some(tag) if tag.is_yaml_core_schema() => scalar(&text, ScalarStyle::Plain),
                    Some(tag) => {
                        diagnostics.push(diag(
                            mark,
                            format!("tag {}{} is not supported", tag.handle, tag.suffix),
                        ));
                        Value::Null
                    }
                };
                Some((value, anchor))
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if let Some(tag) = tag {
                    diagnostics.push(diag(
                        mark,
                        format!("tag {}{} is not supported", tag.handle, tag.suffix),
                    ));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(vec![diag(
                        mark,
                        format!("nesting deeper than {MAX_DEPTH} levels is not supported"),
                    )]);
                }
                record_value(&mut locator, &stack, &path, mark);
                let open = if is_seq {
                    Open::Seq {
                        items: Vec::new(),
                        anchor,
                    }
                } else {
                    Open::Map {
                        map: Mapping::new(),
                        anchor,
                        pending_key: None,
                        seen: HashMap::new(),
                        skip: false,
                    }
                };
                // The path now points inside the new container.
                push_child_seg(&stack, &mut path);
                stack.push(open);
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Open::Seq { items, anchor }) => {
                    path.pop();
                    Some((Value::Sequence(items), anchor))
                }
                _ => None,
            },
            Event::MappingEnd => match stack.pop() {
                Some(Open::Map { map, anchor, .. }) => {
                    path.pop();
                    Some((Value::Mapping(map), anchor))
                }
                _ => None,
            },
        };
        let Some((value, anchor)) = done else {
            continue;
        };
        if anchor != 0 {
            let (size, depth) = measure(&value);
            anchors.insert(anchor, (value.clone(), size, depth));
        }
        // A scalar's position is recorded here; a container's was recorded at its start.
        let is_scalar = !matches!(value, Value::Sequence(_) | Value::Mapping(_));
        match stack.last_mut() {
            None => root = Some(value),
            Some(Open::Seq { items, .. }) => {
                if is_scalar {
                    let mut here = path.clone();
                    here.push(Seg::Index(items.len()));
                    locator.values.insert(here, mark);
                }
                items.push(value);
            }
            Some(Open::Map {
                map,
                pending_key,
                seen,
                skip,
                ..
            }) => match pending_key.take() {
                Some(key) => {
                    if *skip {
                        *skip = false;
                    } else {
                        if is_scalar {
                            let mut here = path.clone();
                            here.push(Seg::Key(key.clone()));
                            locator.values.insert(here, mark);
                        }
                        map.insert(Value::String(key), value);
                    }
                }
                None if *skip => {
                    // The value of an unusable (non-string) key: drop it.
                    *skip = false;
                }
                None => {
                    let key = match &value {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        Value::Bool(b) => Some(b.to_string()),
                        _ => None,
                    };
                    match key {
                        None => {
                            diagnostics.push(diag(mark, "mapping keys must be plain strings"));
                            *skip = true;
                        }
                        Some(key) => {
                            if let Some(first) = seen.get(&key) {
                                diagnostics.push(diag(
                                    mark,
                                    format!(
                                        "duplicate key `{key}` (first given at line {})",
                                        first.line
                                    ),
                                ));
                                *skip = true;
                            } else {
                                seen.insert(key.clone(), mark);
                                let mut here = path.clone();
                                here.push(Seg::Key(key.clone()));
                                locator.keys.insert(here, mark);
                            }
                            *pending_key = Some(key);
                        }
                    }
                }
            },
        }
    }
    let value = match root {
        None | Some(Value::Null) => Value::Mapping(Mapping::new()),
        Some(value) => value,
    };
    if locator.values.is_empty() {
        locator
            .values
            .insert(Vec::new(), Mark { line: 1, column: 1 });
    }
    Ok((value, locator, diagnostics))
}

/// The number of nodes in a value and its depth, walked without recursion.
fn measure(value: &Value) -> (usize, usize) {
    let mut size = 0;
    let mut deepest = 0;
    let mut todo: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = todo.pop() {
        size += 1;
        deepest = deepest.max(depth);
        match v {
            Value::Sequence(items) => todo.extend(items.iter().map(|i| (i, depth + 1))),
            Value::Mapping(map) => todo.extend(map.values().map(|i| (i, depth + 1))),
            Value::Tagged(t) => todo.push((&t.value, depth + 1)),
            _ => {}
        }
    }
    (size, deepest)
}

/// Records the start of a container as the position of the value it is about to become.
fn record_value(locator: &mut Locator, stack: &[Open], path: &[Seg], mark: Mark) {
    let mut here = path.to_vec();
    match stack.last() {
        None => {}
        Some(Open::Seq { items, .. }) => here.push(Seg::Index(items.len())),
        Some(Open::Map { pending_key, .. }) => match pending_key {
            Some(key) => here.push(Seg::Key(key.clone())),
            // A container used as a key: not addressable, nothing to record.
            None => return,
        },
    }
    locator.values.entry(here).or_insert(mark);
}

/// Extends the path with the segment under which the container now opening will be stored.
fn push_child_seg(stack: &[Open], path: &mut Vec<Seg>) {
    match stack.last() {
        None => {}
        Some(Open::Seq { items, .. }) => path.push(Seg::Index(items.len())),
        Some(Open::Map { pending_key, .. }) => path.push(Seg::Key(
            pending_key.clone().unwrap_or_else(|| "<key>".to_owned()),
        )),
    }
}

fn diag(mark: Mark, message: impl Into<String>) -> Diagnostic {
    Diagnostic {
        line: mark.line,
        column: mark.column,
        message: message.into(),
    }
}

/// Resolves a scalar the way `serde_yaml` does: quoted and block scalars are strings, plain ones
/// are handed to `serde_yaml` itself so `null`, booleans and numbers follow its rules exactly.
fn scalar(text: &str, style: ScalarStyle) -> Value {
    if style != ScalarStyle::Plain {
        return Value::String(text.to_owned());
    }
    if text.is_empty() {
        return Value::Null;
    }
    match serde_yaml::from_str::<Value>(text) {
        Ok(value @ (Value::Null | Value::Bool(_) | Value::Number(_))) => value,
        _ => Value::String(text.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Inner,
        #[serde(default)]
        list: Vec<Item>,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        count: u32,
        flag: bool,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        id: u32,
    }

    fn errors(text: &str) -> Vec<String> {
        match from_str::<Outer>(text) {
            Ok(v) => panic!("expected errors, got {v:?}"),
            Err(d) => d.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn decodes_a_valid_document() {
        let (v, loc) =
            from_str::<Outer>("name: a\ninner:\n  count: 3\nlist:\n  - id: 1\n  - id: 2\n")
                .unwrap();
        assert_eq!(v.name, "a");
        assert_eq!(v.inner.count, 3);
        assert_eq!(v.list.len(), 2);
        assert_eq!(loc.value(&["inner".into(), "count".into()]).line, 3);
        assert_eq!(loc.value(&["list".into(), 1.into(), "id".into()]).line, 6);
        assert_eq!(loc.key(&["inner".into()]).line, 2);
    }

    #[test]
    fn reports_every_error_with_its_line() {
        let text = "name: a\ninner:\n  count: many\n  colour: red\n  flag: true\n  flag: false\nlist:\n  - id: x\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("3:10: invalid type"), "{errs:?}");
        assert!(
            errs[1].starts_with("4:3: unknown field `colour`"),
            "{errs:?}"
        );
        assert!(
            errs[2].starts_with("6:3: duplicate key `flag` (first given at line 5)"),
            "{errs:?}"
        );
        assert!(errs[3].starts_with("8:9: invalid type"), "{errs:?}");
    }

    #[test]
    fn errors_in_several_sequence_items_keep_their_own_lines() {
        let errs =
            errors("name: a\nlist:\n  - id: x\n  - id: 2\n  - id: y\n  - {id: 3, extra: 1}\n");
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("3:9: invalid type"), "{errs:?}");
        assert!(errs[1].starts_with("5:9: invalid type"), "{errs:?}");
        assert!(
            errs[2].starts_with("6:13: unknown field `extra`"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_removed_bad_value_is_not_reported_missing_too() {
        let errs = errors("name: [1, 2]\n");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("1:7: invalid type: sequence"),
            "{errs:?}"
        );
    }

    #[test]
    fn a_truly_missing_field_is_reported() {
        let errs = errors("inner: {}\n");
        assert_eq!(errs, vec!["1:1: missing field `name`".to_owned()]);
    }

    #[test]
    fn syntax_errors_stop_reading_with_a_position() {
        let errs = errors("name: a\ninner: [1, 2\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("YAML syntax error"), "{errs:?}");
    }

    #[test]
    fn empty_and_comment_only_documents_mean_defaults() {
        #[derive(Debug, Deserialize, Default)]
        #[serde(deny_unknown_fields, default)]
        struct AllDefault {
            inner: Inner,
        }
        assert_eq!(
            from_str::<AllDefault>("").unwrap().0.inner,
            Inner::default()
        );
        assert_eq!(
            from_str::<AllDefault>("# nothing\n").unwrap().0.inner,
            Inner::default()
        );
    }

    #[test]
    fn plain_scalars_resolve_like_serde_yaml() {
        #[derive(Debug, Deserialize)]
        struct S {
            a: String,
            b: String,
            c: Option<u32>,
            d: f64,
        }
        let (s, _) = from_str::<S>("a: yes\nb: '010'\nc: ~\nd: 1.5e3\n").unwrap();
        assert_eq!(s.a, "yes");
        assert_eq!(s.b, "010");
        assert_eq!(s.c, None);
        assert!((s.d - 1500.0).abs() < f64::EPSILON);
        // `yes` is not a boolean in YAML 1.2, just as in a direct serde_yaml decode.
        let errs = errors("name: a\ninner:\n  flag: yes\n");
        assert!(
            errs[0].starts_with("3:9: invalid type: string \"yes\""),
            "{errs:?}"
        );
    }

    #[test]
    fn anchors_and_aliases_are_expanded() {
        let (v, _) =
            from_str::<Outer>("name: &n a\ninner: &i {count: 2}\nlist: [{id: 1}]\n").unwrap();
        assert_eq!(v.name, "a");
        assert_eq!(v.inner.count, 2);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let text = format!("name: {}{}", "[".repeat(10_000), "]".repeat(10_000));
        let errs = errors(&text);
        // Refused by our depth limit or by the parser's own recursion limit, whichever is hit
        // first: either way one clear error and no crash.
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("nesting deeper") || errs[0].contains("recursion limit"),
            "{errs:?}"
        );
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        text.push_str("name: x\n");
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.contains("aliases expand beyond")),
            "{errs:?}"
        );
    }

    #[test]
    fn a_second_document_is_refused() {
        let errs = errors("name: a\n---\nname: b\n");
        assert!(
            errs.iter().any(|e| e.contains("only one YAML document")),
            "{errs:?}"
        );
    }
}
