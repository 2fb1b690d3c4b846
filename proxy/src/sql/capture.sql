-- The chorus schema Chorus installs on every backend: row versions and
-- tombstones, applied positions, the conflict log, and the capture trigger
-- that turns every change of an adopted table into a transactional logical
-- message. Plain SQL and PL/pgSQL: no extension is needed. Idempotent; the
-- installer runs it in one transaction under an advisory lock.

CREATE SCHEMA IF NOT EXISTS chorus;

-- This backend's node id, used as the origin of writes that bypass the proxy.
-- sequence_id: the node's sequence id from the Raft log (see
-- chorus.make_global). driver_epoch: the epoch of the node that drives
-- this backend's streams (see Request::SetDriver): a node starting to
-- drive them with an older epoch learns that it was fenced.
-- stamp_age_ms, stamp_age_prev_ms, stamp_age_changed_at: how much older
-- than this backend's clock a transaction's stamp may be (see
-- chorus.fresh_stamp, chorus.set_stamp_age). pruned_below, pruned_at: the
-- last pruning of tombstones; horizon_sent: the last horizon sent (see
-- tombstones.sql).
CREATE TABLE IF NOT EXISTS chorus.local (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_id integer NOT NULL,
    sequence_id integer,
    driver_epoch bigint NOT NULL DEFAULT 0,
    stamp_age_ms bigint NOT NULL DEFAULT 300000,
    stamp_age_prev_ms bigint NOT NULL DEFAULT 300000,
    stamp_age_changed_at timestamptz NOT NULL DEFAULT '-infinity',
    pruned_below bigint NOT NULL DEFAULT 0,
    pruned_at timestamptz,
    horizon_sent bigint NOT NULL DEFAULT 0
);

-- The version of this schema (see cluster/capture.rs, SCHEMA_VERSION, and
-- sql/migrations/).
CREATE TABLE IF NOT EXISTS chorus.schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- Tables whose changes replicate, with their primary key columns in key
-- order (empty for a keyless table: one without a primary key, whose
-- updated and deleted rows peers find by content, see
-- chorus.apply_keyless).
CREATE TABLE IF NOT EXISTS chorus.replicated_table (
    tbl text PRIMARY KEY,
    pk_columns text[] NOT NULL,
    keyless boolean NOT NULL
);

-- The version of every row ever written, kept after a delete as its
-- tombstone, so that a late update cannot bring a deleted row back, until
-- no such update can arrive any more (see tombstones.sql).
CREATE TABLE IF NOT EXISTS chorus.row_version (
    tbl text NOT NULL,
    pk jsonb NOT NULL,
    version bigint NOT NULL,
    origin integer NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (tbl, pk)
);

-- The publication the replication streams decode with (pgoutput): it
-- publishes no table, so only Chorus's messages are sent.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'chorus') THEN
        CREATE PUBLICATION chorus;
    END IF;
END
$$;

-- How far the changes of each origin have been applied here.
-- max_version: the newest version applied from each origin (the node's
-- clock observes it). driver_epoch: the epoch of the node that drives the
-- origin's stream (see Request::SetDriver): an apply from an older one is
-- refused (fenced). horizon: every change of the origin's with an older
-- version has been applied here; complete: the origin has every change of
-- every backend older than this (see chorus.note_horizon).
CREATE TABLE IF NOT EXISTS chorus.applied (
    origin integer PRIMARY KEY,
    lsn pg_lsn NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    max_version bigint NOT NULL DEFAULT 0,
    driver_epoch bigint NOT NULL DEFAULT 0,
    horizon bigint NOT NULL DEFAULT 0,
    complete bigint NOT NULL DEFAULT 0
);

-- Every conflict resolved on this backend.
CREATE TABLE IF NOT EXISTS chorus.conflict (
    id bigserial PRIMARY KEY,
    resolved_at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    pk jsonb,
    kind text NOT NULL,
    resolution text NOT NULL,
    local_version bigint,
    local_origin integer,
    local_row jsonb,
    remote_version bigint,
    remote_origin integer,
    remote_row jsonb,
    -- What a conflict of kind schema_mismatch or unknown_column was about.
    detail text
);

-- The DDL of the cluster's Raft-ordered DDL log applied here, one row per
-- log entry in log order, written in the same transaction as the DDL (so
-- each entry is applied exactly once). A statement that failed here is
-- recorded with its error. max(seq) is this backend's DDL index: changes
-- captured here carry it, and a peer applies them only once it has
-- applied that DDL too.
CREATE TABLE IF NOT EXISTS chorus.ddl_history (
    seq bigint PRIMARY KEY,
    origin integer NOT NULL,
    search_path text NOT NULL,
    role text NOT NULL,
    command text NOT NULL,
    error text,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, the version,
-- 12 bits of sub-millisecond time (the RFC's "increased clock precision"
-- method), the variant, and 62 random bits (from gen_random_uuid, built
-- in since PostgreSQL 13, so no extension is needed). Time-ordered across
-- sessions to the clock's precision, and strictly increasing within a
-- session: a value that would not exceed the session's last one takes the
-- last one's time plus one sub-millisecond step.
CREATE OR REPLACE FUNCTION chorus.uuidv7() RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    now_us bigint := floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    -- Time in 1/4096 ms steps: milliseconds in the high bits, 12 bits below.
    t bigint := ((now_us / 1000) << 12) | (((now_us % 1000) * 4096) / 1000);
    last bigint := nullif(current_setting('chorus.uuidv7_last', true), '')::bigint;
    b bytea := uuid_send(gen_random_uuid());
BEGIN
    IF last IS NOT NULL AND t <= last THEN
        t := last + 1;
    END IF;
    PERFORM set_config('chorus.uuidv7_last', t::text, false);
    FOR i IN 0..5 LOOP
        b := set_byte(b, i, ((t >> (12 + 8 * (5 - i))) & 255)::integer);
    END LOOP;
    b := set_byte(b, 6, (112 | ((t >> 8) & 15))::integer);
    b := set_byte(b, 7, (t & 255)::integer);
    -- Byte 8 keeps gen_random_uuid's variant bits (10).
    RETURN encode(b, 'hex')::uuid;
END
$$;

-- A hybrid-logical-clock value from this backend's clock, packed like the
-- proxy's (milliseconds since 2024-01-01 UTC, shifted past a 22-bit
-- logical counter): the version of a write made directly on the backend.
CREATE OR REPLACE FUNCTION chorus.clock_hlc() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT (floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1704067200000) << 22
$$;

