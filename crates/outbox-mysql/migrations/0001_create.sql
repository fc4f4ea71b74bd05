-- The outbox, its consumer inbox and the operators' tables, on InnoDB.
--
-- Times are Unix milliseconds taken from the database server's clock (never a relay's), so that
-- relays on several machines agree on leases and delays. available_at is the deliverable time
-- while pending and the lease expiry in flight.
--
-- MySQL has no partial indexes: ready_at is available_at for the rows a claim may take, NULL
-- for the others, and its index is the ready queue a claim walks in order. dead_at is set on
-- dead letters alone, and its index finds them. Only two indexes hold the status, so that a claim's lease, which changes
-- it on every row it takes, rewrites as few index entries as it can (measured: a lease of
-- 1,000 rows took 41 ms with five such indexes).
CREATE TABLE IF NOT EXISTS {p}messages (
    seq           BIGINT       NOT NULL AUTO_INCREMENT,
    id            CHAR(36)     CHARACTER SET ascii NOT NULL,
    topic         VARCHAR(255) NOT NULL,
    type          VARCHAR(255) NOT NULL,
    msg_key       TEXT,
    msg_partition INT          NOT NULL,
    payload       LONGBLOB     NOT NULL,
    content_type  VARCHAR(255) NOT NULL,
    headers       LONGTEXT     NOT NULL,
    created_at    BIGINT       NOT NULL,
    available_at  BIGINT       NOT NULL,
    status        VARCHAR(16)  CHARACTER SET ascii NOT NULL DEFAULT 'pending',
    attempts      INT          NOT NULL DEFAULT 0,
    last_error    TEXT,
    locked_by     VARCHAR(255),
    delivered_at  BIGINT,
    dead_at       BIGINT,
    ready_at      BIGINT GENERATED ALWAYS AS
                  (CASE WHEN status IN ('pending', 'in_flight') THEN available_at END) STORED,
    PRIMARY KEY (seq),
    UNIQUE KEY {p}messages_id (id),
    KEY {p}messages_ready (ready_at, seq),
    KEY {p}messages_key (msg_key(191), status, seq),
    KEY {p}messages_delivered (delivered_at),
    KEY {p}messages_dead (dead_at),
    CONSTRAINT {p}messages_status CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row whose lock claims take in turn: a claim reads the keys in delivery and writes its
-- lease with no other claim in between (see the crate docs).
CREATE TABLE IF NOT EXISTS {p}claim_lock (
    id INT NOT NULL PRIMARY KEY
) ENGINE = InnoDB;

INSERT IGNORE INTO {p}claim_lock (id) VALUES (1);

CREATE TABLE IF NOT EXISTS {p}inbox (
    consumer     VARCHAR(255) NOT NULL,
    message_id   CHAR(36)     CHARACTER SET ascii NOT NULL,
    processed_at BIGINT       NOT NULL,
    PRIMARY KEY (consumer, message_id),
    KEY {p}inbox_processed (processed_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Topics whose messages no relay claims until they are resumed (one row per paused topic).
CREATE TABLE IF NOT EXISTS {p}paused_topics (
    topic     VARCHAR(255) NOT NULL PRIMARY KEY,
    paused_at BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Each relay's last reported state.
CREATE TABLE IF NOT EXISTS {p}relay_heartbeats (
    relay_id   VARCHAR(255) NOT NULL PRIMARY KEY,
    state      VARCHAR(32)  NOT NULL,
    last_seen  BIGINT       NOT NULL,
    started_at BIGINT       NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
