//! The shared conformance suite on a real PostgreSQL, each test in a schema of its own, with
//! relays that hold their claims in a transaction (the default `ClaimMode`).

mod common;

outbox_testkit::conformance_tests!(common::Postgres);
outbox_testkit::concurrent_writer_tests!(common::Postgres);