-- Whether this session is Chorus's own (or another superuser's): only
-- such a session may quiet capture with `chorus.applying` (the apply of
-- remote changes). An application role that sets it is captured as usual.
-- `is_superuser` is PostgreSQL's own (no role can set it) and follows SET
-- ROLE, not SECURITY DEFINER: the replay of a role's DDL (inside a
-- function owned by that role, see chorus.apply_stream_ddl) stays trusted.
CREATE OR REPLACE FUNCTION chorus.trusted_session() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on'
$$;

-- The role a statement runs as, read inside a SECURITY DEFINER function
-- (where current_user is the function's owner): SET ROLE's role, else the
-- session's.
CREATE OR REPLACE FUNCTION chorus.invoker() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN current_setting('role') = 'none' THEN session_user::text
                ELSE current_setting('role') END
$$;

-- This transaction's stamp: the HLC value, origin node and DDL index its
-- first captured change pinned (with the transaction id, in chorus.txn),
-- or, for its first one, the proxy's stamp (chorus.hlc, chorus.origin)
-- with this backend's clock and node id as fallbacks (the stamp made no
-- older than chorus.fresh_stamp allows). chorus.capture has
-- the same inlined (it runs for every row).
CREATE OR REPLACE FUNCTION chorus.txn_stamp(OUT txn_hlc bigint, OUT origin integer, OUT ddl_seq bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    xid text := txid_current()::text;
    pinned text := current_setting('chorus.txn', true);
BEGIN
    IF pinned IS NOT NULL AND split_part(pinned, ':', 1) = xid THEN
        txn_hlc := split_part(pinned, ':', 2)::bigint;
        origin := split_part(pinned, ':', 3)::integer;
        ddl_seq := split_part(pinned, ':', 4)::bigint;
        RETURN;
    END IF;
    txn_hlc := chorus.fresh_stamp(nullif(current_setting('chorus.hlc', true), '')::bigint);
    origin := coalesce(nullif(current_setting('chorus.origin', true), '')::integer,
                       (SELECT l.node_id FROM chorus.local l));
    ddl_seq := coalesce((SELECT max(h.seq) FROM chorus.ddl_history h), 0);
    PERFORM set_config('chorus.txn', xid || ':' || txn_hlc || ':' || origin || ':' || ddl_seq, true);
END
$$;

-- The primary key of a row image, as a JSON object; NULL without a key.
CREATE OR REPLACE FUNCTION chorus.key_of(img jsonb, cols text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN cardinality(cols) = 0 THEN NULL
                ELSE (SELECT jsonb_object_agg(c, img -> c) FROM unnest(cols) AS c)
           END
$$;

-- The capture trigger (AFTER, FOR EACH ROW) on every adopted table.
-- `chorus.hlc` and `chorus.origin` are set by the proxy in the session
-- before each write (see proxy/src/session/stamp.rs); a write made directly on the
-- backend falls back to this backend's clock and node id. Changes made by the apply of remote changes
-- (`chorus.applying = on`) are not captured again.
--
-- It runs as the owner of the chorus schema (SECURITY DEFINER, with a
-- pinned search_path): application roles write their tables through it
-- without any privilege on chorus.* or on pg_logical_emit_message, which
-- are not granted to them. What it runs of theirs: to_jsonb of their row,
-- whose only user code could be a cast to json or jsonb (refused, see
-- chorus.handle_ddl), and their types' output functions (C, made by a
-- superuser).
CREATE OR REPLACE FUNCTION chorus.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel text;
    here text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    cols text[];
    txn_hlc bigint;
    origin integer;
    ddl_seq bigint;
    xid text;
    pinned text;
    old_img jsonb;
    new_img jsonb;
    old_key jsonb;
    new_key jsonb;
    key jsonb;
    col text;
    prev bigint;
    ver bigint;
    ops text[];
    keys jsonb[];
    imgs jsonb[];
    textual text[];
    arrays text[];
    jsons text[];
    jsonbs text[];
    wants_texts boolean;
    val jsonb;
BEGIN
    -- (chorus.trusted_session, inlined: this runs for every applied row.)
    IF current_setting('chorus.applying', true) = 'on' AND current_setting('is_superuser') = 'on' THEN
        RETURN NULL;
    END IF;
    -- chorus.adopt passes the key columns, the keyless flag (unused here:
    -- no key columns say the same) and the qualified name as trigger
    -- arguments, which saves work on every row.
    IF TG_NARGS >= 3 THEN
        cols := TG_ARGV[0]::text[];
        rel := TG_ARGV[2];
        IF TG_NARGS >= 4 THEN
            textual := TG_ARGV[3]::text[];
        END IF;
        IF TG_NARGS >= 5 THEN
            arrays := TG_ARGV[4]::text[];
        END IF;
        IF TG_NARGS >= 7 THEN
            jsons := TG_ARGV[5]::text[];
            jsonbs := TG_ARGV[6]::text[];
        END IF;
        -- The name changes are recorded under is this table's (or, for a
        -- partition, its root's): no trigger can record changes of another.
        IF rel <> here
           AND rel IS DISTINCT FROM (SELECT format('%I.%I', n.nspname, c.relname)
                                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE c.oid = pg_partition_root(TG_RELID)) THEN
            RAISE EXCEPTION 'trigger % on % records changes of another table (%)', TG_NAME, TG_RELID::regclass, rel
                USING ERRCODE = '42501';
        END IF;
    ELSE
        rel := here;
        SELECT t.pk_columns INTO cols FROM chorus.replicated_table t WHERE t.tbl = rel;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    END IF;
    -- One stamp per transaction: the first one seen is pinned (with the
    -- transaction id) for the transaction's later rows, even if the proxy
    -- stamps again before a later statement of the same transaction
    -- (chorus.txn_stamp, inlined: this runs for every row).
    xid := txid_current()::text;
    pinned := current_setting('chorus.txn', true);
    IF pinned IS NOT NULL AND split_part(pinned, ':', 1) = xid THEN
        txn_hlc := split_part(pinned, ':', 2)::bigint;
        origin := split_part(pinned, ':', 3)::integer;
        ddl_seq := split_part(pinned, ':', 4)::bigint;
    ELSE
        txn_hlc := chorus.fresh_stamp(nullif(current_setting('chorus.hlc', true), '')::bigint);
        origin := coalesce(nullif(current_setting('chorus.origin', true), '')::integer,
                           (SELECT l.node_id FROM chorus.local l));
        -- The DDL this transaction's changes may depend on (see
        -- chorus.ddl_history).
        ddl_seq := coalesce((SELECT max(h.seq) FROM chorus.ddl_history h), 0);
        PERFORM set_config('chorus.txn', xid || ':' || txn_hlc || ':' || origin || ':' || ddl_seq, true);
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_img := to_jsonb(OLD);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_img := to_jsonb(NEW);
    END IF;
    -- to_jsonb renders a type with a cast to json (hstore, …) as JSON,
    -- which its own input function cannot read back, and an array without
    -- its bounds: those columns carry their text form (see
    -- chorus.column_forms), from the type's output function (format's %s:
    -- a cast to text could be a function of the type's owner). Arrays only
    -- when the row has one with bounds of its own (array_out writes them
    -- as `[1:2]={…}`; the row's text is cheap next to a query per column).
    IF cardinality(arrays) > 0
       AND (strpos(format('%s', NEW), ']=') > 0 OR strpos(format('%s', OLD), ']=') > 0) THEN
        textual := textual || arrays;
    END IF;
    IF cardinality(textual) > 0 THEN
        FOREACH col IN ARRAY textual LOOP
            IF old_img IS NOT NULL THEN
                EXECUTE format('SELECT to_jsonb(CASE WHEN ($1).%I IS NULL THEN NULL ELSE format(''%%s'', ($1).%I) END)', col, col)
                    USING OLD INTO val;
                old_img := jsonb_set(old_img, ARRAY[col], coalesce(val, 'null'::jsonb));
            END IF;
            IF new_img IS NOT NULL THEN
                EXECUTE format('SELECT to_jsonb(CASE WHEN ($1).%I IS NULL THEN NULL ELSE format(''%%s'', ($1).%I) END)', col, col)
                    USING NEW INTO val;
                new_img := jsonb_set(new_img, ARRAY[col], coalesce(val, 'null'::jsonb));
            END IF;
        END LOOP;
    END IF;
    -- json and jsonb columns: what JSON cannot carry exactly travels as
    -- text (see chorus.with_json_texts).
    wants_texts := cardinality(jsons) > 0;
    IF NOT wants_texts AND cardinality(jsonbs) > 0 THEN
        FOREACH col IN ARRAY jsonbs LOOP
            IF new_img -> col = 'null'::jsonb OR old_img -> col = 'null'::jsonb THEN
                wants_texts := true;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF wants_texts THEN
        IF old_img IS NOT NULL THEN
            old_img := chorus.with_json_texts(old_img, OLD, jsons, jsonbs);
        END IF;
        IF new_img IS NOT NULL THEN
            new_img := chorus.with_json_texts(new_img, NEW, jsons, jsonbs);
        END IF;
    END IF;
    -- The keys, built here rather than with chorus.key_of (same value: a
    -- jsonb object does not depend on the order its keys were added in).
    FOREACH col IN ARRAY cols LOOP
        old_key := coalesce(old_key, '{}') || jsonb_build_object(col, old_img -> col);
        new_key := coalesce(new_key, '{}') || jsonb_build_object(col, new_img -> col);
    END LOOP;
    IF old_img IS NULL THEN
        old_key := NULL;
    END IF;
    IF new_img IS NULL THEN
        new_key := NULL;
    END IF;
    -- A changed key replicates as a delete of the old key and an insert of
    -- the new one; anything else as itself.
    IF TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key THEN
        ops := ARRAY['DELETE', 'INSERT'];
        keys := ARRAY[old_key, new_key];
        imgs := ARRAY[NULL, new_img];
    ELSE
        ops := ARRAY[TG_OP];
        keys := ARRAY[coalesce(new_key, old_key)];
        imgs := ARRAY[new_img];
    END IF;
    -- Record each change: bump the row's version to max(txn_hlc, previous
    -- + 1) (so a write that overwrote a newer remote version still wins: it
    -- happened after it) and emit the change as a transactional logical
    -- message, which logical decoding delivers only if and when the
    -- transaction commits, in commit order.
    FOR i IN 1..cardinality(ops) LOOP
        key := keys[i];
        prev := NULL;
        IF key IS NULL THEN
            -- Newer than the table's TRUNCATE marker, as below.
            ver := greatest(txn_hlc, (SELECT v.version + 1 FROM chorus.row_version v
                                       WHERE v.tbl = rel AND v.pk = '{}'));
        ELSE
            -- Read the previous version and write the new one in one
            -- statement, with the key's version row locked from the read
            -- on: writers of one key (this capture, the apply of remote
            -- changes) serialize on that row until they commit. (A key
            -- without one yet: the apply finds out when it makes one, see
            -- chorus.apply_batch. The version then still only grows.)
            -- The table's TRUNCATE marker (key '{}', see
            -- chorus.capture_truncate): a write after a TRUNCATE is newer
            -- than it, whatever this backend's clock says.
            WITH old AS (
                SELECT v.version FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = key FOR UPDATE
            ), mark AS (
                SELECT v.version FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = '{}'
            ), new AS (
                INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
                SELECT rel, key, greatest(txn_hlc, coalesce((SELECT version FROM old), 0) + 1,
                                          coalesce((SELECT version FROM mark), 0) + 1),
                       origin, ops[i] = 'DELETE'
                ON CONFLICT (tbl, pk) DO UPDATE
                    SET version = greatest(excluded.version, v.version + 1), origin = excluded.origin,
                        deleted = excluded.deleted
                RETURNING v.version
            )
            SELECT (SELECT version FROM old), (SELECT version FROM new) INTO prev, ver;
        END IF;
        -- `prev` is the version this write overwrote: a peer whose copy of
        -- the row has exactly that version applies it without a conflict.
        -- The prefix carries the DDL index ('chorus:<seq>'), which the
        -- streams read without parsing the payload.
        -- A table without a primary key has no key: its update or delete
        -- carries the old row, which peers match by content (see
        -- chorus.apply_keyless).
        -- A partition's row also names the partition it is in here
        -- ('leaf'): a peer where that partition has left the tree since
        -- (a concurrent DETACH) applies the change to it, where the row
        -- is, rather than through the root (see chorus.landed).
        PERFORM pg_logical_emit_message(true, 'chorus:' || ddl_seq, (jsonb_build_object(
            'table', rel, 'op', ops[i], 'key', key, 'row', imgs[i],
            'version', ver, 'prev', prev, 'origin', origin)
            || CASE WHEN key IS NULL AND old_img IS NOT NULL THEN jsonb_build_object('old', old_img)
                    ELSE '{}' END
            || CASE WHEN rel <> here THEN jsonb_build_object('leaf', here) ELSE '{}' END)::text);
    END LOOP;
    RETURN NULL;
