//! Reading a plan: the sequential scans of an `EXPLAIN (VERBOSE, FORMAT JSON)` plan, the columns
//! their filters compare with a value, the join keys and sort keys above them, and the
//! candidate indexes that follow from those.
//!
//! Pure: text and JSON in, names out; nothing here talks to a server. The names it returns are
//! only claims read from the plan: the caller checks them against the catalog before any of
//! them reaches SQL, and quotes them there.

use serde_json::Value;

/// One sequential scan of a base table, and what an index on it could serve.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// The table's schema.
    pub schema: String,
    /// The table.
    pub table: String,
    /// The alias the plan refers to the table by.
    pub alias: String,
    /// Columns compared for equality (with a value, a parameter, or another table's column).
    pub equality: Vec<String>,
    /// Columns compared with `<`, `<=`, `>`, `>=`.
    pub range: Vec<String>,
    /// Columns the rows are sorted by just above the scan, in order.
    pub sort: Vec<String>,
}

/// A column reference as the plan prints it: `alias.column` (VERBOSE) or `column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColRef {
    /// The relation alias, when qualified.
    pub qualifier: Option<String>,
    /// The column's name, unquoted.
    pub name: String,
}

/// How a column is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareKind {
    /// `=`, `= ANY (...)`, `IS NULL`.
    Equality,
    /// `<`, `<=`, `>`, `>=`.
    Range,
}

/// One indexable comparison of a filter or join condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    /// The column.
    pub column: ColRef,
    /// How it is compared.
    pub kind: CompareKind,
    /// The other side's column references (empty when it is a value or a parameter).
    pub other: Vec<ColRef>,
}

/// The total cost of the plan's top node.
pub fn total_cost(plan: &Value) -> Option<f64> {
    top(plan)?.get("Total Cost")?.as_f64()
}

/// Whether any node of the plan uses the index named `index`.
pub fn uses_index(plan: &Value, index: &str) -> bool {
    fn walk(node: &Value, index: &str) -> bool {
        if node.get("Index Name").and_then(Value::as_str) == Some(index) {
            return true;
        }
        children(node).iter().any(|c| walk(c, index))
    }
    top(plan).is_some_and(|p| walk(p, index))
}

/// The `Plan` object of an `EXPLAIN (FORMAT JSON)` result (an array of one object).
fn top(plan: &Value) -> Option<&Value> {
    plan.get(0).unwrap_or(plan).get("Plan")
}

fn children(node: &Value) -> &[Value] {
    node.get("Plans")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn text<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node.get(key).and_then(Value::as_str)
}

/// Every sequential scan of a base table in the plan, with the columns its filter compares,
/// the join keys that reach it, and the sort keys directly above it.
pub fn scans(plan: &Value) -> Vec<Scan> {
    let mut out = Vec::new();
    if let Some(p) = top(plan) {
        walk(p, &mut out);
    }
    out
}

/// Walks `node`, appending its scans to `out`; returns the indexes in `out` of the scans in
/// its subtree, so that join and sort nodes can attribute their keys.
fn walk(node: &Value, out: &mut Vec<Scan>) -> Vec<usize> {
    let mut below = Vec::new();
    for child in children(node) {
        below.extend(walk(child, out));
    }
    let kind = text(node, "Node Type").unwrap_or("");
    if kind == "Seq Scan"
        && let Some(table) = text(node, "Relation Name")
    {
        let alias = text(node, "Alias").unwrap_or(table).to_owned();
        let mut scan = Scan {
            schema: text(node, "Schema").unwrap_or("").to_owned(),
            table: table.to_owned(),
            alias,
            ..Scan::default()
        };
        if let Some(filter) = text(node, "Filter") {
            for p in predicates(filter) {
                // Unqualified references in a scan's own filter are its own columns.
                let own = p
                    .column
                    .qualifier
                    .as_deref()
                    .is_none_or(|q| q == scan.alias);
                // `t.a = t.b` compares two columns of the same row: no index serves it.
                let same_row = p
                    .other
                    .iter()
                    .any(|o| o.qualifier.as_deref().is_none_or(|q| q == scan.alias));
                if own && !same_row {
                    scan.add(p.kind, &p.column.name);
                }
            }
        }
        out.push(scan);
        below.push(out.len() - 1);
    }
    // Join keys: each side's column, on the scan of its alias in this subtree, could be looked
    // up by an index (a nested loop with an inner index scan instead of hashing a full scan).
    for key in ["Hash Cond", "Merge Cond", "Join Filter"] {
        if let Some(cond) = text(node, key) {
            for p in predicates(cond) {
                if p.kind != CompareKind::Equality {
                    continue;
                }
                for col in std::iter::once(&p.column).chain(p.other.iter()) {
                    if let Some(q) = &col.qualifier
                        && let Some(&i) = below.iter().find(|&&i| out[i].alias == *q)
                    {
                        out[i].add(CompareKind::Equality, &col.name);
                    }
                }
            }
        }
    }
    if matches!(kind, "Sort" | "Incremental Sort")
        && let Some(keys) = node.get("Sort Key").and_then(Value::as_array)
        && let Some(i) = scan_below(node, out, &below)
    {
        let alias = out[i].alias.clone();
        let cols: Option<Vec<String>> = keys
            .iter()
            .map(|k| {
                let c = sort_key(k.as_str()?)?;
                c.qualifier
                    .as_deref()
                    .is_none_or(|q| q == alias)
                    .then_some(c.name)
            })
            .collect();
        // Only when every key is a plain column of that one table can an index deliver the
        // order.
        if let Some(cols) = cols
            && !cols.is_empty()
        {
            out[i].sort = cols;
        }
    }
    below
}

