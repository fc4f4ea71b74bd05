-- Enqueue from SQL, for writers that do not link the Rust library (a Python, Go or Node service
-- sharing the database): in the writer's own transaction, with the checks of the library's
-- enqueue, producing rows the relay cannot tell from the library's.
--
--   SELECT {schema}.{p}enqueue(topic, type, payload jsonb [, key text [, headers jsonb]]) -> id
--   (an empty key is no key, as in the library)
--   SELECT {schema}.{p}enqueue_bytes(topic, type, content_type, payload bytea
--                                    [, key text [, headers jsonb]]) -> id
--
-- The largest message accepted (payload and headers) is the setting outbox.max_message_bytes
-- (for example `ALTER DATABASE app SET outbox.max_message_bytes = 4194304`), 1 MiB when unset,
-- like the library's default. A refused message raises SQLSTATE 22023 (invalid_parameter_value)
-- with the library's wording, and the caller's transaction decides what happens next.

-- CRC-32 (IEEE 802.3), as the library computes partitions: the relays that own partitions must
-- agree on each row's partition whoever wrote it.
CREATE OR REPLACE FUNCTION {schema}.{p}crc32(data bytea)
RETURNS bigint
LANGUAGE plpgsql
IMMUTABLE STRICT PARALLEL SAFE
AS $fn$
DECLARE
    crc bigint := 4294967295;
    i integer;
    j integer;
BEGIN
    FOR i IN 0 .. length(data) - 1 LOOP
        crc := crc # get_byte(data, i);
        FOR j IN 1 .. 8 LOOP
            IF crc & 1 = 1 THEN
                crc := (crc >> 1) # 3988292384;
            ELSE
                crc := crc >> 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN crc # 4294967295;
END
$fn$;

-- The library's header rules (outbox_core::headers): a token name of at most 128 bytes, no CR,
-- LF or NUL in the value, not a name the transports set themselves, and a well-formed W3C trace
-- context when the header is one. Returns why a header is refused, or NULL.
CREATE OR REPLACE FUNCTION {schema}.{p}header_refusal(name text, value text)
RETURNS text
LANGUAGE plpgsql
IMMUTABLE
AS $fn$
DECLARE
    lower_name text := lower(name);
    parts text[];
    members text[];
BEGIN
    IF name = '' THEN
        RETURN 'header name must not be empty';
    END IF;
    IF octet_length(name) > 128 THEN
        RETURN format('header name %s is longer than 128 bytes', to_json(name));
    END IF;
    IF name !~ '^[-A-Za-z0-9!#$%&''*+.^_`|~]+$' THEN
        RETURN format('header name %s contains %s, which not every transport can carry '
                      '(use letters, digits and !#$%%&''*+-.^_`|~)',
                      to_json(name),
                      '''' || substring(name FROM '[^-A-Za-z0-9!#$%&''*+.^_`|~]') || '''');
    END IF;
    IF strpos(value, chr(13)) > 0 OR strpos(value, chr(10)) > 0 THEN
        RETURN format('header %s has a CR, LF or NUL in its value', to_json(name));
    END IF;
    IF lower_name IN ('host', 'content-type', 'content-length', 'content-encoding',
                      'transfer-encoding', 'connection', 'keep-alive', 'upgrade', 'te',
                      'trailer', 'cc', 'bcc', 'x-death', 'x-delay')
       OR lower_name LIKE 'nats-%' OR lower_name LIKE 'webhook-%' OR lower_name LIKE 'ce-%' THEN
        RETURN format('header %s is reserved: the transports set it themselves', to_json(name));
    END IF;
    IF lower_name = 'traceparent' THEN
        parts := regexp_match(value,
            '^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?$');
        IF parts IS NULL OR parts[1] = 'ff' OR (parts[1] = '00' AND parts[4] IS NOT NULL)
           OR parts[2] ~ '^0+$' OR parts[3] ~ '^0+$' THEN
            RETURN format('header %s is not in the W3C Trace Context format', to_json(name));
        END IF;
    ELSIF lower_name = 'tracestate' THEN
        SELECT array_agg(btrim(m, E' \t')) INTO members
        FROM unnest(string_to_array(value, ',')) AS m
        WHERE btrim(m, E' \t') <> '';
        IF octet_length(value) > 512 OR coalesce(cardinality(members), 0) > 32
           OR EXISTS (SELECT 1 FROM unnest(members) AS m
                      WHERE m !~ '^[^=]+=[^=]+$') THEN
            RETURN format('header %s is not in the W3C Trace Context format', to_json(name));
        END IF;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.{p}enqueue_bytes(
    p_topic text, p_type text, p_content_type text, p_payload bytea,
    p_key text DEFAULT NULL, p_headers jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_id uuid;
    v_size bigint;
    v_max bigint := coalesce(nullif(current_setting('outbox.max_message_bytes', true), '')::bigint,
                             1048576);
    v_why text;
    h record;
BEGIN
    IF p_topic IS NULL OR p_topic ~ '^\s*$' THEN
        RAISE EXCEPTION 'topic must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_type IS NULL OR p_type ~ '^\s*$' THEN
        RAISE EXCEPTION 'type must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_topic) > 255 THEN
        RAISE EXCEPTION 'topic is longer than 255 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(p_type) > 255 THEN
        RAISE EXCEPTION 'type is longer than 255 bytes' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_payload IS NULL OR p_content_type IS NULL THEN
        RAISE EXCEPTION 'payload and content type must not be null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- SQL NULL and JSON null both mean no headers.
    IF p_headers IS NULL OR jsonb_typeof(p_headers) = 'null' THEN
        p_headers := '{}'::jsonb;
    END IF;
    IF jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'headers must be a JSON object of strings, not %', jsonb_typeof(p_headers)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_size := octet_length(p_payload);
    FOR h IN SELECT e.key AS name, e.value FROM jsonb_each(p_headers) e LOOP
        IF jsonb_typeof(h.value) <> 'string' THEN
            RAISE EXCEPTION 'header % must be a string, not %', to_json(h.name), jsonb_typeof(h.value)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_why := {schema}.{p}header_refusal(h.name, h.value #>> '{}');
        IF v_why IS NOT NULL THEN
            RAISE EXCEPTION '%', v_why USING ERRCODE = 'invalid_parameter_value';
        END IF;
        v_size := v_size + octet_length(h.name) + octet_length(h.value #>> '{}');
    END LOOP;
    IF v_size > v_max THEN
        RAISE EXCEPTION 'message is % bytes, over the limit of % bytes (payload and headers)',
            v_size, v_max USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- A version 7 id, time-ordered like the library's: 48 bits of Unix milliseconds over a
    -- random (version 4) id, whose version bits are then turned into 7.
    v_id := encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                                  FROM 3)
                FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid;
    INSERT INTO {schema}.{p}messages
        (id, topic, type, key, partition, payload, content_type, headers, available_at)
    VALUES (v_id, p_topic, p_type, nullif(p_key, ''),
            ({schema}.{p}crc32(coalesce(convert_to(nullif(p_key, ''), 'UTF8'), uuid_send(v_id)))
             % 1024)::int,
            p_payload, p_content_type, p_headers, now());
    RETURN v_id;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.{p}enqueue(
    p_topic text, p_type text, p_payload jsonb,
    p_key text DEFAULT NULL, p_headers jsonb DEFAULT NULL)
RETURNS uuid
LANGUAGE sql
AS $fn$
    SELECT {schema}.{p}enqueue_bytes(p_topic, p_type, 'application/json',
                                     convert_to(p_payload::text, 'UTF8'), p_key, p_headers)
$fn$;