END
$$;

-- The capture by statement of a plain table's INSERTs, DELETEs and UPDATEs
-- (AFTER, FOR EACH STATEMENT, with the rows as the transition tables
-- chorus_new and chorus_old), where chorus.by_statement and
-- chorus.updates_by_statement say so: the same records chorus.capture
-- makes of each row, made in one set-based statement (chorus.capture runs
-- PL/pgSQL and several queries per row, which a load of a million rows
-- pays a million times). Arguments: the key columns and the table's
-- qualified name. The transaction's stamp, the row versions (the newest of
-- the stamp, the key's version plus one and the table's TRUNCATE marker
-- plus one) and the messages are chorus.capture's; a row image is
-- to_jsonb's (of `r.*`: a column may be named like the alias), which
-- carries every column of such a table exactly. Static
-- SQL: PL/pgSQL keeps its plans per trigger, so a one-row statement costs
-- about what chorus.capture costs for its row.
--
-- An UPDATE is a set of changes by key, as chorus.capture makes them: a
-- key both before and after is an UPDATE, one only after an INSERT, one
-- only before a DELETE (a changed key).
CREATE OR REPLACE FUNCTION chorus.capture_statement() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cols text[] := TG_ARGV[0]::text[];
    rel text := TG_ARGV[1];
    stamp record;
    mark bigint;