/// The scan a sort node sorts directly: its only descendant through single-input nodes that
/// pass rows through unchanged in content (gathers, materialize).
fn scan_below(sort: &Value, out: &[Scan], below: &[usize]) -> Option<usize> {
    let mut node = sort;
    loop {
        let [child] = children(node) else {
            return None;
        };
        match text(child, "Node Type") {
            Some("Seq Scan") => {
                // The scan is the last one found in this subtree with this alias.
                let alias = text(child, "Alias").or_else(|| text(child, "Relation Name"))?;
                return below.iter().rev().copied().find(|&i| out[i].alias == alias);
            }
            Some("Gather" | "Gather Merge" | "Materialize" | "Result") => node = child,
            _ => return None,
        }
    }
}

impl Scan {
    fn add(&mut self, kind: CompareKind, column: &str) {
        let list = match kind {
            CompareKind::Equality => &mut self.equality,
            CompareKind::Range => &mut self.range,
        };
        if !list.iter().any(|c| c == column) {
            list.push(column.to_owned());
        }
        if kind == CompareKind::Equality {
            // A column compared both ways leads as an equality column.
            self.range.retain(|c| c != column);
        }
    }

    /// Candidate column lists for an index on this table, the most promising first: the
    /// equality columns followed by one range column or the sort keys (how a btree serves a
    /// query best), then each column alone, then shorter combinations. At most three columns
    /// each; duplicates removed.
    pub fn candidates(&self) -> Vec<Vec<String>> {
        const WIDEST: usize = 3;
        let eq: Vec<String> = self.equality.iter().take(WIDEST).cloned().collect();
        let range: Vec<String> = self
            .range
            .iter()
            .filter(|c| !eq.contains(c))
            .cloned()
            .collect();
        let sort: Vec<String> = self
            .sort
            .iter()
            .filter(|c| !eq.contains(c))
            .take(WIDEST)
            .cloned()
            .collect();
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut push = |cols: Vec<String>| {
            if !cols.is_empty() && cols.len() <= WIDEST && !out.contains(&cols) {
                out.push(cols);
            }
        };
        let with = |mut head: Vec<String>, tail: &[String]| {
            head.extend(tail.iter().take(WIDEST.saturating_sub(head.len())).cloned());
            head
        };
        if !eq.is_empty() {
            if !sort.is_empty() {
                push(with(eq.clone(), &sort));
            }
            if let Some(r) = range.first() {
                push(with(eq.clone(), std::slice::from_ref(r)));
            }
            push(eq.clone());
        } else if let Some(r) = range.first() {
            push(vec![r.clone()]);
        }
        if !sort.is_empty() {
            push(sort.clone());
        }
        for c in eq.iter().chain(&range).chain(sort.first()) {
            push(vec![c.clone()]);
        }
        if eq.len() >= 2 {
            for r in &range {
                push(vec![eq[0].clone(), r.clone()]);
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Expressions as EXPLAIN prints them (ruleutils' deparse): a small tokenizer and just enough
// structure to find `column <op> value` comparisons in a conjunction.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open,
    Close,
    Comma,
    Dot,
    Cast,
    OpenBracket,
    CloseBracket,
    Op(String),
    /// An identifier or keyword; `quoted` when written in double quotes (never a keyword).
    Ident {
        text: String,
        quoted: bool,
    },
    Literal,
    Param,
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::Open);
                i += 1;
            }
            ')' => {
                out.push(Tok::Close);
                i += 1;
            }
            '[' => {
                out.push(Tok::OpenBracket);
                i += 1;
            }
            ']' => {
                out.push(Tok::CloseBracket);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '.' if !chars.get(i + 1).is_some_and(char::is_ascii_digit) => {
                out.push(Tok::Dot);
                i += 1;
            }
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push(Tok::Cast);
                i += 2;
            }
            '"' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return None,
                        Some('"') if chars.get(i + 1) == Some(&'"') => {
                            text.push('"');
                            i += 2;
                        }
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some(&ch) => {
                            text.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Ident { text, quoted: true });
            }
            '\'' => {
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return None,
                        Some('\'') if chars.get(i + 1) == Some(&'\'') => i += 2,
                        Some('\'') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => i += 2,
                        Some(_) => i += 1,
                    }
                }
                out.push(Tok::Literal);
            }
            '$' if chars.get(i + 1).is_some_and(char::is_ascii_digit) => {
                i += 1;
                while chars.get(i).is_some_and(char::is_ascii_digit) {
                    i += 1;
                }
                out.push(Tok::Param);
            }
            c if c.is_ascii_digit() || c == '.' => {
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '.')
                {
                    i += 1;
                }
                out.push(Tok::Literal);
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                // `E'...'`, `B'...'`, `X'...'`: the prefix belongs to the literal.
                if chars.get(i) == Some(&'\'') && matches!(text.as_str(), "E" | "B" | "X" | "U") {
                    continue;
                }
                out.push(Tok::Ident {
                    text,
                    quoted: false,
                });
            }
            _ => {
                let start = i;
                while chars
                    .get(i)
                    .is_some_and(|c| "+-*/<>=~!@#%^&|`?".contains(*c))
                {
                    i += 1;
                }
                if i == start {
                    // Anything else (a stray character) makes the whole expression unreadable;
                    // better no candidate than a wrong one.
                    return None;
                }
                out.push(Tok::Op(chars[start..i].iter().collect()));
            }
        }
    }
    Some(out)
}

