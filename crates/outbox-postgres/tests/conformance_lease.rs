//! The shared conformance suite on a real PostgreSQL with relays that write leases
//! (`ClaimMode::Lease`) instead of holding their claims in a transaction.

mod common;

outbox_testkit::conformance_tests!(common::PostgresLease);
outbox_testkit::concurrent_writer_tests!(common::PostgresLease);