BEGIN
    IF current_setting('chorus.applying', true) = 'on' AND current_setting('is_superuser') = 'on' THEN
        RETURN NULL;
    END IF;
    IF rel <> format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME) THEN
        RAISE EXCEPTION 'trigger % on % records changes of another table (%)', TG_NAME, TG_RELID::regclass, rel
            USING ERRCODE = '42501';
    END IF;
    -- (A statement of no row writes nothing: no stamp, no transaction id.)
    IF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM chorus_old) THEN
            RETURN NULL;
        END IF;
    ELSIF NOT EXISTS (SELECT 1 FROM chorus_new) THEN
        RETURN NULL;
    END IF;
    SELECT s.txn_hlc, s.origin, 'chorus:' || s.ddl_seq AS prefix INTO stamp FROM chorus.txn_stamp() s;
    mark := coalesce((SELECT v.version FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = '{}'), 0);

    IF cardinality(cols) = 0 THEN
        -- No key: no version row; a deleted row travels whole, for peers to
        -- find by content (see chorus.apply_keyless).
        -- (The rows' columns stay inside the subqueries, away from this
        -- function's variables.)
        IF TG_OP = 'INSERT' THEN
            PERFORM count(pg_logical_emit_message(true, stamp.prefix, jsonb_build_object(
                        'table', rel, 'op', 'INSERT', 'key', NULL, 'row', i.img,
                        'version', greatest(stamp.txn_hlc, mark + 1), 'prev', NULL,
                        'origin', stamp.origin)::text))
              FROM (SELECT to_jsonb(r.*) AS img FROM chorus_new r) i;
        ELSE
            PERFORM count(pg_logical_emit_message(true, stamp.prefix, jsonb_build_object(
                        'table', rel, 'op', 'DELETE', 'key', NULL, 'row', NULL,
                        'version', greatest(stamp.txn_hlc, mark + 1), 'prev', NULL,
                        'origin', stamp.origin, 'old', i.img)::text))
              FROM (SELECT to_jsonb(r.*) AS img FROM chorus_old r) i;
        END IF;
        RETURN NULL;
    END IF;

    -- The changes by key (`changed`), then, for all of them at once: the
    -- keys' version rows (a tombstone, or one a concurrent apply made)
    -- locked from the read on, as chorus.capture locks each, the new
    -- versions, the messages. (Three statements, one per operation, that
    -- differ in `changed` only: a statement may name only the transition
    -- tables its trigger has.)
    IF TG_OP = 'INSERT' THEN
        WITH changed AS (
            SELECT CASE cardinality(cols) WHEN 1 THEN jsonb_build_object(cols[1], i.img -> cols[1])
                      ELSE (SELECT jsonb_object_agg(c, i.img -> c) FROM unnest(cols) AS c) END AS key, i.img, 'INSERT' AS op
              FROM (SELECT to_jsonb(r.*) AS img FROM chorus_new r) i
        ), held AS (
            SELECT v.pk, v.version FROM changed c JOIN chorus.row_version v ON v.tbl = rel AND v.pk = c.key
               FOR UPDATE OF v
        ), old AS (
            SELECT c.key, c.img, c.op, h.version AS prev FROM changed c LEFT JOIN held h ON h.pk = c.key
        ), up AS (
            INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
            SELECT rel, o.key, greatest(stamp.txn_hlc, coalesce(o.prev, 0) + 1, mark + 1), stamp.origin,
                   o.op = 'DELETE'
              FROM old o
            ON CONFLICT (tbl, pk) DO UPDATE SET version = greatest(excluded.version, v.version + 1),
                origin = excluded.origin, deleted = excluded.deleted
            RETURNING v.pk, v.version
        )
        SELECT count(pg_logical_emit_message(true, stamp.prefix, jsonb_build_object(
                   'table', rel, 'op', o.op, 'key', o.key, 'row', o.img, 'version', u.version,
                   'prev', o.prev, 'origin', stamp.origin)::text))
          INTO mark
          FROM old o JOIN up u ON u.pk = o.key;
    ELSIF TG_OP = 'DELETE' THEN
        WITH changed AS (
            SELECT CASE cardinality(cols) WHEN 1 THEN jsonb_build_object(cols[1], i.img -> cols[1])
                      ELSE (SELECT jsonb_object_agg(c, i.img -> c) FROM unnest(cols) AS c) END AS key, NULL::jsonb AS img, 'DELETE' AS op
              FROM (SELECT to_jsonb(r.*) AS img FROM chorus_old r) i
        ), held AS (
            SELECT v.pk, v.version FROM changed c JOIN chorus.row_version v ON v.tbl = rel AND v.pk = c.key
               FOR UPDATE OF v
        ), old AS (
            SELECT c.key, c.img, c.op, h.version AS prev FROM changed c LEFT JOIN held h ON h.pk = c.key
        ), up AS (
            INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
            SELECT rel, o.key, greatest(stamp.txn_hlc, coalesce(o.prev, 0) + 1, mark + 1), stamp.origin,
                   o.op = 'DELETE'
              FROM old o
            ON CONFLICT (tbl, pk) DO UPDATE SET version = greatest(excluded.version, v.version + 1),
                origin = excluded.origin, deleted = excluded.deleted
            RETURNING v.pk, v.version
        )
        SELECT count(pg_logical_emit_message(true, stamp.prefix, jsonb_build_object(
                   'table', rel, 'op', o.op, 'key', o.key, 'row', o.img, 'version', u.version,
                   'prev', o.prev, 'origin', stamp.origin)::text))
          INTO mark
          FROM old o JOIN up u ON u.pk = o.key;
    ELSE
        WITH after AS (
            SELECT CASE cardinality(cols) WHEN 1 THEN jsonb_build_object(cols[1], i.img -> cols[1])
                      ELSE (SELECT jsonb_object_agg(c, i.img -> c) FROM unnest(cols) AS c) END AS key, i.img FROM (SELECT to_jsonb(r.*) AS img FROM chorus_new r) i
        ), before AS (
            SELECT CASE cardinality(cols) WHEN 1 THEN jsonb_build_object(cols[1], i.img -> cols[1])
                      ELSE (SELECT jsonb_object_agg(c, i.img -> c) FROM unnest(cols) AS c) END AS key FROM (SELECT to_jsonb(r.*) AS img FROM chorus_old r) i
        ), changed AS (
            SELECT a.key, a.img, CASE WHEN b.key IS NULL THEN 'INSERT' ELSE 'UPDATE' END AS op
              FROM after a LEFT JOIN before b ON b.key = a.key
            UNION ALL
            SELECT b.key, NULL, 'DELETE' FROM before b WHERE NOT EXISTS (SELECT 1 FROM after a WHERE a.key = b.key)
        ), held AS (
            SELECT v.pk, v.version FROM changed c JOIN chorus.row_version v ON v.tbl = rel AND v.pk = c.key
               FOR UPDATE OF v
        ), old AS (
            SELECT c.key, c.img, c.op, h.version AS prev FROM changed c LEFT JOIN held h ON h.pk = c.key
        ), up AS (
            INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
            SELECT rel, o.key, greatest(stamp.txn_hlc, coalesce(o.prev, 0) + 1, mark + 1), stamp.origin,
                   o.op = 'DELETE'
              FROM old o
            ON CONFLICT (tbl, pk) DO UPDATE SET version = greatest(excluded.version, v.version + 1),
                origin = excluded.origin, deleted = excluded.deleted
            RETURNING v.pk, v.version
        )
        SELECT count(pg_logical_emit_message(true, stamp.prefix, jsonb_build_object(
                   'table', rel, 'op', o.op, 'key', o.key, 'row', o.img, 'version', u.version,
                   'prev', o.prev, 'origin', stamp.origin)::text))
          INTO mark
          FROM old o JOIN up u ON u.pk = o.key;
    END IF;
    RETURN NULL;
END
$$;

-- The TRUNCATE trigger (FOR EACH STATEMENT) on every adopted table.
-- A TRUNCATE replicates as a record with the table and a version newer
-- than every row it removed here; every backend then removes the rows it
-- holds with older versions, and keeps the table's marker (a version row
-- with key '{}'): a change older than the TRUNCATE that arrives later is
-- skipped, and a write after it gets a newer version. So a row inserted
-- concurrently through another node survives everywhere exactly when its
-- version is newer than the TRUNCATE's (last writer wins, as for rows).
--
-- A partitioned table's rows are recorded under its root's name, so its
-- triggers run BEFORE the truncation, while a partition's rows are still
-- there to read. PostgreSQL fires the BEFORE TRUNCATE triggers of a
-- statement in the order of its tables (a root before its partitions),
-- all of them before the AFTER ones:
-- - the root's records a TRUNCATE of the whole tree, under its name, and
--   names the root in `chorus.truncating_tree` for the rest of the
--   statement (its AFTER trigger, chorus.capture_truncate_end, clears it);
--   the partitions' triggers of that statement stay quiet;
-- - a partition truncated on its own records a delete of each of its rows,
--   as DELETE FROM it would (the rows' keys are the root's; a row
--   concurrently written elsewhere survives where its version is newer),
--   since the tree's marker cannot speak for one partition. That costs a
--   read of the partition and a message per row. A partition of a table
--   without a primary key has no keys to delete by: refused.
CREATE OR REPLACE FUNCTION chorus.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel text := TG_ARGV[0];
    here text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    txn_hlc bigint;
    origin integer;
    ddl_seq bigint;
    ver bigint;
    cols text[];
    mark bigint;