fn is_keyword(t: &Tok, word: &str) -> bool {
    matches!(t, Tok::Ident { text, quoted: false } if text.eq_ignore_ascii_case(word))
}

/// Positions of tokens at nesting depth zero for which `pred` holds.
fn top_level(toks: &[Tok], pred: impl Fn(&Tok) -> bool) -> Vec<usize> {
    let mut depth = 0i32;
    let mut found = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Open | Tok::OpenBracket => depth += 1,
            Tok::Close | Tok::CloseBracket => depth -= 1,
            _ if depth == 0 && pred(t) => found.push(i),
            _ => {}
        }
    }
    found
}

/// `toks` without parentheses that enclose all of it.
fn strip_parens(mut toks: &[Tok]) -> &[Tok] {
    while toks.len() >= 2 && toks[0] == Tok::Open && toks[toks.len() - 1] == Tok::Close {
        // The first parenthesis must close at the very end, not earlier (`(a) = (b)`).
        let mut depth = 0;
        let mut closes_at_end = true;
        for (i, t) in toks.iter().enumerate() {
            match t {
                Tok::Open => depth += 1,
                Tok::Close => {
                    depth -= 1;
                    if depth == 0 && i != toks.len() - 1 {
                        closes_at_end = false;
                        break;
                    }
                }
                _ => {}
            }
        }
        if !closes_at_end {
            break;
        }
        toks = &toks[1..toks.len() - 1];
    }
    toks
}

