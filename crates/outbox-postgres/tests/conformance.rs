//! The shared conformance suite on a real PostgreSQL, each test in a schema of its own.

mod common;

outbox_testkit::conformance_tests!(common::Postgres);