BEGIN
    IF current_setting('chorus.applying', true) = 'on' AND current_setting('is_superuser') = 'on' THEN
        RETURN NULL;
    END IF;
    -- A partitioned table inside a tree (made on its own, then attached):
    -- its leaves speak for it.
    IF (SELECT c.relkind = 'p' AND c.relispartition FROM pg_class c WHERE c.oid = TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF rel <> here THEN
        -- A partition: quiet when its root's TRUNCATE is recorded.
        IF current_setting('chorus.truncating_tree', true) = rel THEN
            RETURN NULL;
        END IF;
        SELECT s.txn_hlc, s.origin, s.ddl_seq INTO txn_hlc, origin, ddl_seq FROM chorus.txn_stamp() s;
        SELECT t.pk_columns INTO cols FROM chorus.replicated_table t WHERE t.tbl = rel;
        IF coalesce(cardinality(cols), 0) = 0 THEN
            RAISE EXCEPTION 'TRUNCATE of a partition of a table without a primary key cannot be replicated'
                USING ERRCODE = '0A000',
                      HINT = format('Truncate the whole table %s, or use DELETE FROM %s.', rel, TG_RELID::regclass);
        END IF;
        mark := coalesce((SELECT v.version FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = '{}'), 0);
        -- As chorus.capture_statement records a DELETE: the keys' version
        -- rows locked, tombstones newer than them and than the tree's
        -- TRUNCATE marker, a message per row.
        EXECUTE format($q$
            WITH gone AS (
                SELECT chorus.key_of(to_jsonb(r.*), $1) AS key FROM ONLY %s r
            ), held AS (
                SELECT v.pk, v.version FROM gone g JOIN chorus.row_version v ON v.tbl = $2 AND v.pk = g.key
                   FOR UPDATE OF v
            ), old AS (
                SELECT g.key, h.version AS prev FROM gone g LEFT JOIN held h ON h.pk = g.key
            ), up AS (
                INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
                SELECT $2, o.key, greatest($3, coalesce(o.prev, 0) + 1, $4 + 1), $5, true FROM old o
                ON CONFLICT (tbl, pk) DO UPDATE SET version = greatest(excluded.version, v.version + 1),
                    origin = excluded.origin, deleted = true
                RETURNING v.pk, v.version
            )
            SELECT count(pg_logical_emit_message(true, $6, jsonb_build_object(
                       'table', $2, 'op', 'DELETE', 'key', o.key, 'row', NULL, 'version', u.version,
                       'prev', o.prev, 'origin', $5, 'leaf', $7)::text))
              FROM old o JOIN up u ON u.pk = o.key$q$, TG_RELID::regclass)
            INTO mark
            USING cols, rel, txn_hlc, mark, origin, 'chorus:' || ddl_seq, here;
        RETURN NULL;
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = TG_RELID) = 'p' THEN
        PERFORM set_config('chorus.truncating_tree', rel, true);
    END IF;
    SELECT s.txn_hlc, s.origin, s.ddl_seq INTO txn_hlc, origin, ddl_seq FROM chorus.txn_stamp() s;
    -- Newer than every row it removed here, and than an earlier TRUNCATE.
    SELECT greatest(txn_hlc, max(v.version) + 1) INTO ver FROM chorus.row_version v WHERE v.tbl = rel;
    DELETE FROM chorus.row_version v WHERE v.tbl = rel;
    INSERT INTO chorus.row_version (tbl, pk, version, origin, deleted) VALUES (rel, '{}', ver, origin, true);
    PERFORM pg_logical_emit_message(true, 'chorus:' || ddl_seq, jsonb_build_object(
        'truncate', rel, 'version', ver, 'origin', origin)::text);
    RETURN NULL;
