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

-- The version of this schema (see capture.rs, SCHEMA_VERSION, and
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
-- before each write (see proxy/src/stamp.rs); a write made directly on the
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
        -- The name changes are recorded under is this table's (or, for a
        -- partition, its root's): no trigger can record changes of another.
        IF rel <> format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME)
           AND rel IS DISTINCT FROM (SELECT format('%I.%I', n.nspname, c.relname)
                                       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                      WHERE c.oid = pg_partition_root(TG_RELID)) THEN
            RAISE EXCEPTION 'trigger % on % records changes of another table (%)', TG_NAME, TG_RELID::regclass, rel
                USING ERRCODE = '42501';
        END IF;
    ELSE
        rel := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
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
    -- chorus.text_columns), from the type's output function (format's %s:
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
        PERFORM pg_logical_emit_message(true, 'chorus:' || ddl_seq, (jsonb_build_object(
            'table', rel, 'op', ops[i], 'key', key, 'row', imgs[i],
            'version', ver, 'prev', prev, 'origin', origin)
            || CASE WHEN key IS NULL AND old_img IS NOT NULL THEN jsonb_build_object('old', old_img)
                    ELSE '{}' END)::text);
    END LOOP;
    RETURN NULL;
END
$$;

-- The TRUNCATE trigger (AFTER, FOR EACH STATEMENT) on every adopted table.
-- A TRUNCATE replicates as a record with the table and a version newer
-- than every row it removed here; every backend then removes the rows it
-- holds with older versions, and keeps the table's marker (a version row
-- with key '{}'): a change older than the TRUNCATE that arrives later is
-- skipped, and a write after it gets a newer version. So a row inserted
-- concurrently through another node survives everywhere exactly when its
-- version is newer than the TRUNCATE's (last writer wins, as for rows).
-- A partitioned table replicates a TRUNCATE of the whole tree: its root's
-- trigger fires first (PostgreSQL fires the AFTER TRUNCATE triggers of a
-- statement in the order of its tables: the root, then its partitions)
-- and records it under the root's name, as the rows are; the partitions'
-- triggers of the same statement then stay quiet. A TRUNCATE of single
-- partitions is refused (their rows are recorded under the root's name,
-- so a later change could not be told to be older than it or not).
CREATE OR REPLACE FUNCTION chorus.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel text := TG_ARGV[0];
    txn_hlc bigint;
    origin integer;
    ddl_seq bigint;
    ver bigint;
    tree jsonb;
BEGIN
    IF current_setting('chorus.applying', true) = 'on' AND current_setting('is_superuser') = 'on' THEN
        RETURN NULL;
    END IF;
    -- A partitioned table inside a tree (made on its own, then attached):
    -- its leaves speak for it.
    IF (SELECT c.relkind = 'p' AND c.relispartition FROM pg_class c WHERE c.oid = TG_RELID) THEN
        RETURN NULL;
    END IF;
    IF rel <> format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME) THEN
        -- A partition: quiet when its root's TRUNCATE was just recorded.
        tree := nullif(current_setting('chorus.truncating_tree', true), '')::jsonb;
        IF tree ->> 'root' = rel AND (tree ->> 'left')::integer > 0 THEN
            PERFORM set_config('chorus.truncating_tree', jsonb_set(tree, '{left}',
                               to_jsonb((tree ->> 'left')::integer - 1))::text, true);
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'TRUNCATE of a partition cannot be replicated'
            USING ERRCODE = '0A000',
                  HINT = format('Truncate the whole table %s, or use DELETE FROM %s.', rel, TG_RELID::regclass);
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = TG_RELID) = 'p' THEN
        PERFORM set_config('chorus.truncating_tree', jsonb_build_object(
            'root', rel,
            'left', (SELECT count(*) FROM pg_partition_tree(TG_RELID) p
                       JOIN pg_trigger t ON t.tgrelid = p.relid AND t.tgname = 'chorus_truncate'
                      WHERE p.isleaf))::text, true);
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

-- (Re)make the TRUNCATE trigger of `rel` (a table, a leaf partition or a
-- partitioned root), recording under `name`.
CREATE OR REPLACE FUNCTION chorus.put_truncate_trigger(rel regclass, name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'chorus_truncate') THEN
        EXECUTE format('DROP TRIGGER chorus_truncate ON %s', rel);
    END IF;
    EXECUTE format('CREATE TRIGGER chorus_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_truncate(%L)', rel, name);
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
-- The columns of `rel` that a row image carries as text, from their
-- type's output function, because to_jsonb cannot carry them exactly:
-- `always`, a type (or array element type) with a cast to json or jsonb,
-- which to_jsonb would use and its input function cannot read back;
-- `arrays`, arrays (not of `keys`, which are compared as to_jsonb gives
-- them), whose bounds JSON loses ('[0:1]={1,2}' would arrive as '{1,2}').
CREATE OR REPLACE FUNCTION chorus.text_columns(rel regclass, keys text[], OUT always text[], OUT arrays text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE j.cast_to_json), '{}'),
           coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                    FILTER (WHERE NOT j.cast_to_json AND t.typcategory = 'A'
                              AND NOT a.attname::text = ANY (coalesce(keys, '{}'))), '{}')
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     CROSS JOIN LATERAL (SELECT t.oid NOT IN ('json'::regtype, 'jsonb'::regtype)
                                AND EXISTS (SELECT 1 FROM pg_cast c
                                             WHERE c.castsource IN (t.oid, t.typelem, t.typbasetype)
                                               AND c.castsource NOT IN (0, 'json'::regtype, 'jsonb'::regtype)
                                               AND c.casttarget IN ('json'::regtype, 'jsonb'::regtype))
                         AS cast_to_json) j
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- A row image in SQL, for set-based statements over `rel` (aliased
-- `alias`): what the capture trigger makes of a row (to_jsonb, with
-- chorus.text_columns in their text form).
CREATE OR REPLACE FUNCTION chorus.image_sql(rel regclass, keys text[], alias text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('to_jsonb(%I.*)', alias)
           || coalesce(' || jsonb_build_object('
                       || (SELECT string_agg(format('%L, CASE WHEN %I.%I IS NULL THEN NULL ELSE format(''%%s'', %I.%I) END',
                                                    col, alias, col, alias, col), ', ')
                             FROM unnest(c.always || c.arrays) AS col)
                       || ')', '')
      FROM chorus.text_columns(rel, keys) c
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
    textual text[];
    arrays text[];
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
    -- cleanly instead of looking like an update of a missing row.
    IF cols IS NOT NULL THEN
        EXECUTE format('INSERT INTO chorus.row_version (tbl, pk, version, origin, deleted) '
                       'SELECT %L, chorus.key_of(to_jsonb(t.*), %L), 0, 0, false FROM %s t '
                       'ON CONFLICT (tbl, pk) DO NOTHING', name, cols, rel);
    END IF;
    SELECT c.always, c.arrays INTO textual, arrays FROM chorus.text_columns(rel, cols) c;
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
        IF EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = leaf AND tgname = 'chorus_capture') THEN
            EXECUTE format('DROP TRIGGER chorus_capture ON %s', leaf);
        END IF;
        EXECUTE format('CREATE TRIGGER chorus_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION chorus.capture(%L, %L, %L, %L, %L)',
                       leaf, coalesce(cols, '{}')::text, (keyless OR cols IS NULL)::text, name,
                       textual::text, arrays::text);
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
        END LOOP;
        PERFORM chorus.put_truncate_trigger(rel, name);
    END IF;
    -- Chorus's triggers are marked internal, as PostgreSQL marks the
    -- triggers of a foreign key: psql's \d and pg_dump leave them out (the
    -- table looks as it would on one PostgreSQL), and only a superuser can
    -- disable them (ALTER TABLE … DISABLE TRIGGER USER passes them by), so
    -- a table's owner cannot quietly stop its replication.
    UPDATE pg_trigger t SET tgisinternal = true
     WHERE t.tgname IN ('chorus_capture', 'chorus_truncate') AND NOT t.tgisinternal
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