/// A plain column reference, possibly in parentheses and cast (`((t.name)::text)`): what an
/// index on the column can serve, as the cast is one the planner sees through or the
/// verification will show it does not.
fn column(toks: &[Tok]) -> Option<ColRef> {
    let mut toks = strip_parens(toks);
    while let Some(&i) = top_level(toks, |t| *t == Tok::Cast).first() {
        toks = strip_parens(&toks[..i]);
    }
    let name = |t: &Tok| match t {
        Tok::Ident { text, quoted: true } => Some(text.clone()),
        Tok::Ident {
            text,
            quoted: false,
        } if !RESERVED.iter().any(|k| text.eq_ignore_ascii_case(k)) => Some(text.clone()),
        _ => None,
    };
    match toks {
        [c] => Some(ColRef {
            qualifier: None,
            name: name(c)?,
        }),
        [q, Tok::Dot, c] => Some(ColRef {
            qualifier: Some(name(q)?),
            name: name(c)?,
        }),
        _ => None,
    }
}

/// Words that the deparser prints bare and that are never column names there.
const RESERVED: &[&str] = &[
    "AND", "OR", "NOT", "NULL", "TRUE", "FALSE", "IS", "ANY", "ALL", "ARRAY", "SubPlan",
    "InitPlan", "hashed", "CASE", "WHEN", "THEN", "ELSE", "END", "IN", "BETWEEN", "LIKE", "ILIKE",
    "SIMILAR", "DISTINCT", "FROM", "COLLATE", "OPERATOR", "ROW", "EXISTS", "INTERVAL",
];

/// Every column reference anywhere in `toks`.
fn column_refs(toks: &[Tok]) -> Vec<ColRef> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == Tok::Cast {
            i = skip_type_name(toks, i + 1);
            continue;
        }
        let qualified = i + 2 < toks.len() && toks[i + 1] == Tok::Dot;
        let span = if qualified { 3 } else { 1 };
        // A function's name is followed by `(`.
        let called = toks.get(i + span) == Some(&Tok::Open);
        if !called && let Some(c) = column(&toks[i..i + span]) {
            out.push(c);
            i += span;
            continue;
        }
        i += 1;
    }
    out
}