END
$$;

-- The end of a partitioned root's TRUNCATE statement (AFTER): its
-- partitions' triggers speak for themselves again.
CREATE OR REPLACE FUNCTION chorus.capture_truncate_end() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('chorus.truncating_tree', '', true);
    RETURN NULL;
END
$$;

-- (Re)make the TRUNCATE triggers of `rel` (a table, a leaf partition or a
-- partitioned root), recording under `name`: BEFORE the truncation in a
-- partitioned tree, AFTER elsewhere (see chorus.capture_truncate).
CREATE OR REPLACE FUNCTION chorus.put_truncate_trigger(rel regclass, name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    kind "char";
    part boolean;
BEGIN
    SELECT c.relkind, c.relispartition INTO kind, part FROM pg_class c WHERE c.oid = rel;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'chorus_truncate') THEN
        EXECUTE format('DROP TRIGGER chorus_truncate ON %s', rel);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'chorus_truncate_end') THEN
        EXECUTE format('DROP TRIGGER chorus_truncate_end ON %s', rel);
    END IF;
    EXECUTE format('CREATE TRIGGER chorus_truncate %s TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_truncate(%L)',
                   CASE WHEN part OR kind = 'p' THEN 'BEFORE' ELSE 'AFTER' END, rel, name);
    IF kind = 'p' AND NOT part THEN
        EXECUTE format('CREATE TRIGGER chorus_truncate_end AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_truncate_end()', rel);
    END IF;