-- Global sequences. Both kinds are native PostgreSQL sequences, set up
-- per backend so that no two backends can hand out the same value:
-- nextval(), currval(), DEFAULT nextval(...), serial and identity columns
-- work unchanged.
--   snowflake (bigint): INCREMENT BY 1024 from a value whose low 10 bits
--     are this backend's sequence id, so every value carries it: a value is
--     (milliseconds since 2024-01-01 << 22) | (counter << 10) | id. More
--     than 4096 values in a millisecond carry into the time bits (they
--     borrow from the next millisecond); the node moves a sequence that
--     fell behind the clock forward (chorus.snowflake_catch_up), never back.
--   galloc (int, smallint, or bigint on request): MINVALUE/MAXVALUE limit
--     the sequence to a range of values allocated to this backend through
--     the cluster's Raft log; the node fetches the next range ahead of need
--     and switches to it (chorus.galloc_switch).
CREATE TABLE IF NOT EXISTS chorus.global_sequence (
    seq text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('snowflake', 'galloc')),
    -- galloc: the range values come from now, the one fetched ahead, and
    -- the range size.
    range_lo bigint,
    range_hi bigint,
    next_lo bigint,
    next_hi bigint,
    block bigint,
    -- galloc: where the first range from the Raft log may start.
    floor bigint
);

-- The first snowflake value of this millisecond for sequence id `node`.
CREATE OR REPLACE FUNCTION chorus.snowflake_now(node integer) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT ((floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1704067200000) << 22) | node
$$;

-- Make a sequence global: `kind` for a bigint sequence (others are always
-- galloc), this backend's sequence id `node`, galloc range size `block`
-- (capped at 1/128 of the type's range). Backends with ids up to 64 start
-- with a block of their own; the ranges the Raft log allocates start above
-- the 64 initial blocks.
CREATE OR REPLACE FUNCTION chorus.make_global(seq regclass, kind text, node integer, block bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    step bigint;
    name text;
    typ text;
    maxv bigint;
    lo bigint;
    hi bigint;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname), s.seqtypid::regtype::text, s.seqmax, s.seqincrement
      INTO name, typ, maxv, step
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_sequence s ON s.seqrelid = c.oid
     WHERE c.oid = seq;
    -- Global values are handed out upwards (by time, or from ranges).
    IF step < 0 THEN
        RAISE EXCEPTION 'a descending sequence cannot be replicated: the cluster''s sequences hand out values upwards, per node'
            USING ERRCODE = '0A000',
                  HINT = 'Create it with a positive INCREMENT, or SET chorus.ddl_scope = ''local'' to keep it on this node''s backend only.';
    END IF;
    PERFORM set_config('chorus.making_global', 'on', true);
    IF kind = 'snowflake' AND typ = 'bigint' THEN
        EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1024 MINVALUE 1 MAXVALUE 9223372036854775807 NO CYCLE START WITH 1 RESTART WITH %s',
                       seq, chorus.snowflake_now(node));
        INSERT INTO chorus.global_sequence (seq, kind) VALUES (name, 'snowflake')
        ON CONFLICT ON CONSTRAINT global_sequence_pkey DO UPDATE SET kind = 'snowflake', range_lo = NULL, range_hi = NULL,
                                        next_lo = NULL, next_hi = NULL, block = NULL;
    ELSE
        block := greatest(1, least(block, maxv / 128));
        IF node BETWEEN 1 AND 64 THEN
            lo := (node - 1) * block + 1;
            hi := node * block;
            EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1 MINVALUE %s MAXVALUE %s NO CYCLE START WITH %s RESTART WITH %s',
                           seq, lo, hi, lo, lo);
        ELSE
            -- No initial block: closed (its next nextval fails) until the
            -- node has a range from the Raft log.
            EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1 MINVALUE 1 MAXVALUE %s NO CYCLE START WITH 1', seq, maxv);
            PERFORM setval(seq, maxv, true);
        END IF;
        INSERT INTO chorus.global_sequence (seq, kind, range_lo, range_hi, block, floor)
        VALUES (name, 'galloc', lo, hi, block, 64 * block + 1)
        ON CONFLICT ON CONSTRAINT global_sequence_pkey DO UPDATE SET kind = 'galloc', range_lo = lo, range_hi = hi,
                                        next_lo = NULL, next_hi = NULL, block = excluded.block,
                                        floor = excluded.floor;
    END IF;
    PERFORM set_config('chorus.making_global', 'off', true);
END
$$;

