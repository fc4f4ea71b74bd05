//! The shared conformance suite on real SQLite files.

mod common;

outbox_testkit::conformance_tests!(common::Sqlite);