END
$$;

-- Tables adopted before TRUNCATE replicated get its trigger.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT c.tgrelid::regclass AS leaf,
                    coalesce(nullif(split_part(encode(c.tgargs, 'escape'), E'\\000', 3), ''),
                             (SELECT format('%I.%I', n.nspname, r.relname)
                                FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
                               WHERE r.oid = c.tgrelid)) AS name
               FROM pg_trigger c
              WHERE c.tgname = 'chorus_capture'
                AND NOT EXISTS (SELECT 1 FROM pg_trigger d
                                 WHERE d.tgrelid = c.tgrelid AND d.tgname = 'chorus_truncate') LOOP
        EXECUTE format('CREATE TRIGGER chorus_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_truncate(%L)', t.leaf, t.name);
    END LOOP;
    -- And partitioned tables adopted before their TRUNCATE replicated, on
    -- their root.
    FOR t IN SELECT r.tbl::regclass AS leaf, r.tbl AS name FROM chorus.replicated_table r
              WHERE to_regclass(r.tbl) IS NOT NULL
                AND (SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(r.tbl)) = 'p'
                AND NOT EXISTS (SELECT 1 FROM pg_trigger d
                                 WHERE d.tgrelid = to_regclass(r.tbl) AND d.tgname = 'chorus_truncate') LOOP
        EXECUTE format('CREATE TRIGGER chorus_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_truncate(%L)', t.leaf, t.name);
    END LOOP;
END
$$;

-- Triggers made before they were marked internal (see chorus.adopt).
UPDATE pg_trigger t SET tgisinternal = true
 WHERE t.tgname IN ('chorus_capture', 'chorus_truncate') AND NOT t.tgisinternal
   AND t.tgfoid IN ('chorus.capture()'::regprocedure, 'chorus.capture_truncate()'::regprocedure);

