//! The shared conformance suite on the real MariaDB (or MySQL), a database per test.
//!
//! Two tests of the suite abort relay tasks in the test's own process and are left out here:
//! on MySQL a relay aborted in the middle of a claim can leave its pooled connection holding
//! the claim lock until the connection is next used, which stalls the other relays of the test
//! (1 run in 3 under parallel load). A killed process closes its connection and frees the lock
//! at once: `killed_relay_loses_nothing_on_mysql` (the real binary, SIGKILL mid-stream) covers
//! that case.

mod common;

outbox_testkit::conformance_tests!(@each common::MariaDb;
    commit_makes_message_deliverable,
    uncommitted_and_rolled_back_are_never_claimed,
    batch_keeps_enqueue_order,
    same_key_is_delivered_in_order_by_one_relay,
    four_relays_deliver_each_message_once,
    expired_lease_is_reclaimed_after_a_crash,
    late_outcome_of_a_lost_lease_is_ignored,
    transient_failures_back_off_then_go_dead,
    permanent_failure_is_dead_at_once,
    panicking_sink_fails_its_batch,
    any_error_text_is_recorded,
    replicas_sharing_a_configured_id_claim_under_distinct_ids,
    a_sink_that_miscounts_its_outcomes_acks_nothing,
    failing_key_does_not_block_other_keys,
    retried_head_behind_a_long_run_of_its_key_is_not_starved,
    dead_letters_can_be_retried_and_purged,
    retention_keeps_then_purges_delivered,
    delayed_message_waits,
    release_returns_messages_without_an_attempt,
    status_counts_each_state,
    backlog_counts_each_topic_and_state,
    shutdown_finishes_the_batches_in_hand,
    shutdown_timeout_releases_unfinished_messages,
    idle_relay_is_woken_by_a_commit,
    headers_and_payload_round_trip,
    trace_context_travels_from_the_enqueueing_span_through_the_publish_span,
    enqueue_refuses_reserved_headers_and_oversized_messages,
    a_claim_stops_at_its_byte_budget,
    migrate_is_idempotent,
    inbox_processes_each_message_once_per_consumer,
    inbox_record_rolls_back_with_the_effects,
    inbox_racing_redeliveries_process_once,
    hot_keys_go_out_in_runs_and_in_order,
    a_sink_slower_than_the_lease_counts_attempts_and_goes_dead,
    dead_letters_are_filtered_and_paged,
    dead_letters_are_retried_and_purged_by_selection,
    relays_report_their_state_until_they_stop,
    paused_topics_are_not_claimed_until_resumed,
    resuming_a_topic_wakes_an_idle_relay,
);
outbox_testkit::concurrent_writer_tests!(common::MariaDb);
