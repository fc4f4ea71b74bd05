//! Table capture: the outbox rows a slot's stream carries as `pgoutput` inserts.
//!
//! The stream is read in `pgoutput`'s binary format (`binary 'true'`), so each column comes
//! as its type's send format: no text parsing, no hex payloads, and no dependence on the
//! server's `DateStyle` or time zone. The protocol itself is parsed by `pg_walstream`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::{Bytes, Message, Status};
use pg_walstream::{ColumnData, LogicalReplicationMessage, LogicalReplicationParser, TupleData};

use crate::relay::pg_time;

/// Where the outbox's columns are in the table's rows, as its relation message gave them.
#[derive(Debug, Clone, Copy)]
struct Columns {
    id: usize,
    topic: usize,
    message_type: usize,
    key: usize,
    partition: usize,
    payload: usize,
    content_type: usize,
    headers: usize,
    created_at: usize,
    available_at: usize,
    status: usize,
}

/// A row of the outbox table that could not be read as a message.
#[derive(Debug, thiserror::Error)]
#[error("unreadable outbox row: {0}")]
pub(crate) struct BadRow(String);

fn bad(what: impl Into<String>) -> BadRow {
    BadRow(what.into())
}

/// Follows the relations of the stream and picks this outbox's captured inserts out of it.
pub(crate) struct Rows {
    parser: LogicalReplicationParser,
    schema: String,
    table: String,
    relation: Option<(u32, Columns)>,
}

impl Rows {
    pub(crate) fn new(schema: &str, table: &str) -> Self {
        Self {
            parser: LogicalReplicationParser::with_protocol_version(1),
            schema: schema.to_owned(),
            table: table.to_owned(),
            relation: None,
        }
    }

    /// Reads one `pgoutput` change: `Some` for an insert into the outbox table of a row
    /// written for the stream (`captured`); rows of other statuses are the polling relay's,
    /// and the stream's own write-backs are among them.
    pub(crate) fn take(&mut self, data: Bytes) -> Result<Option<Message>, BadRow> {
        let parsed = self
            .parser
            .parse_wal_message_bytes(data)
            .map_err(|e| bad(e.to_string()))?;
        match parsed.message {
            LogicalReplicationMessage::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } if *namespace == *self.schema && *relation_name == *self.table => {
                let names: Vec<&str> = columns.iter().map(|c| &*c.name).collect();
                self.relation = Some((relation_id, locate(&names)?));
                Ok(None)
            }
            LogicalReplicationMessage::Insert { relation_id, tuple } => match self.relation {
                Some((id, columns)) if id == relation_id => captured(&tuple, &columns),
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

fn locate(names: &[&str]) -> Result<Columns, BadRow> {
    let at = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| bad(format!("the outbox table has no column {name}")))
    };
    Ok(Columns {
        id: at("id")?,
        topic: at("topic")?,
        message_type: at("type")?,
        key: at("key")?,
        partition: at("partition")?,
        payload: at("payload")?,
        content_type: at("content_type")?,
        headers: at("headers")?,
        created_at: at("created_at")?,
        available_at: at("available_at")?,
        status: at("status")?,
    })
}

fn captured(tuple: &TupleData, c: &Columns) -> Result<Option<Message>, BadRow> {
    let col = |i: usize| {
        tuple
            .get_column(i)
            .filter(|d| d.is_binary() || d.is_null())
            .ok_or_else(|| bad(format!("column {i} is missing or not in binary format")))
    };
    if text(col(c.status)?)? != "captured" {
        return Ok(None);
    }
    let id = uuid::Uuid::from_slice(col(c.id)?.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let key = col(c.key)?;
    Ok(Some(Message {
        id,
        seq: 0,
        topic: text(col(c.topic)?)?,
        message_type: text(col(c.message_type)?)?,
        key: if key.is_null() {
            None
        } else {
            Some(text(key)?)
        },
        partition: i32::from_be_bytes(fixed(col(c.partition)?)?),
        payload: col(c.payload)?.raw_bytes(),
        content_type: text(col(c.content_type)?)?,
        headers: headers(col(c.headers)?)?,
        created_at: timestamp(col(c.created_at)?)?,
        available_at: timestamp(col(c.available_at)?)?,
        attempts: 0,
        last_error: None,
        status: Status::Pending,
    }))
}

fn text(d: &ColumnData) -> Result<String, BadRow> {
    d.as_string()
        .ok_or_else(|| bad("a text column is not UTF-8"))
}

fn fixed<const N: usize>(d: &ColumnData) -> Result<[u8; N], BadRow> {
    d.as_bytes()
        .try_into()
        .map_err(|_| bad(format!("expected {N} bytes, got {}", d.as_bytes().len())))
}

/// `timestamptz`'s send format: microseconds since 2000-01-01, big-endian.
fn timestamp(d: &ColumnData) -> Result<DateTime<Utc>, BadRow> {
    Ok(pg_time(i64::from_be_bytes(fixed(d)?)))
}

/// `jsonb`'s send format: a version byte (1), then the JSON text.
fn headers(d: &ColumnData) -> Result<BTreeMap<String, String>, BadRow> {
    match d.as_bytes().split_first() {
        Some((1, json)) => serde_json::from_slice(json).map_err(|e| bad(e.to_string())),
        _ => Err(bad("headers are not jsonb version 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_columns_decode_as_postgresql_sends_them() {
        let micros: i64 = 24 * 3600 * 1_000_000;
        let t = ColumnData::binary(micros.to_be_bytes().to_vec());
        assert_eq!(
            timestamp(&t).unwrap().to_rfc3339(),
            "2000-01-02T00:00:00+00:00"
        );
        let h = ColumnData::binary(b"\x01{\"a\":\"b\"}".to_vec());
        assert_eq!(headers(&h).unwrap().get("a").map(String::as_str), Some("b"));
        assert!(headers(&ColumnData::binary(b"{}".to_vec())).is_err());
        assert!(fixed::<4>(&ColumnData::binary(vec![0; 3])).is_err());
    }
}