-- Partitioned tables whose TRUNCATE triggers ran AFTER the truncation
-- (before a partition's own TRUNCATE replicated): BEFORE now.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT g.tgrelid::regclass AS rel, split_part(encode(g.tgargs, 'escape'), E'\\000', 1) AS name
               FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
              WHERE g.tgname = 'chorus_truncate' AND (c.relispartition OR c.relkind = 'p')
                AND (g.tgtype & 2 = 0
                     OR (c.relkind = 'p' AND NOT c.relispartition
                         AND NOT EXISTS (SELECT 1 FROM pg_trigger e
                                          WHERE e.tgrelid = g.tgrelid AND e.tgname = 'chorus_truncate_end'))) LOOP
        PERFORM chorus.put_truncate_trigger(t.rel, t.name);
    END LOOP;
    UPDATE pg_trigger g SET tgisinternal = true
     WHERE g.tgname IN ('chorus_truncate', 'chorus_truncate_end') AND NOT g.tgisinternal;
END
$$;


-- Adopt an existing table: record its key and install the capture trigger.
-- A table without a primary key is refused unless adopted keyless.
-- A partitioned table replicates as one table: each leaf partition gets
-- the trigger, recording its rows under the root's name and key (so an
-- UPDATE that moves a row between partitions is a change of one row).
-- Adopting a partition adopts its root; a table that left the tree
-- (DETACH PARTITION) is adopted on its own.
-- (Its flag was named insert_only before; a parameter cannot be renamed
-- in place.)
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_proc p
                WHERE p.oid = to_regprocedure('chorus.adopt(regclass, boolean)')
                  AND 'insert_only' = ANY (p.proargnames)) THEN
        DROP FUNCTION chorus.adopt(regclass, boolean);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION chorus.adopt(rel regclass, keyless boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    name text;
    cols text[];
    kind "char";
    leaf regclass;
    gone regclass;
    leaves regclass[];
    prior_role text;
BEGIN
    IF (SELECT c.relispartition FROM pg_class c WHERE c.oid = rel) THEN
        rel := pg_partition_root(rel);
        keyless := NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = rel AND i.indisprimary);
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname), c.relkind INTO name, kind
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel;
    SELECT array_agg(a.attname::text ORDER BY k.ord) INTO cols
      FROM pg_index i
      CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary
       AND k.ord <= i.indnkeyatts;  -- the key, not its INCLUDE columns
    IF cols IS NULL AND NOT keyless THEN
        RAISE EXCEPTION 'table % has no primary key, so its updates and deletes cannot be replicated', name
            USING ERRCODE = '55000',
                  HINT = format('Add a primary key, or adopt it keyless (its rows matched by content): SELECT chorus.adopt(%L, keyless => true);', name);
    END IF;
    INSERT INTO chorus.replicated_table (tbl, pk_columns, keyless)
    VALUES (name, coalesce(cols, '{}'), keyless OR cols IS NULL)
    ON CONFLICT (tbl) DO UPDATE
        SET pk_columns = excluded.pk_columns, keyless = excluded.keyless;
    -- Rows already there get version 0 from origin 0, the same on every
    -- backend that holds them, so their first replicated update applies
    -- cleanly instead of looking like an update of a missing row. (Not in
    -- a copy of a backend, whose versions came with it: see
    -- cluster/rejoin.)
    IF cols IS NOT NULL AND current_setting('chorus.versions_copied', true) IS DISTINCT FROM 'on' THEN
        EXECUTE format('INSERT INTO chorus.row_version (tbl, pk, version, origin, deleted) '
                       'SELECT %L, chorus.key_of(to_jsonb(t.*), %L), 0, 0, false FROM %s t '
                       'ON CONFLICT (tbl, pk) DO NOTHING', name, cols, rel);
    END IF;
    IF kind = 'p' THEN
        SELECT coalesce(array_agg(t.relid), '{}') INTO leaves
          FROM pg_partition_tree(rel) t WHERE t.isleaf;
    ELSE
        leaves := ARRAY[rel];
    END IF;
    -- Chorus's own triggers are not DDL of the user's: the user's event
    -- triggers (enabled as they are by default, not ALWAYS) do not see
    -- them come and go, as on the peers, which apply as replicas.
    prior_role := current_setting('session_replication_role');
    IF prior_role <> 'replica' THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    FOREACH leaf IN ARRAY leaves LOOP
        -- A foreign table's rows are on its foreign server, not here.
        CONTINUE WHEN (SELECT c.relkind FROM pg_class c WHERE c.oid = leaf) = 'f';
        PERFORM chorus.put_capture_trigger(leaf, rel, cols, keyless OR cols IS NULL, name);
        PERFORM chorus.put_truncate_trigger(leaf, name);
    END LOOP;
    -- The root of a partitioned table records a TRUNCATE of the whole tree
    -- (see chorus.capture_truncate); a partitioned table attached inside
    -- the tree no longer does.
    IF kind = 'p' THEN
        FOR gone IN SELECT t.relid FROM pg_partition_tree(rel) t
                     WHERE NOT t.isleaf AND t.relid <> rel
                       AND EXISTS (SELECT 1 FROM pg_trigger g
                                    WHERE g.tgrelid = t.relid AND g.tgname = 'chorus_truncate') LOOP
            EXECUTE format('DROP TRIGGER chorus_truncate ON %s', gone);
            IF EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = gone AND g.tgname = 'chorus_truncate_end') THEN
                EXECUTE format('DROP TRIGGER chorus_truncate_end ON %s', gone);
            END IF;
        END LOOP;
        PERFORM chorus.put_truncate_trigger(rel, name);
    END IF;
    -- Chorus's triggers are marked internal (see
    -- chorus.put_capture_trigger).
    UPDATE pg_trigger t SET tgisinternal = true
     WHERE t.tgname IN ('chorus_capture', 'chorus_capture_inserts', 'chorus_capture_deletes',
                        'chorus_capture_updates', 'chorus_truncate', 'chorus_truncate_end') AND NOT t.tgisinternal
       AND (t.tgrelid = rel OR t.tgrelid = ANY (leaves));
    IF prior_role <> 'replica' THEN
        PERFORM set_config('session_replication_role', prior_role, true);
    END IF;
    -- Former partitions still recording under this name replicate as
    -- tables of their own now.
    FOR gone IN
        SELECT t.tgrelid::regclass FROM pg_trigger t
         WHERE t.tgname = 'chorus_capture' AND NOT (t.tgrelid::regclass = ANY (leaves))
           AND split_part(encode(t.tgargs, 'escape'), E'\\000', 3) = name
    LOOP
        PERFORM chorus.adopt(gone, NOT EXISTS (SELECT 1 FROM pg_index i
                                                WHERE i.indrelid = gone AND i.indisprimary));
    END LOOP;
    RETURN name;
END
$$;