/// The position after the type name that starts at `i` (after `::`): words (`timestamp with
/// time zone`), a qualified name, a type modifier in parentheses, array brackets.
fn skip_type_name(toks: &[Tok], mut i: usize) -> usize {
    while matches!(toks.get(i), Some(Tok::Ident { .. } | Tok::Dot)) {
        i += 1;
    }
    if toks.get(i) == Some(&Tok::Open) {
        let mut depth = 0;
        while let Some(t) = toks.get(i) {
            i += 1;
            match t {
                Tok::Open => depth += 1,
                Tok::Close => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    while toks.get(i) == Some(&Tok::OpenBracket) && toks.get(i + 1) == Some(&Tok::CloseBracket) {
        i += 2;
    }
    i
}

/// The indexable comparisons of a filter or join condition: the conjuncts of a top-level
/// `AND` (nested ones flattened) that compare a plain column with something. A disjunction
/// yields nothing: one index does not serve `a = 1 OR b = 2`.
pub fn predicates(expr: &str) -> Vec<Predicate> {
    let Some(toks) = tokenize(expr) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    conjuncts(&toks, &mut out);
    out
}

fn conjuncts(toks: &[Tok], out: &mut Vec<Predicate>) {
    let toks = strip_parens(toks);
    if !top_level(toks, |t| is_keyword(t, "OR")).is_empty() {
        return;
    }
    let ands = top_level(toks, |t| is_keyword(t, "AND"));
    if !ands.is_empty() {
        let mut start = 0;
        for i in ands.into_iter().chain(std::iter::once(toks.len())) {
            conjuncts(&toks[start..i], out);
            start = i + 1;
        }
        return;
    }
    if let Some(p) = comparison(toks) {
        out.push(p);
    }
}

fn comparison(toks: &[Tok]) -> Option<Predicate> {
    // `col IS NULL` (an index serves it like an equality); `IS NOT NULL` rarely selects little.
    if let [head @ .., is, null] = toks
        && is_keyword(is, "IS")
        && is_keyword(null, "NULL")
    {
        return Some(Predicate {
            column: column(head)?,
            kind: CompareKind::Equality,
            other: Vec::new(),
        });
    }
    let ops = top_level(toks, |t| matches!(t, Tok::Op(_)));
    let [at] = ops.as_slice() else {
        return None;
    };
    let kind = match &toks[*at] {
        Tok::Op(op) => match op.as_str() {
            "=" => CompareKind::Equality,
            "<" | "<=" | ">" | ">=" => CompareKind::Range,
            _ => return None,
        },
        _ => return None,
    };
    let (left, right) = (&toks[..*at], &toks[at + 1..]);
    // `col = ANY ($1)`, `col = ANY ('{1,2}'::integer[])`: an equality on each element.
    let right = match right.first() {
        Some(t) if is_keyword(t, "ANY") && kind == CompareKind::Equality => &right[1..],
        Some(t) if is_keyword(t, "ANY") || is_keyword(t, "ALL") => return None,
        _ => right,
    };
    if let Some(c) = column(left) {
        return Some(Predicate {
            column: c,
            kind,
            other: column_refs(right),
        });
    }
    let c = column(right)?;
    Some(Predicate {
        column: c,
        kind,
        other: column_refs(left),
    })
}

/// A sort key as printed (`t.col`, `t.col DESC`, `t.col NULLS FIRST`) as a column, or `None`
/// for an expression.
fn sort_key(key: &str) -> Option<ColRef> {
    let toks = tokenize(key)?;
    let mut end = toks.len();
    while end > 0 {
        let t = &toks[end - 1];
        if ["DESC", "ASC", "FIRST", "LAST", "NULLS"]
            .iter()
            .any(|k| is_keyword(t, k))
        {
            end -= 1;
        } else {
            break;
        }
    }
    column(&toks[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(expr: &str) -> Vec<(Option<String>, String, CompareKind)> {
        predicates(expr)
            .into_iter()
            .map(|p| (p.column.qualifier, p.column.name, p.kind))
            .collect()
    }

    /// An expression and the comparisons expected from it: (qualifier, column, kind).
    type Case<'a> = (&'a str, &'a [(Option<&'a str>, &'a str, CompareKind)]);

    #[test]
    fn filters_give_their_compared_columns() {
        use CompareKind::*;
        let cases: &[Case] = &[
            ("(col = $1)", &[(None, "col", Equality)]),
            ("((col)::text = $1)", &[(None, "col", Equality)]),
            ("((t.name)::text = $1)", &[(Some("t"), "name", Equality)]),
            (
                "((t.a = $1) AND (t.b > $2))",
                &[(Some("t"), "a", Equality), (Some("t"), "b", Range)],
            ),
            (
                "((t.a = $1) AND ((t.b >= $2) AND (t.c IS NULL)))",
                &[
                    (Some("t"), "a", Equality),
                    (Some("t"), "b", Range),
                    (Some("t"), "c", Equality),
                ],
            ),
            ("(t.id = ANY ($1))", &[(Some("t"), "id", Equality)]),
            (
                "(t.id = ANY ('{1,2,3}'::integer[]))",
                &[(Some("t"), "id", Equality)],
            ),
            ("($1 = t.x)", &[(Some("t"), "x", Equality)]),
            (
                r#"("Weird ""Col""" = $1)"#,
                &[(None, "Weird \"Col\"", Equality)],
            ),
            (
                r#"(t."Mixed Case" < '2024-01-01 00:00:00+00'::timestamp with time zone)"#,
                &[(Some("t"), "Mixed Case", Range)],
            ),
            (
                "(t.created_at >= (now() - '1 day'::interval))",
                &[(Some("t"), "created_at", Range)],
            ),
            (
                "(o.customer_id = c.id)",
                &[(Some("o"), "customer_id", Equality)],
            ),
            // Not servable by a plain index on a column: nothing.
            ("((t.a = $1) OR (t.b = $2))", &[]),
            ("(lower((t.email)::text) = $1)", &[]),
            ("((t.name)::text ~~ $1)", &[]),
            ("(t.a <> $1)", &[]),
            ("(t.a IS NOT NULL)", &[]),
            ("(hashed SubPlan 1)", &[]),
            ("(NOT t.flag)", &[]),
            ("t.flag", &[]),
            ("((t.a + t.b) = $1)", &[]),
            ("(t.a = ALL ($1))", &[]),
            ("(unterminated = 'x)", &[]),
        ];
        for (expr, want) in cases {
            let got = cols(expr);
            let want: Vec<(Option<String>, String, CompareKind)> = want
                .iter()
                .map(|(q, n, k)| (q.map(str::to_owned), (*n).to_owned(), *k))
                .collect();
            assert_eq!(got, want, "{expr}");
        }
    }

    #[test]
    fn the_other_side_is_reported() {
        let p = predicates("(t.a = (o.b + 1))");
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].other,
            vec![ColRef {
                qualifier: Some("o".into()),
                name: "b".into()
            }]
        );
        let p = predicates("(t.a = upper(($1)::text))");
        assert_eq!(p[0].other, vec![]);
        let p = predicates("(t.a < ('2024-01-01'::timestamp with time zone + (o.d)::interval))");
        assert_eq!(
            p[0].other,
            vec![ColRef {
                qualifier: Some("o".into()),
                name: "d".into()
            }]
        );
    }

    #[test]
    fn sort_keys_are_columns_or_nothing() {
        assert_eq!(sort_key("t.col").map(|c| c.name), Some("col".into()));
        assert_eq!(sort_key("t.col DESC").map(|c| c.name), Some("col".into()));
        assert_eq!(
            sort_key(r#""T"."C" DESC NULLS LAST"#).map(|c| (c.qualifier, c.name)),
            Some((Some("T".into()), "C".into()))
        );
        assert_eq!(sort_key("lower(t.col)"), None);
        assert_eq!(sort_key("(t.a + t.b)"), None);
    }

    #[test]
    fn plans_give_scans_with_filters_joins_and_sorts() {
        let plan = json!([{"Plan": {
            "Node Type": "Limit", "Total Cost": 19470.25,
            "Plans": [{"Node Type": "Gather Merge", "Plans": [{
                "Node Type": "Sort", "Sort Key": ["o.created_at DESC"],
                "Plans": [{"Node Type": "Hash Join", "Hash Cond": "(o.customer_id = c.id)",
                    "Plans": [
                        {"Node Type": "Seq Scan", "Relation Name": "orders", "Schema": "public",
                         "Alias": "o", "Filter": "((o.status = $1) AND (o.total > $2))"},
                        {"Node Type": "Hash", "Plans": [
                            {"Node Type": "Seq Scan", "Relation Name": "customers",
                             "Schema": "crm", "Alias": "c", "Filter": "(c.region = $3)"}]}
                    ]}]
            }]}]
        }}]);
        assert_eq!(total_cost(&plan), Some(19470.25));
        let s = scans(&plan);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].schema.as_str(), s[0].table.as_str()),
            ("public", "orders")
        );
        assert_eq!(s[0].equality, vec!["status", "customer_id"]);
        assert_eq!(s[0].range, vec!["total"]);
        // The sort is above a join, not a scan: no index delivers that order alone.
        assert!(s[0].sort.is_empty());
        assert_eq!(s[1].equality, vec!["region", "id"]);

        let plan = json!([{"Plan": {"Node Type": "Limit", "Total Cost": 1.0, "Plans": [
            {"Node Type": "Gather Merge", "Plans": [{"Node Type": "Sort",
             "Sort Key": ["t.customer_id"], "Plans": [{"Node Type": "Seq Scan",
             "Relation Name": "t", "Schema": "public", "Alias": "t"}]}]}]}}]);
        let s = scans(&plan);
        assert_eq!(s[0].sort, vec!["customer_id"]);
        assert_eq!(s[0].candidates(), vec![vec!["customer_id".to_owned()]]);
    }

    #[test]
    fn candidates_lead_with_equality_columns() {
        let scan = Scan {
            equality: vec!["a".into(), "b".into()],
            range: vec!["r".into()],
            sort: vec!["s".into()],
            ..Scan::default()
        };
        let c = scan.candidates();
        let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(c[0], v(&["a", "b", "s"]));
        assert_eq!(c[1], v(&["a", "b", "r"]));
        assert_eq!(c[2], v(&["a", "b"]));
        assert!(c.contains(&v(&["a"])));
        assert!(c.contains(&v(&["r"])));
        assert!(c.contains(&v(&["a", "r"])));
        assert!(c.iter().all(|x| x.len() <= 3));
        let mut dedup = c.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), c.len());
    }

    #[test]
    fn index_use_is_found_anywhere_in_the_plan() {
        let plan = json!([{"Plan": {"Node Type": "Bitmap Heap Scan", "Plans": [
            {"Node Type": "Bitmap Index Scan", "Index Name": "<13556>btree_t_c"}]}}]);
        assert!(uses_index(&plan, "<13556>btree_t_c"));
        assert!(!uses_index(&plan, "other"));
    }
}