-- Move snowflake sequences that fell more than a second behind the clock
-- forward to now (never back: a clock that steps back only slows the time
-- bits). A second of margin keeps a concurrent nextval from overtaking
-- the new value between the check and setval (that would take four million
-- values in the meantime). Returns how many moved.
CREATE OR REPLACE FUNCTION chorus.snowflake_catch_up(node integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    g record;
    last bigint;
    now_value bigint;
    moved integer := 0;
BEGIN
    FOR g IN SELECT seq FROM chorus.global_sequence WHERE kind = 'snowflake' LOOP
        CONTINUE WHEN to_regclass(g.seq) IS NULL;
        EXECUTE format('SELECT last_value FROM %s', g.seq) INTO last;
        now_value := chorus.snowflake_now(node);
        IF last < now_value - (1000::bigint << 22) THEN
            PERFORM setval(g.seq, now_value, false);
            moved := moved + 1;
        END IF;
    END LOOP;
    RETURN moved;
END
$$;

-- Switch a galloc sequence to the range fetched ahead.
CREATE OR REPLACE FUNCTION chorus.galloc_switch(name text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    g chorus.global_sequence%ROWTYPE;
BEGIN
    SELECT * INTO g FROM chorus.global_sequence WHERE seq = name FOR UPDATE;
    IF g.next_lo IS NULL THEN
        RETURN;
    END IF;
    PERFORM set_config('chorus.making_global', 'on', true);
    EXECUTE format('ALTER SEQUENCE %s MINVALUE %s MAXVALUE %s START WITH %s RESTART WITH %s',
                   name, g.next_lo, g.next_hi, g.next_lo, g.next_lo);
    UPDATE chorus.global_sequence
       SET range_lo = g.next_lo, range_hi = g.next_hi, next_lo = NULL, next_hi = NULL
     WHERE seq = name;
END
$$;

-- Convert an existing (local) sequence: values it may already have handed
-- out stay below every value it hands out from now on. A galloc sequence
-- starts closed, its first range from the Raft log above them.
CREATE OR REPLACE FUNCTION chorus.convert_sequence(target regclass, wanted text, block_size bigint)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    node integer := (SELECT l.sequence_id FROM chorus.local l);
    qualified text;
    last bigint;
BEGIN
    IF node IS NULL THEN
        RAISE EXCEPTION 'this backend''s node has no sequence id yet' USING ERRCODE = '55000';
    END IF;
    EXECUTE format('SELECT last_value FROM %s', target) INTO last;
    IF wanted = 'snowflake' AND (SELECT s.seqtypid FROM pg_sequence s WHERE s.seqrelid = target) = 'bigint'::regtype THEN
        -- Snowflake values (the time bits) are far above what it handed out.
        PERFORM chorus.make_global(target, 'snowflake', node, block_size);
    ELSE
        -- No initial block (it could hold values already used): closed
        -- until the node fetches a range above `last`.
        PERFORM chorus.make_global(target, 'galloc', 0, block_size);
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO qualified
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    UPDATE chorus.global_sequence g SET floor = greatest(g.floor, last + 1) WHERE g.seq = qualified;
    RETURN qualified;
END
$$;

-- Where each global sequence stands (last values read without a
-- transaction, as nextval sees them).
CREATE OR REPLACE FUNCTION chorus.sequence_status()
RETURNS TABLE (seq text, kind text, last_value bigint, block bigint, floor bigint,
               left_in_range bigint, has_next boolean)
LANGUAGE plpgsql AS $$
DECLARE
    g record;
    called boolean;
BEGIN
    FOR g IN SELECT * FROM chorus.global_sequence LOOP
        CONTINUE WHEN to_regclass(g.seq) IS NULL;
        EXECUTE format('SELECT last_value, is_called FROM %s', g.seq) INTO last_value, called;
        seq := g.seq;
        kind := g.kind;
        block := g.block;
        floor := g.floor;
        left_in_range := CASE WHEN g.kind <> 'galloc' OR g.range_hi IS NULL THEN 0
                              ELSE greatest(0, g.range_hi - last_value + CASE WHEN called THEN 0 ELSE 1 END) END;
        has_next := g.next_lo IS NOT NULL;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The session settings a DDL statement's meaning depends on, beyond its
-- search_path and role: where its objects go (default_tablespace, the
-- access method, TOAST compression), whether function bodies are checked,
-- how its literals read (standard_conforming_strings, DateStyle,
-- IntervalStyle, TimeZone), and whether an empty tablespace location is
-- allowed. They travel with the statement, and every backend applies it
-- under them (chorus.use_settings).
CREATE OR REPLACE FUNCTION chorus.ddl_settings() RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'default_tablespace', current_setting('default_tablespace'),
        'default_table_access_method', current_setting('default_table_access_method'),
        'default_toast_compression', current_setting('default_toast_compression'),
        'check_function_bodies', current_setting('check_function_bodies'),
        'standard_conforming_strings', current_setting('standard_conforming_strings'),
        'DateStyle', current_setting('DateStyle'),
        'IntervalStyle', current_setting('IntervalStyle'),
        'TimeZone', current_setting('TimeZone'),
        'allow_in_place_tablespaces', current_setting('allow_in_place_tablespaces'),
        'password_encryption', current_setting('password_encryption'))
$$;

-- Set these settings (see chorus.ddl_settings) for the transaction (or,
-- `local` false, the session); returns their values before, to set back.
CREATE OR REPLACE FUNCTION chorus.use_settings(settings jsonb, local boolean DEFAULT true) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    item record;
    before jsonb := '{}';
BEGIN
    FOR item IN SELECT * FROM jsonb_each_text(coalesce(settings, '{}')) LOOP
        before := before || jsonb_build_object(item.key, current_setting(item.key));
        PERFORM set_config(item.key, item.value, local);
    END LOOP;
    RETURN before;
END
$$;

-- The first word of a statement, upper-cased (white space, comments and
-- opening parentheses before it skipped).
CREATE OR REPLACE FUNCTION chorus.first_word(statement text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(substring(statement FROM E'^(?:\\s|--[^\\n]*(?:\\n|$)|/\\*(?:[^*]|\\*+[^*/])*\\*+/|\\()*([A-Za-z]+)'))
$$;

-- The text of the DDL statement this event trigger fires for, as the
-- client sent it, or NULL when Chorus did not see it (DDL run from a
-- function or a DO block). For a simple query the proxy stages, with its
-- stamp, the query's bytes (hex) and where its DDL statements are in them
-- (`chorus.ddl_stage`); statements are taken from it in order. Otherwise
-- (extended protocol) the query is one statement: it is the DDL when its
-- first word is the command's.
CREATE OR REPLACE FUNCTION chorus.ddl_statement(tag text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    q text := current_query();
    stage jsonb := nullif(current_setting('chorus.ddl_stage', true), '')::jsonb;
    raw bytea;
    pos integer;
    range jsonb;
    first_word text;
    statement text;
BEGIN
    IF stage IS NOT NULL THEN
        raw := decode(stage ->> 'q', 'hex');
        IF convert_from(raw, pg_client_encoding()) = q THEN
            pos := coalesce(nullif(current_setting('chorus.ddl_stage_pos', true), '')::integer, 0);
            range := stage -> 'ddl' -> pos;
            IF range IS NULL THEN
                RETURN NULL;
            END IF;
            PERFORM set_config('chorus.ddl_stage_pos', (pos + 1)::text, false);
            statement := convert_from(substring(raw FROM (range ->> 0)::integer + 1 FOR (range ->> 1)::integer),
                                      pg_client_encoding());
            -- A statement out of step with the staged list (one the proxy
            -- did not count as DDL) is not taken for another.
            IF chorus.first_word(statement) = split_part(tag, ' ', 1) THEN
                RETURN statement;
            END IF;
            RETURN NULL;
        END IF;
    END IF;
    first_word := chorus.first_word(q);
    IF first_word IS NOT NULL AND first_word = split_part(tag, ' ', 1) THEN
        RETURN q;
    END IF;
    RETURN NULL;
END
$$;

-- Whether `q` is one statement: no `;` but at its end, reading literals,
-- quoted names, dollar quotes and comments as PostgreSQL's lexer does. (A
-- function body in `BEGIN ATOMIC … END` counts as several.) It walks the
-- bytes once: DDL run from a function can be long (a CREATE FUNCTION).
CREATE OR REPLACE FUNCTION chorus.single_statement(q text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b bytea := convert_to(q, 'UTF8');
    n integer := length(b);
    i integer := 0;
    c integer;
    e integer;
    depth integer;
    quote bytea;
    escapes boolean;
    ended boolean := false;
BEGIN
    WHILE i < n LOOP
        c := get_byte(b, i);
        IF c IN (9, 10, 11, 12, 13, 32) THEN
            i := i + 1;
        ELSIF c = 45 AND i + 1 < n AND get_byte(b, i + 1) = 45 THEN
            -- -- to the end of the line
            e := position('\x0a'::bytea IN substring(b FROM i + 1));
            i := CASE WHEN e = 0 THEN n ELSE i + e END;
        ELSIF c = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN
            -- /* … */, nested
            depth := 1;
            i := i + 2;
            WHILE i < n AND depth > 0 LOOP
                IF get_byte(b, i) = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF get_byte(b, i) = 42 AND i + 1 < n AND get_byte(b, i + 1) = 47 THEN
                    depth := depth - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF ended THEN
            -- Something after a `;`.
            RETURN false;
        ELSIF c = 59 THEN
            ended := true;
            i := i + 1;
        ELSIF c IN (39, 34) THEN
            -- '…' (E'…' with backslash escapes) or "…", a doubled quote
            -- inside
            escapes := c = 39
                       AND ((i > 0 AND get_byte(b, i - 1) IN (69, 101)
                             AND (i = 1 OR NOT (get_byte(b, i - 2) >= 128
                                                OR chr(get_byte(b, i - 2)) ~ '[A-Za-z0-9_$]')))
                            OR current_setting('standard_conforming_strings') = 'off');
            i := i + 1;
            LOOP
                EXIT WHEN i >= n;
                IF escapes AND get_byte(b, i) = 92 THEN
                    i := i + 2;
                ELSIF get_byte(b, i) = c THEN
                    i := i + 1;
                    EXIT WHEN i >= n OR get_byte(b, i) <> c;
                    i := i + 1;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF c = 36 AND NOT (i > 0 AND (chr(get_byte(b, i - 1)) ~ '[A-Za-z0-9_$]' OR get_byte(b, i - 1) >= 128)) THEN
            -- $tag$ … $tag$ (a `$` not inside a name; $1 is a parameter)
            e := i + 1;
            WHILE e < n AND (chr(get_byte(b, e)) ~ '[A-Za-z_]' OR get_byte(b, e) >= 128
                             OR (e > i + 1 AND chr(get_byte(b, e)) ~ '[0-9]')) LOOP
                e := e + 1;
            END LOOP;
            IF e < n AND get_byte(b, e) = 36 THEN
                quote := substring(b FROM i + 1 FOR e - i + 1);
                depth := position(quote IN substring(b FROM e + 2));
                i := CASE WHEN depth = 0 THEN n ELSE e + depth + length(quote) END;
            ELSE
                i := i + 1;
            END IF;
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- Where the DDL statement this event trigger fires for comes from. A
-- statement the client sent has no frame below this trigger's own in
-- PostgreSQL's context stack (GET DIAGNOSTICS … PG_CONTEXT); one that a
-- function or a DO block ran has the frames of its callers: for PL/pgSQL's
-- SQL statements and EXECUTE (and any SPI query), `SQL statement "<its
-- text>"` first. (An SQL-language function's statement shows as `SQL
-- function "f" statement N`, without its text: `statement` is NULL.)
-- `definer` is the owner of the innermost SECURITY DEFINER function among
-- the callers, the role the statement ran as; `unsure` names a caller that
-- may be SECURITY DEFINER but could not be told apart from others of its
-- name.
CREATE OR REPLACE FUNCTION chorus.nested_ddl(user_path text, OUT nested boolean, OUT statement text,
                                             OUT definer text, OUT unsure text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stack text;
    marker text := E'\nPL/pgSQL function chorus.capture_ddl() line ';
    at integer;
    line text;
    signature text;
    name text;
    fn regprocedure;
BEGIN
    nested := false;
    GET DIAGNOSTICS stack = PG_CONTEXT;
    at := position(marker IN stack);
    IF at = 0 THEN
        RETURN;
    END IF;
    stack := substr(stack, at + length(marker));
    at := position(E'\n' IN stack);
    IF at = 0 THEN
        RETURN;
    END IF;
    stack := substr(stack, at + 1);
    nested := true;
    -- The text ends at the first quote followed by a caller's frame (or
    -- at the last quote, when no frame follows: a C function's SPI).
    statement := substring(stack FROM E'^SQL statement "(.*?)"\\n(?:PL/[^\\n]* function |SQL function ")');
    IF statement IS NULL THEN
        statement := substring(stack FROM E'^SQL statement "(.*)"$');
    END IF;
    FOR line IN SELECT l.l FROM regexp_split_to_table(stack, E'\n') WITH ORDINALITY AS l(l, n) ORDER BY l.n LOOP
        IF line ~ '^PL/pgSQL function .* line [0-9]+ at ' THEN
            signature := substring(line FROM '^PL/pgSQL function (.*) line [0-9]+ at ');
            CONTINUE WHEN signature = 'inline_code_block';
            -- (Printed as the function's path showed it when compiled.)
            PERFORM set_config('search_path', user_path, true);
            fn := to_regprocedure(signature);
            PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
            name := regexp_replace(regexp_replace(signature, E'\\(.*$', ''), E'^.*\\.', '');
        ELSIF line ~ '^(SQL|PL/[A-Za-z]+) function "' THEN
            fn := NULL;
            name := substring(line FROM '^(?:SQL|PL/[A-Za-z]+) function "(.*?)"');
        ELSE
            CONTINUE;
        END IF;
        IF fn IS NOT NULL THEN
            IF (SELECT p.prosecdef FROM pg_proc p WHERE p.oid = fn) THEN
                SELECT pg_get_userbyid(p.proowner)::text INTO definer FROM pg_proc p WHERE p.oid = fn;
                RETURN;
            END IF;
        ELSIF EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = btrim(name, '"') AND p.prosecdef) THEN
            unsure := name;
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- What a CREATE TABLE AS or SELECT INTO made, as a plain CREATE TABLE:
-- peers make the table from it and get the rows as changes, so the query
-- is never evaluated again elsewhere.
-- (Its access method, storage parameters and tablespace as well.)
CREATE OR REPLACE FUNCTION chorus.table_definition(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('CREATE %sTABLE %I.%I (%s) USING %I%s%s',
                  CASE c.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END,
                  n.nspname, c.relname,
                  (SELECT string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                                            CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
                                                 THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END),
                                     ', ' ORDER BY a.attnum)
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
                  (SELECT am.amname FROM pg_am am WHERE am.oid = c.relam),
                  (SELECT ' WITH (' || array_to_string(c.reloptions, ', ') || ')' WHERE c.reloptions IS NOT NULL),
                  (SELECT format(' TABLESPACE %I', t.spcname) FROM pg_tablespace t WHERE t.oid = c.reltablespace))
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel
$$;

-- ALTER TABLE that rewrites a table (a volatile default, a USING
-- expression, …) computes new values, which each backend would compute
-- anew. The origin notes the tables it rewrote (table_rewrite fires once
-- per rewritten table), and chorus.capture_ddl then sends their rows, as
-- updates, after the DDL: every backend ends with the origin's values.
CREATE OR REPLACE FUNCTION chorus.note_rewrite() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (coalesce(current_setting('chorus.applying', true), '') = 'on' AND chorus.trusted_session())
       AND coalesce(current_setting('chorus.ddl_scope', true), '') <> 'local'
       AND coalesce(current_setting('chorus.origin', true), '') <> '' THEN
        PERFORM set_config('chorus.rewritten',
                           concat_ws(',', nullif(current_setting('chorus.rewritten', true), ''),
                                     pg_event_trigger_table_rewrite_oid()::text), true);
    END IF;
END
$$;

DROP EVENT TRIGGER IF EXISTS chorus_rewrite;
CREATE EVENT TRIGGER chorus_rewrite ON table_rewrite EXECUTE FUNCTION chorus.note_rewrite();
-- (ALWAYS: also in the apply's sessions, which run with
-- session_replication_role = replica, see chorus.apply_begin.)
ALTER EVENT TRIGGER chorus_rewrite ENABLE ALWAYS;

-- Send every row of `rel` (a replicated table, or a leaf partition of one;
-- not those of the tables inheriting from it, which are sent for
-- themselves) as an update made by this transaction: versions bumped as the capture
-- trigger bumps them, one message per row, set-based.
CREATE OR REPLACE FUNCTION chorus.emit_rows(rel regclass, txn_hlc bigint, origin integer, prefix text)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    root regclass := rel;
    name text;
    cols text[];
    is_keyless boolean;
    sent bigint;
    ver bigint;
BEGIN
    IF (SELECT c.relispartition FROM pg_class c WHERE c.oid = rel) THEN
        root := pg_partition_root(rel);
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = root;
    SELECT t.pk_columns, t.keyless INTO cols, is_keyless
      FROM chorus.replicated_table t WHERE t.tbl = name;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF is_keyless AND root <> rel THEN
        RAISE EXCEPTION 'ALTER TABLE that computes new values for the rows of % cannot be replicated: it is partitioned and has no primary key', name
            USING ERRCODE = '0A000',
                  HINT = 'Add a primary key first, or compute the values with an UPDATE after a plain ALTER TABLE.';
    END IF;
    IF is_keyless THEN
        -- No key to send the rows as updates by: the table's rows are
        -- replaced, as a TRUNCATE (see chorus.capture_truncate) and the
        -- rows inserted after it.
        SELECT greatest(txn_hlc, max(v.version) + 1) INTO ver FROM chorus.row_version v WHERE v.tbl = name;
        DELETE FROM chorus.row_version v WHERE v.tbl = name;
        INSERT INTO chorus.row_version (tbl, pk, version, origin, deleted) VALUES (name, '{}', ver, origin, true);
        PERFORM pg_logical_emit_message(true, prefix, jsonb_build_object(
            'truncate', name, 'version', ver, 'origin', origin)::text);
        EXECUTE format('SELECT count(pg_logical_emit_message(true, $1, jsonb_build_object('
                       '''table'', $2, ''op'', ''INSERT'', ''key'', NULL, ''row'', %s, '
                       '''version'', $3, ''prev'', NULL, ''origin'', $4)::text)) FROM ONLY %s t',
                       chorus.image_sql(rel, '{}', 't'), rel)
            INTO sent
            USING prefix, name, ver + 1, origin;
        RETURN sent;
    END IF;
    EXECUTE format(
        'WITH img AS (SELECT %s AS img FROM ONLY %s t), '
        '     old AS (SELECT i.img, chorus.key_of(i.img, $1) AS key, v.version AS prev '
        '               FROM img i LEFT JOIN chorus.row_version v '
        '                 ON v.tbl = $2 AND v.pk = chorus.key_of(i.img, $1)), '
        '     up AS (INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted) '
        '            SELECT $2, o.key, greatest($3, coalesce(o.prev, 0) + 1), $4, false FROM old o '
        '            ON CONFLICT (tbl, pk) DO UPDATE SET version = excluded.version, '
        '                origin = excluded.origin, deleted = false '
        '            RETURNING v.pk, v.version) '
        'SELECT count(pg_logical_emit_message(true, $5, jsonb_build_object(''table'', $2, ''op'', ''UPDATE'', '
        '       ''key'', o.key, ''row'', o.img, ''version'', u.version, ''prev'', o.prev, ''origin'', $4)::text)) '
        '  FROM old o JOIN up u ON u.pk = o.key', chorus.image_sql(rel, cols, 't'), rel)
        INTO sent
        USING cols, name, txn_hlc, origin, prefix;
    RETURN sent;
END
$$;

-- At the end of every DDL command:
-- 1. DDL sent through Chorus (a proxied session, `chorus.origin` set, not
--    applying remote changes, `chorus.ddl_scope` not local) is put in its
--    transaction's own change stream: a transactional logical message with
--    the statement, search_path, role and the number of the cluster DDL
--    lease the proxy took for the transaction (`chorus.ddl_seq`), and a
--    row in chorus.ddl_history under that number. Peers apply it at its
--    place among the transaction's changes, and only if it commits (see
--    chorus.apply_stream_ddl). DDL the proxy did not see (from a function
--    or a DO block) is refused rather than left on one backend.
-- 2. Tables created or altered are adopted (or re-adopted, when they gained
--    a primary key) in the same transaction, on every backend. Not adopted:
--    temporary tables, Chorus's own, extension members, and tables made
--    with `SET chorus.ddl_scope = 'local'` (they exist on one backend only;
--    `chorus adopt` adopts them).
-- 3. Sequences made by replicated DDL (CREATE SEQUENCE, serial and identity
--    columns) become global, with this backend's sequence id.
-- 4. The rows of a CREATE TABLE AS / SELECT INTO travel as changes after a
--    plain CREATE TABLE (see chorus.table_definition), and the rows of a
--    table the statement rewrote as updates (see chorus.note_rewrite).
--
-- It runs as the owner of the chorus schema, with a pinned search_path
-- (chorus.capture_ddl passes the session's); the DDL's role is the one
-- that ran it (chorus.invoker).
CREATE OR REPLACE FUNCTION chorus.handle_ddl(tg_tag text, user_path text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    role_name text := chorus.invoker();
    unreadable text;
    cmd record;
    replicate boolean;
    lease bigint;
    statement text;
    ordinary boolean := false;
    made regclass;
    made_name text;
    pinned text;
    txn_hlc bigint;
    origin integer;
    dep bigint;
    kind text;
    block text;
    kept text := coalesce(current_setting('chorus.drop_kept', true), '');
    caller record;
    prior_role text;
    depth integer := coalesce(nullif(current_setting('chorus.ddl_depth', true), ''), '1')::integer;
BEGIN
    -- A statement that another DDL statement ran comes with that one,
    -- which every backend runs itself (see chorus.note_ddl_start).
    PERFORM set_config('chorus.ddl_depth', greatest(depth - 1, 0)::text, true);
    IF depth > 1 THEN
        RETURN;
    END IF;
    -- (What the statement's sql_drop noted is for this statement only.)
    IF kept <> '' THEN
        PERFORM set_config('chorus.drop_kept', '', true);
    END IF;
    -- Chorus's own DDL inside this trigger (adopting a table) belongs to
    -- the statement being handled.
    IF current_setting('chorus.in_ddl_trigger', true) = 'on' THEN
        RETURN;
    END IF;
    -- A statement of the DDL log's kind that fires event triggers (ALTER
    -- SUBSCRIPTION) inside a transaction block: its stamp recorded it
    -- (chorus.handle_log_statement).
    IF coalesce(current_setting('chorus.ddl_stage_pos', true), '') = 'logged' THEN
        IF convert_from(decode(current_setting('chorus.ddl_stage', true)::jsonb ->> 'q', 'hex'),
                        pg_client_encoding()) = current_query() THEN
            RETURN;
        END IF;
    END IF;
    -- The client's statement, taken now whether or not it replicates: the
    -- staged statements of a query string are taken in order, one for
    -- each statement that fires this trigger. A statement that a function
    -- or DO block ran is its own text (one statement, of the command's
    -- kind), as the role it ran as.
    caller := chorus.nested_ddl(user_path);
    IF caller.nested THEN
        IF chorus.first_word(caller.statement) = split_part(tg_tag, ' ', 1)
           AND chorus.single_statement(caller.statement) THEN
            statement := caller.statement;
        END IF;
        role_name := coalesce(caller.definer, role_name);
    ELSE
        statement := chorus.ddl_statement(tg_tag);
    END IF;
    -- A cast to json or jsonb is what to_jsonb runs of a type's owner
    -- inside capture (which runs as the chorus schema's owner).
    IF tg_tag = 'CREATE CAST'
       AND NOT coalesce((SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = role_name), false)
       AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                     JOIN pg_cast c ON c.oid = d.objid
                     LEFT JOIN pg_proc f ON f.oid = c.castfunc
                     LEFT JOIN pg_language l ON l.oid = f.prolang
                    WHERE c.casttarget IN ('json'::regtype, 'jsonb'::regtype)
                      AND c.castfunc <> 0 AND l.lanname NOT IN ('c', 'internal')) THEN
        RAISE EXCEPTION 'a cast to json or jsonb written in SQL or PL/pgSQL cannot be created under Chorus'
            USING ERRCODE = '0A000',
                  HINT = 'Chorus captures rows with to_jsonb, which would run the cast''s function with Chorus''s privileges; convert explicitly in queries instead, or ask a superuser to create the cast.';
    END IF;
    replicate := NOT (coalesce(current_setting('chorus.applying', true), '') = 'on' AND chorus.trusted_session())
             AND coalesce(current_setting('chorus.ddl_scope', true), '') <> 'local'
             AND coalesce(current_setting('chorus.origin', true), '') <> '';
    -- Only temporary objects and extension members: nothing to replicate
    -- (an extension's objects come with its CREATE EXTENSION).
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        IF NOT cmd.in_extension AND coalesce(cmd.schema_name, '') NOT LIKE 'pg_temp%' THEN
            ordinary := true;
        END IF;
    END LOOP;
    IF NOT ordinary AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()) THEN
        replicate := false;
    END IF;
    -- A DROP of temporary objects only stays here too; one of temporary
    -- and other objects goes to the peers for the others (chorus.note_drop).
    IF kept = 'temporary' THEN
        replicate := false;
    END IF;
    -- A DROP … IF EXISTS run from a function that found nothing changed
    -- nothing (sql_drop did not fire).
    IF (statement IS NULL OR caller.nested) AND kept = '' AND tg_tag LIKE 'DROP %' AND tg_tag <> 'DROP OWNED' THEN
        replicate := false;
    END IF;
    IF replicate THEN
        -- An identity column's sequence options (ALTER TABLE … ALTER
        -- COLUMN … RESTART, SET START …) change a global sequence, set up
        -- per backend: refused, as ALTER SEQUENCE is (on the peers the
        -- values would be out of their ranges, and the statement fail).
        IF tg_tag = 'ALTER TABLE'
           AND statement ~* '\m(restart|set\s+(start|increment|minvalue|maxvalue|cycle|no\s+(minvalue|maxvalue|cycle)))\M'
           AND EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() d
                         JOIN chorus.global_sequence g ON g.seq = d.object_identity
                        WHERE d.command_tag = 'ALTER SEQUENCE') THEN
            RAISE EXCEPTION 'ALTER TABLE that changes an identity column''s sequence options cannot be replicated: the cluster''s sequences are set up per backend'
                USING ERRCODE = '0A000',
                      HINT = 'Change only the identity''s kind (SET GENERATED …) here, or SET chorus.ddl_scope = ''local'' to alter this node''s copy only.';
        END IF;
        IF statement IS NOT NULL AND kept NOT IN ('', 'temporary', 'permanent') THEN
            statement := kept || CASE WHEN statement ~* '\mcascade\s*;?\s*$' THEN ' CASCADE' ELSE '' END;
        END IF;
        lease := nullif(current_setting('chorus.ddl_seq', true), '')::bigint;
        IF statement IS NOT NULL AND lease IS NULL
           AND coalesce(current_setting('chorus.ddl_refusal', true), '') <> '' THEN
            -- The proxy could not take the cluster DDL lease.
            RAISE EXCEPTION '%', substr(current_setting('chorus.ddl_refusal'), 7)
                USING ERRCODE = split_part(current_setting('chorus.ddl_refusal'), ':', 1),
                      HINT = 'Another transaction with DDL is open in the cluster, or this node cannot reach a Raft majority; retry.';
        END IF;
        -- DDL from a function or DO block: the proxy takes the lease for a
        -- DO block that may run DDL, and for any transaction that sent DDL
        -- itself; a call in a SELECT or CALL alone it cannot see coming.
        IF caller.nested
           AND (lease IS NULL
                OR (coalesce(current_setting('chorus.ddl_txn', true), '') <> lease::text
                    AND EXISTS (SELECT 1 FROM chorus.ddl_history h WHERE h.seq = lease))) THEN
            RAISE EXCEPTION '% run from a function cannot be replicated here: Chorus did not see DDL coming in this transaction', tg_tag
                USING ERRCODE = '0A000',
                      HINT = 'Call the function from a DO block (DO $do$ BEGIN PERFORM f(); END $do$), whose DDL Chorus replicates, or send the DDL statement itself; or SET chorus.ddl_scope = ''local'' to run it on this node''s backend only.';
        END IF;
        IF caller.unsure IS NOT NULL THEN
            RAISE EXCEPTION '% run from function % cannot be replicated: a function of that name is SECURITY DEFINER, and Chorus cannot tell which role ran it', tg_tag, caller.unsure
                USING ERRCODE = '0A000',
                      HINT = 'Give the function a name no SECURITY DEFINER function has, or send the DDL statement itself; or SET chorus.ddl_scope = ''local'' to run it on this node''s backend only.';
        END IF;
        IF statement IS NULL AND caller.nested AND tg_tag NOT IN ('CREATE TABLE AS', 'SELECT INTO') THEN
            RAISE EXCEPTION '% run from an SQL-language function, or in an EXECUTE of several statements, cannot be replicated', tg_tag
                USING ERRCODE = '0A000',
                      HINT = 'Run it from PL/pgSQL, one statement per EXECUTE, or send the DDL statement itself; or SET chorus.ddl_scope = ''local'' to run it on this node''s backend only.';
        END IF;
        IF (statement IS NULL AND NOT caller.nested) OR lease IS NULL THEN
            RAISE EXCEPTION '% cannot be replicated: Chorus did not see this statement', tg_tag
                USING ERRCODE = '0A000',
                      HINT = 'Send the DDL statement itself through Chorus, or SET chorus.ddl_scope = ''local'' to run it on this node''s backend only.';
        END IF;
        -- A lease's number belongs to the one transaction it was taken for.
        IF coalesce(current_setting('chorus.ddl_txn', true), '') <> lease::text
           AND EXISTS (SELECT 1 FROM chorus.ddl_history h WHERE h.seq = lease) THEN
            RAISE EXCEPTION '% cannot be replicated: this transaction does not hold the cluster DDL lease', tg_tag
                USING ERRCODE = '0A000',
                      HINT = 'Send the DDL statement itself through Chorus, or SET chorus.ddl_scope = ''local'' to run it on this node''s backend only.';
        END IF;
        PERFORM set_config('chorus.ddl_txn', lease::text, true);
        -- Sequences made here become global with this backend's id.
        kind := coalesce(nullif(lower(current_setting('chorus.sequence_kind', true)), ''),
                         nullif(current_setting('chorus.sequence_default_kind', true), ''), 'snowflake');
        block := coalesce(nullif(current_setting('chorus.sequence_block', true), ''), '1000000');
        PERFORM set_config('chorus.sequence_node',
                           coalesce(nullif(current_setting('chorus.sequence_id', true), ''),
                                    (SELECT l.sequence_id FROM chorus.local l)::text, ''), true),
                set_config('chorus.sequence_kind', kind, true),
                set_config('chorus.sequence_block', block, true);
    END IF;
    PERFORM set_config('chorus.in_ddl_trigger', 'on', true);
    -- (What Chorus does here, its triggers and its sequences' settings,
    -- is hidden from the user's event triggers, see chorus.adopt.)
    prior_role := current_setting('session_replication_role');
    IF prior_role <> 'replica' THEN
        PERFORM set_config('session_replication_role', 'replica', true);
    END IF;
    FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
        CONTINUE WHEN cmd.in_extension;
        CONTINUE WHEN cmd.schema_name IS NOT NULL
                  AND (cmd.schema_name = 'chorus' OR cmd.schema_name LIKE 'pg_temp%');
        IF cmd.object_type = 'sequence' AND cmd.command_tag = 'CREATE SEQUENCE'
           AND coalesce(current_setting('chorus.sequence_node', true), '') <> ''
           AND coalesce(current_setting('chorus.making_global', true), '') <> 'on'
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = cmd.objid AND c.relpersistence = 'p') THEN
            PERFORM chorus.make_global(cmd.objid::regclass,
                                       coalesce(nullif(current_setting('chorus.sequence_kind', true), ''), 'snowflake'),
                                       current_setting('chorus.sequence_node')::integer,
                                       coalesce(nullif(current_setting('chorus.sequence_block', true), ''), '1000000')::bigint);
        END IF;
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
            made := cmd.objid::regclass;
        END IF;
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = cmd.objid AND c.relkind IN ('r', 'p')
                                                 AND c.relpersistence = 'p')
           AND (coalesce(current_setting('chorus.ddl_scope', true), '') <> 'local'
                OR EXISTS (SELECT 1 FROM chorus.replicated_table t
                            WHERE t.tbl = (SELECT format('%I.%I', n.nspname, c.relname)
                                             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                            WHERE c.oid = cmd.objid))) THEN
            PERFORM chorus.adopt(cmd.objid::regclass,
                                 NOT EXISTS (SELECT 1 FROM pg_index i
                                              WHERE i.indrelid = cmd.objid AND i.indisprimary));
        END IF;
    END LOOP;
    IF prior_role <> 'replica' THEN
        PERFORM set_config('session_replication_role', prior_role, true);
    END IF;
    PERFORM set_config('chorus.in_ddl_trigger', 'off', true);
    IF NOT replicate THEN
        RETURN;
    END IF;
    -- A materialized view is computed by every backend from its own data:
    -- one whose query calls a volatile function (random(),
    -- clock_timestamp(), nextval(), …) would differ everywhere.
    IF tg_tag IN ('CREATE MATERIALIZED VIEW', 'REFRESH MATERIALIZED VIEW') THEN
        FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
            IF EXISTS (SELECT 1 FROM pg_rewrite r,
                              regexp_matches(r.ev_action::text, E':(?:funcid|opfuncid) (\\d+)', 'g') AS m
                         JOIN pg_proc p ON p.oid = m[1]::oid
                        WHERE r.ev_class = cmd.objid AND p.provolatile = 'v') THEN
                RAISE EXCEPTION 'a materialized view whose query calls volatile functions cannot be replicated: each backend would compute different rows'
                    USING ERRCODE = '0A000',
                          HINT = 'Use CREATE TABLE ... AS instead (its rows are computed once and replicated), or SET chorus.ddl_scope = ''local'' to keep the view on this node''s backend only.';
            END IF;
        END LOOP;
    END IF;
    -- The transaction's stamp, pinned as the capture trigger pins it.
    pinned := current_setting('chorus.txn', true);
    IF pinned IS NOT NULL AND split_part(pinned, ':', 1) = txid_current()::text THEN
        txn_hlc := split_part(pinned, ':', 2)::bigint;
        origin := split_part(pinned, ':', 3)::integer;
    ELSE
        txn_hlc := chorus.fresh_stamp(nullif(current_setting('chorus.hlc', true), '')::bigint);
        origin := coalesce(nullif(current_setting('chorus.origin', true), '')::integer,
                           (SELECT l.node_id FROM chorus.local l));
        PERFORM set_config('chorus.txn', txid_current()::text || ':' || txn_hlc || ':' || origin || ':' ||
                           coalesce((SELECT max(h.seq) FROM chorus.ddl_history h WHERE h.seq <> lease), 0), true);
    END IF;
    -- Peers apply this only once they have every DDL this backend had.
    dep := coalesce((SELECT max(h.seq) FROM chorus.ddl_history h WHERE h.seq <> lease), 0);
    IF made IS NOT NULL THEN
        -- Its rows travel as values, which peers read back with the
        -- columns' input functions: some internal types have none.
        SELECT format_type(a.atttypid, a.atttypmod) INTO unreadable
          FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
         WHERE a.attrelid = made AND a.attnum > 0 AND NOT a.attisdropped
           AND t.typinput::text IN ('pg_node_tree_in', 'pg_ndistinct_in', 'pg_dependencies_in',
                                    'pg_mcv_list_in', 'pg_ddl_command_in', 'brin_bloom_summary_in',
                                    'brin_minmax_multi_summary_in')
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION '% with a column of type % cannot be replicated: PostgreSQL cannot read such a value back', tg_tag, unreadable
                USING ERRCODE = '0A000',
                      HINT = 'Cast the column to text in the query.';
        END IF;
        statement := chorus.table_definition(made);
    END IF;
    INSERT INTO chorus.ddl_history AS h (seq, origin, search_path, role, command)
    VALUES (lease, origin, user_path, role_name, statement)
    ON CONFLICT (seq) DO UPDATE SET command = h.command || E';\n' || excluded.command;
    PERFORM pg_logical_emit_message(true, 'chorus:' || dep, jsonb_build_object(
        'ddl', statement, 'seq', lease, 'origin', origin, 'search_path', user_path,
        'role', role_name, 'sequence_kind', current_setting('chorus.sequence_kind', true),
        'sequence_block', current_setting('chorus.sequence_block', true),
        'settings', chorus.ddl_settings())::text);
    -- Tables this statement rewrote: their rows as the origin computed them.
    IF coalesce(current_setting('chorus.rewritten', true), '') <> '' THEN
        -- (Only tables the role may alter: the list is a setting.)
        PERFORM chorus.emit_rows(r::oid::regclass, txn_hlc, origin, 'chorus:' || dep)
           FROM unnest(string_to_array(current_setting('chorus.rewritten'), ',')) AS r
          WHERE EXISTS (SELECT 1 FROM pg_class c
                         WHERE c.oid = r::oid AND pg_has_role(role_name, c.relowner, 'USAGE'));
        PERFORM set_config('chorus.rewritten', '', true);
    END IF;
    IF made IS NOT NULL THEN
        SELECT format('%I.%I', n.nspname, c.relname) INTO made_name
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = made;
        EXECUTE format('SELECT count(pg_logical_emit_message(true, $1, jsonb_build_object('
                       '''table'', $2, ''op'', ''INSERT'', ''key'', NULL, ''row'', %s, '
                       '''version'', $3, ''prev'', NULL, ''origin'', $4)::text)) FROM %s t',
                       chorus.image_sql(made, '{}', 't'), made)
            USING 'chorus:' || dep, made_name, txn_hlc, origin;
    END IF;
END
$$;

-- What a DROP statement named, noted for chorus.handle_ddl (sql_drop fires
-- just before ddl_command_end, and only it can list the dropped objects):
-- 'temporary' when it named temporary objects only, which exist on this
-- backend only and stay there (replicated, the statement would drop a
-- permanent object of the same name on every peer); when it named both
-- kinds, a DROP of the others, for the peers; otherwise 'permanent'.
-- (A statement that another DDL statement ran notes nothing: it comes
-- with that one.)
CREATE OR REPLACE FUNCTION chorus.note_drop() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    any_temporary boolean;
    others text;
    kind text;
BEGIN
    IF coalesce(nullif(current_setting('chorus.ddl_depth', true), ''), '1')::integer > 1 THEN
        RETURN;
    END IF;
    SELECT bool_or(d.is_temporary),
           string_agg(d.object_identity, ', ') FILTER (WHERE NOT d.is_temporary),
           min(d.object_type) FILTER (WHERE NOT d.is_temporary)
      INTO any_temporary, others, kind
      FROM pg_event_trigger_dropped_objects() d
     WHERE d.original;
    PERFORM set_config('chorus.drop_kept',
                       CASE WHEN NOT coalesce(any_temporary, false) THEN 'permanent'
                            WHEN others IS NULL THEN 'temporary'
                            ELSE format('DROP %s %s', upper(replace(kind, 'composite ', '')), others)
                       END, true);
END
$$;

DROP EVENT TRIGGER IF EXISTS chorus_drop;
CREATE EVENT TRIGGER chorus_drop ON sql_drop EXECUTE FUNCTION chorus.note_drop();

-- The event trigger's function: as the chorus schema's owner, it hands
-- the statement's tag and the session's search_path to chorus.handle_ddl
-- (only qualified names here: the session's path is still in force).
CREATE OR REPLACE FUNCTION chorus.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM chorus.handle_ddl(tg_tag, pg_catalog.current_setting('search_path'));
END
$$;

DROP EVENT TRIGGER IF EXISTS chorus_ddl;
CREATE EVENT TRIGGER chorus_ddl ON ddl_command_end EXECUTE FUNCTION chorus.capture_ddl();
-- (ALWAYS: replicated DDL is applied with session_replication_role =
-- replica, and peers adopt its tables here too.)
ALTER EVENT TRIGGER chorus_ddl ENABLE ALWAYS;

-- A statement PostgreSQL fires no event trigger for (roles, grants on
-- databases, event triggers, …; chorus_router::DdlRoute::Log) sent through
-- Chorus inside a transaction block: the proxy has taken the cluster DDL
-- lease for the transaction and staged the statement (see
-- chorus.ddl_statement), and its stamp, run just before the statement,
-- calls this to record it in the transaction's change stream, as
-- chorus.handle_ddl records other DDL. If the statement then fails, the
-- (sub)transaction is aborted and the record with it. Peers run it as
-- the role that ran it here (chorus.apply_stream_ddl), so a role gains
-- nothing by calling this itself.
CREATE OR REPLACE FUNCTION chorus.handle_log_statement(user_path text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stage jsonb := nullif(current_setting('chorus.ddl_stage', true), '')::jsonb;
    lease bigint := nullif(current_setting('chorus.ddl_seq', true), '')::bigint;
    origin integer := nullif(current_setting('chorus.origin', true), '')::integer;
    raw bytea;
    statement text;
    dep bigint;
BEGIN
    IF stage IS NULL OR stage -> 'ddl' -> 0 IS NULL OR lease IS NULL OR origin IS NULL THEN
        RAISE EXCEPTION 'this statement cannot be replicated: the transaction holds no cluster DDL lease'
            USING ERRCODE = '0A000',
                  HINT = 'Send it through Chorus as a simple query, or run it outside BEGIN ... COMMIT.';
    END IF;
    IF coalesce(current_setting('chorus.ddl_txn', true), '') <> lease::text
       AND EXISTS (SELECT 1 FROM chorus.ddl_history h WHERE h.seq = lease) THEN
        RAISE EXCEPTION 'this statement cannot be replicated: this transaction does not hold the cluster DDL lease'
            USING ERRCODE = '0A000';
    END IF;
    PERFORM set_config('chorus.ddl_txn', lease::text, true);
    raw := decode(stage ->> 'q', 'hex');
    statement := convert_from(substring(raw FROM (stage -> 'ddl' -> 0 ->> 0)::integer + 1
                                            FOR (stage -> 'ddl' -> 0 ->> 1)::integer),
                              pg_client_encoding());
    -- (The statement's own event triggers, if it fires any, find it
    -- recorded: see chorus.handle_ddl.)
    PERFORM set_config('chorus.ddl_stage_pos', 'logged', false);
    dep := coalesce((SELECT max(h.seq) FROM chorus.ddl_history h WHERE h.seq <> lease), 0);
    INSERT INTO chorus.ddl_history AS h (seq, origin, search_path, role, command)
    VALUES (lease, origin, user_path, chorus.invoker(), statement)
    ON CONFLICT (seq) DO UPDATE SET command = h.command || E';\n' || excluded.command;
    PERFORM pg_logical_emit_message(true, 'chorus:' || dep, jsonb_build_object(
        'ddl', statement, 'seq', lease, 'origin', origin, 'search_path', user_path,
        'role', chorus.invoker(), 'settings', chorus.ddl_settings())::text);
END
$$;

-- Called by the stamp, as the session's role (see
-- chorus.handle_log_statement).
CREATE OR REPLACE FUNCTION chorus.capture_log_statement() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM chorus.handle_log_statement(pg_catalog.current_setting('search_path'));
END
$$;

-- How deep in DDL statements the session is, counted up here and down in
-- chorus.handle_ddl. A DDL statement that another one runs (the work
-- tables of REFRESH MATERIALIZED VIEW CONCURRENTLY, an extension's
-- script, what a function in a DDL's expression or an event trigger
-- does) comes with that statement, which every backend runs itself.
-- (The setting is transaction-local: a statement that fails takes its
-- count back with it.)
CREATE OR REPLACE FUNCTION chorus.note_ddl_start() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('chorus.ddl_depth',
                       (coalesce(nullif(current_setting('chorus.ddl_depth', true), ''), '0')::integer + 1)::text,
                       true);
END
$$;

DROP EVENT TRIGGER IF EXISTS chorus_ddl_start;
CREATE EVENT TRIGGER chorus_ddl_start ON ddl_command_start EXECUTE FUNCTION chorus.note_ddl_start();
ALTER EVENT TRIGGER chorus_ddl_start ENABLE ALWAYS;
