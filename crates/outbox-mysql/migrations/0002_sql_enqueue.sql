-- Enqueue from SQL, for writers that do not link the Rust library (a Python, Go or Node service
-- sharing the database): in the writer's own transaction, with the checks of the library's
-- enqueue, producing rows the relay cannot tell from the library's.
--
--   CALL {p}enqueue(topic, type, payload JSON, key, headers JSON, @id)
--   CALL {p}enqueue_bytes(topic, type, content_type, payload BLOB, key, headers JSON, @id)
--   (an empty or NULL key is no key, NULL headers are none; @id receives the message id)
--
-- The largest message accepted (payload and headers) is the session variable
-- @outbox_max_message_bytes, 1 MiB when unset, like the library's default. A refused message
-- raises SQLSTATE 22023 with the library's wording (MySQL may cut an error text at 128
-- characters), and the caller's transaction decides what happens next.
--
-- Statements in this file end at a line that ends with $$, since routines hold semicolons.
DROP FUNCTION IF EXISTS {p}header_refusal $$

-- The library's header rules (outbox_core::headers): a token name of at most 128 bytes, no CR,
-- LF or NUL in the value, not a name the transports set themselves, and a well-formed W3C trace
-- context when the header is one. Returns why a header is refused, or NULL.
CREATE FUNCTION {p}header_refusal(name TEXT CHARACTER SET utf8mb4, value TEXT CHARACTER SET utf8mb4)
RETURNS TEXT CHARACTER SET utf8mb4
DETERMINISTIC NO SQL
BEGIN
    DECLARE lower_name TEXT CHARACTER SET utf8mb4 DEFAULT lower(name);
    DECLARE rest TEXT CHARACTER SET utf8mb4;
    DECLARE member TEXT CHARACTER SET utf8mb4;
    DECLARE members INT DEFAULT 0;
    IF name = '' THEN
        RETURN 'header name must not be empty';
    END IF;
    IF octet_length(name) > 128 THEN
        RETURN concat('header name ', JSON_QUOTE(name), ' is longer than 128 bytes');
    END IF;
    IF NOT name REGEXP '(?-i)^[-A-Za-z0-9!#$%&''*+.^_`|~]+$' THEN
        RETURN concat('header name ', JSON_QUOTE(name), ' contains ''',
                      REGEXP_SUBSTR(name, '(?-i)[^-A-Za-z0-9!#$%&''*+.^_`|~]'),
                      ''', which not every transport can carry ',
                      '(use letters, digits and !#$%&''*+-.^_`|~)');
    END IF;
    IF locate(char(13), value) > 0 OR locate(char(10), value) > 0
       OR locate(char(0), value) > 0 THEN
        RETURN concat('header ', JSON_QUOTE(name), ' has a CR, LF or NUL in its value');
    END IF;
    IF lower_name IN ('host', 'content-type', 'content-length', 'content-encoding',
                      'transfer-encoding', 'connection', 'keep-alive', 'upgrade', 'te',
                      'trailer', 'cc', 'bcc', 'x-death', 'x-delay')
       OR lower_name LIKE 'nats-%' OR lower_name LIKE 'webhook-%' OR lower_name LIKE 'ce-%' THEN
        RETURN concat('header ', JSON_QUOTE(name), ' is reserved: the transports set it themselves');
    END IF;
    IF lower_name = 'traceparent' THEN
        IF NOT value REGEXP '(?-i)^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$'
           OR left(value, 2) = 'ff'
           OR (left(value, 2) = '00' AND char_length(value) > 55)
           OR substring(value, 4, 32) = repeat('0', 32)
           OR substring(value, 37, 16) = repeat('0', 16) THEN
            RETURN concat('header ', JSON_QUOTE(name), ' is not in the W3C Trace Context format');
        END IF;
    ELSEIF lower_name = 'tracestate' THEN
        IF octet_length(value) > 512 THEN
            RETURN concat('header ', JSON_QUOTE(name), ' is not in the W3C Trace Context format');
        END IF;
        SET rest = value;
        WHILE rest IS NOT NULL DO
            IF locate(',', rest) > 0 THEN
                SET member = substring_index(rest, ',', 1);
                SET rest = substring(rest, locate(',', rest) + 1);
            ELSE
                SET member = rest;
                SET rest = NULL;
            END IF;
            SET member = trim(BOTH char(9) FROM trim(BOTH ' ' FROM member));
            IF member <> '' THEN
                SET members = members + 1;
                IF members > 32 OR NOT member REGEXP '^[^=]+=[^=]+$' THEN
                    RETURN concat('header ', JSON_QUOTE(name),
                                  ' is not in the W3C Trace Context format');
                END IF;
            END IF;
        END WHILE;
    END IF;
    RETURN NULL;
END $$

DROP PROCEDURE IF EXISTS {p}enqueue_bytes $$

CREATE PROCEDURE {p}enqueue_bytes(
    IN p_topic TEXT CHARACTER SET utf8mb4, IN p_type TEXT CHARACTER SET utf8mb4,
    IN p_content_type TEXT CHARACTER SET utf8mb4, IN p_payload LONGBLOB,
    IN p_key TEXT CHARACTER SET utf8mb4, IN p_headers LONGTEXT CHARACTER SET utf8mb4,
    OUT p_id CHAR(36))
MODIFIES SQL DATA
BEGIN
    DECLARE v_size BIGINT;
    DECLARE v_max BIGINT DEFAULT coalesce(@outbox_max_message_bytes, 1048576);
    DECLARE v_why TEXT CHARACTER SET utf8mb4;
    DECLARE v_names LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_name TEXT CHARACTER SET utf8mb4;
    DECLARE v_value LONGTEXT CHARACTER SET utf8mb4;
    DECLARE v_path TEXT CHARACTER SET utf8mb4;
    DECLARE v_type TEXT;
    DECLARE v_hex CHAR(64);
    DECLARE v_ms CHAR(12);
    DECLARE i INT DEFAULT 0;
    IF p_topic IS NULL OR trim(p_topic) = '' THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'topic must not be empty';
    END IF;
    IF p_type IS NULL OR trim(p_type) = '' THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'type must not be empty';
    END IF;
    IF octet_length(p_topic) > 255 THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'topic is longer than 255 bytes';
    END IF;
    IF octet_length(p_type) > 255 THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'type is longer than 255 bytes';
    END IF;
    IF p_payload IS NULL OR p_content_type IS NULL THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'payload and content type must not be null';
    END IF;
    -- SQL NULL and JSON null both mean no headers.
    IF p_headers IS NULL OR JSON_TYPE(p_headers) = 'NULL' THEN
        SET p_headers = '{}';
    END IF;
    IF NOT JSON_VALID(p_headers) OR JSON_TYPE(p_headers) <> 'OBJECT' THEN
        SET v_why = concat('headers must be a JSON object of strings, not ',
                           lower(coalesce(JSON_TYPE(p_headers), 'invalid JSON')));
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_why;
    END IF;
    SET v_size = octet_length(p_payload);
    SET v_names = JSON_KEYS(p_headers);
    WHILE i < JSON_LENGTH(v_names) DO
        SET v_name = JSON_UNQUOTE(JSON_EXTRACT(v_names, concat('$[', i, ']')));
        SET v_path = concat('$.', JSON_QUOTE(v_name));
        SET v_type = JSON_TYPE(JSON_EXTRACT(p_headers, v_path));
        IF v_type <> 'STRING' THEN
            SET v_why = concat('header ', JSON_QUOTE(v_name), ' must be a string, not ',
                               lower(v_type));
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_why;
        END IF;
        SET v_value = JSON_UNQUOTE(JSON_EXTRACT(p_headers, v_path));
        SET v_why = {p}header_refusal(v_name, v_value);
        IF v_why IS NOT NULL THEN
            SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_why;
        END IF;
        SET v_size = v_size + octet_length(v_name) + octet_length(v_value);
        SET i = i + 1;
    END WHILE;
    IF v_size > v_max THEN
        SET v_why = concat('message is ', v_size, ' bytes, over the limit of ', v_max,
                           ' bytes (payload and headers)');
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = v_why;
    END IF;
    -- A version 7 id, time-ordered like the library's: 48 bits of Unix milliseconds, then
    -- the version, random bits and the variant.
    SET v_ms = lpad(lower(hex(CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS UNSIGNED))), 12, '0');
    SET v_hex = SHA2(concat(UUID(), RAND(), CONNECTION_ID()), 256);
    SET p_id = concat(left(v_ms, 8), '-', substring(v_ms, 9, 4), '-7', substring(v_hex, 1, 3),
                      '-', lower(conv(8 + (conv(substring(v_hex, 4, 1), 16, 10) & 3), 10, 16)),
                      substring(v_hex, 5, 3), '-', substring(v_hex, 8, 12));
    SET p_key = nullif(p_key, '');
    INSERT INTO {p}messages (id, topic, type, msg_key, msg_partition, payload, content_type,
                             headers, created_at, available_at)
    VALUES (p_id, p_topic, p_type, p_key,
            CRC32(coalesce(CAST(p_key AS BINARY), UNHEX(replace(p_id, '-', '')))) % 1024,
            p_payload, p_content_type, p_headers,
            CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED),
            CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED));
END $$

DROP PROCEDURE IF EXISTS {p}enqueue $$

CREATE PROCEDURE {p}enqueue(
    IN p_topic TEXT CHARACTER SET utf8mb4, IN p_type TEXT CHARACTER SET utf8mb4,
    IN p_payload LONGTEXT CHARACTER SET utf8mb4, IN p_key TEXT CHARACTER SET utf8mb4,
    IN p_headers LONGTEXT CHARACTER SET utf8mb4, OUT p_id CHAR(36))
MODIFIES SQL DATA
BEGIN
    IF p_payload IS NULL OR NOT JSON_VALID(p_payload) THEN
        SIGNAL SQLSTATE '22023' SET MESSAGE_TEXT = 'payload is not valid JSON';
    END IF;
    CALL {p}enqueue_bytes(p_topic, p_type, 'application/json', CAST(p_payload AS BINARY),
                          p_key, p_headers, p_id);
END $$
