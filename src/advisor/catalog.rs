//! What the catalog says about a table: its kind, its columns (and whether a btree can index
//! each), and its indexes with their key columns. The advisor checks every name it read from a
//! plan against this before the name reaches SQL, and the index creation re-checks it just
//! before building.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::MARK;

/// One table as the catalog describes it.
#[derive(Debug, Clone)]
pub(super) struct TableInfo {
    /// `pg_class.relkind`: `r` table, `p` partitioned table, `m` materialized view, ...
    pub relkind: String,
    /// Column name → whether a btree index can hold it (a default btree operator class exists
    /// for its type, as for `CREATE INDEX` without an operator class).
    pub columns: HashMap<String, bool>,
    /// Its indexes.
    pub indexes: Vec<ExistingIndex>,
}

/// An index of the table.
#[derive(Debug, Clone)]
pub(super) struct ExistingIndex {
    /// Its name.
    pub name: String,
    /// `indisvalid`: false after a failed concurrent build.
    pub valid: bool,
    /// Access method is btree.
    pub btree: bool,
    /// Has a predicate (a partial index serves only some rows).
    pub partial: bool,
    /// Key columns in order; `None` for an expression.
    pub columns: Vec<Option<String>>,
}

impl TableInfo {
    /// A valid, complete btree index whose leading key columns are `columns`: it serves
    /// whatever an index on `columns` would.
    pub fn covering_index(&self, columns: &[String]) -> Option<&ExistingIndex> {
        self.indexes.iter().find(|i| {
            i.valid
                && i.btree
                && !i.partial
                && i.columns.len() >= columns.len()
                && i.columns
                    .iter()
                    .zip(columns)
                    .all(|(have, want)| have.as_deref() == Some(want.as_str()))
        })
    }

    /// Whether every one of `columns` exists and can be indexed by a btree.
    pub fn indexable(&self, columns: &[String]) -> bool {
        columns
            .iter()
            .all(|c| self.columns.get(c).copied().unwrap_or(false))
    }
}

/// The table `schema.table`, or `None` when there is none by that name.
pub(super) async fn table_info(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Option<TableInfo>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            &format!(
                "{MARK} SELECT c.oid, c.relkind::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2"
            ),
            &[&schema, &table],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let relkind: String = row.get(1);
    // Domains are indexed as their base type; binary-coercible types share an operator class
    // (varchar uses text's); arrays, enums and ranges use the polymorphic classes.
    let columns = client
        .query(
            &format!(
                "{MARK} SELECT a.attname::text, EXISTS ( \
                   SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod \
                   WHERE am.amname = 'btree' AND oc.opcdefault AND ( \
                     oc.opcintype = b.oid \
                     OR EXISTS (SELECT 1 FROM pg_cast k WHERE k.castsource = b.oid \
                                AND k.casttarget = oc.opcintype AND k.castmethod = 'b') \
                     OR (oc.opcintype = 'anyarray'::regtype::oid AND b.typcategory = 'A') \
                     OR (oc.opcintype = 'anyenum'::regtype::oid AND b.typtype = 'e') \
                     OR (oc.opcintype = 'anyrange'::regtype::oid AND b.typtype = 'r'))) \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped"
            ),
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
        .collect();
    let indexes = client
        .query(
            &format!(
                "{MARK} SELECT ci.relname::text, i.indisvalid, am.amname = 'btree', i.indpred IS NOT NULL, \
                   ARRAY(SELECT a.attname::text \
                         FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
                         LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                         WHERE k.ord <= i.indnkeyatts ORDER BY k.ord) \
                 FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid \
                 JOIN pg_am am ON am.oid = ci.relam WHERE i.indrelid = $1"
            ),
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| ExistingIndex {
            name: r.get(0),
            valid: r.get(1),
            btree: r.get(2),
            partial: r.get(3),
            columns: r.get(4),
        })
        .collect();
    Ok(Some(TableInfo {
        relkind,
        columns,
        indexes,
    }))
}
