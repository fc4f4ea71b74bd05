//! The shared conformance suite on the real MariaDB (or MySQL), a database per test.

mod common;

outbox_testkit::conformance_tests!(common::MariaDb);
outbox_testkit::concurrent_writer_tests!(common::MariaDb);
