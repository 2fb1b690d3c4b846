-- Applying the changes that are statements, not rows: DDL that travelled
-- in its transaction's stream (replayed as its role) and TRUNCATE. Called
-- by chorus.apply_changes (apply.sql) at their place among a
-- transaction's row changes.

-- Run a replicated statement as `role`, in this transaction: inside a
-- SECURITY DEFINER function owned by that role (made for it here and
-- dropped at once; no other session can see it). The statement has
-- exactly the role's privileges, and PostgreSQL refuses SET ROLE, RESET
-- ROLE and SET SESSION AUTHORIZATION in any function it calls, so it
-- cannot reach the applying session's superuser (as it could behind SET
-- LOCAL ROLE, with RESET ROLE).
-- (The function's own CREATE and DROP are hidden from the user's event
-- triggers, as replicas hide them; the statement is not.)
CREATE OR REPLACE FUNCTION chorus.run_as(role text, statement text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    prior_role text := current_setting('session_replication_role');
BEGIN
    PERFORM set_config('session_replication_role', 'replica', true);
    CREATE FUNCTION pg_temp.chorus_replay(statement text) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER AS 'BEGIN EXECUTE statement; END';
    EXECUTE format('ALTER FUNCTION pg_temp.chorus_replay(text) OWNER TO %I', role);
    PERFORM set_config('session_replication_role', prior_role, true);
    PERFORM pg_temp.chorus_replay(statement);
    PERFORM set_config('session_replication_role', 'replica', true);
    DROP FUNCTION pg_temp.chorus_replay(text);
    PERFORM set_config('session_replication_role', prior_role, true);
END
$$;

-- Apply one DDL statement that travelled in its origin transaction's
-- change stream (see chorus.capture_ddl), as the role that ran it there,
-- with its search_path; sequences it makes become global with this
-- backend's id. A statement that fails here is recorded with its error and
-- logged as a conflict (kind ddl_failed); the stream goes on.
CREATE OR REPLACE FUNCTION chorus.apply_stream_ddl(change jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    path text := current_setting('search_path');
    failure text;
    before jsonb;
BEGIN
    -- Sequences the DDL makes need this backend's sequence id, which its
    -- node records shortly after it starts: until then the apply fails and
    -- the stream retries it.
    IF (SELECT l.sequence_id FROM chorus.local l) IS NULL THEN
        RAISE EXCEPTION 'this backend has no sequence id yet' USING ERRCODE = '55000';
    END IF;
    PERFORM set_config('search_path', change ->> 'search_path', true),
            set_config('chorus.sequence_node', (SELECT l.sequence_id FROM chorus.local l)::text, true),
            set_config('chorus.sequence_kind', coalesce(change ->> 'sequence_kind', 'snowflake'), true),
            set_config('chorus.sequence_block', coalesce(change ->> 'sequence_block', '1000000'), true);
    BEGIN
        -- With the origin session's settings (see chorus.ddl_settings):
        -- one naming a tablespace this backend lacks fails like the DDL.
        -- Function bodies are not checked again, as in a restore: the
        -- origin checked them (if its session asked), and a body may name
        -- the origin session's temporary tables, which are not here.
        before := chorus.use_settings(coalesce(change -> 'settings', '{}')
                                      || '{"check_function_bodies": "off"}');
        PERFORM chorus.run_as(change ->> 'role', change ->> 'ddl');
        PERFORM chorus.use_settings(before);
    EXCEPTION WHEN OTHERS THEN
        failure := SQLSTATE || ': ' || SQLERRM;
    END;
    PERFORM set_config('search_path', path, true),
            set_config('chorus.sequence_node', '', true);
    INSERT INTO chorus.ddl_history AS h (seq, origin, search_path, role, command, error)
    VALUES ((change ->> 'seq')::bigint, (change ->> 'origin')::integer, change ->> 'search_path',
            change ->> 'role', change ->> 'ddl', failure)
    ON CONFLICT (seq) DO UPDATE
        SET command = h.command || E';\n' || excluded.command, error = coalesce(h.error, excluded.error);
    IF failure IS NULL THEN
        RETURN 'applied';
    END IF;
    RAISE WARNING 'replicated DDL % failed here: %', change ->> 'seq', failure;
    INSERT INTO chorus.conflict (tbl, kind, resolution, remote_origin, remote_row)
    VALUES ('', 'ddl_failed', 'skipped', (change ->> 'origin')::integer, change);
    RETURN 'ddl_failed:skipped';
END
$$;

-- A table as a TRUNCATE or DELETE names it to act on its own rows: with
-- ONLY, so that the tables inheriting from it (each with its own record)
-- keep theirs; a partitioned table, whose rows are its partitions', as
-- it is.
CREATE OR REPLACE FUNCTION chorus.only(rel text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN c.relkind = 'p' THEN rel::regclass::text ELSE 'ONLY ' || rel::regclass::text END
      FROM pg_class c WHERE c.oid = rel::regclass
$$;

-- Apply the TRUNCATE records of one statement (see chorus.capture_truncate):
-- per table, the rows whose versions are older than the record's go, and
-- the table's marker keeps its version. When no row here is newer (the
-- usual case) that is one TRUNCATE of all the statement's tables together
-- (their foreign keys between them allow it); otherwise DELETE of the
-- older rows, referencing tables first. A keyless table has no row
-- versions: it is truncated.
CREATE OR REPLACE FUNCTION chorus.apply_truncate(items jsonb) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    rel text;
    ver bigint;
    org integer;
    cols text[];
    newer boolean := false;
    rels text[] := '{}';
    results text[] := '{}';
BEGIN
    FOR item IN SELECT e.c FROM jsonb_array_elements(items) AS e(c) LOOP
        rel := item ->> 'truncate';
        IF to_regclass(rel) IS NULL THEN
            results := results || 'missing_table:skipped'::text;
            CONTINUE;
        END IF;
        rels := rels || rel;
    END LOOP;
    IF cardinality(rels) = 0 THEN
        RETURN results;
    END IF;
    -- Local writes to these tables finish (or wait) first: which rows are
    -- newer is decided on what they committed.
    EXECUTE 'LOCK TABLE ' || (SELECT string_agg(r::regclass::text, ', ') FROM unnest(rels) AS r)
         || ' IN ACCESS EXCLUSIVE MODE';
    FOR item IN SELECT e.c FROM jsonb_array_elements(items) AS e(c)
                 WHERE to_regclass(e.c ->> 'truncate') IS NOT NULL LOOP
        newer := newer OR EXISTS (SELECT 1 FROM chorus.row_version v
                                   WHERE v.tbl = item ->> 'truncate' AND v.pk <> '{}'
                                     AND (v.version, v.origin)
                                         > ((item ->> 'version')::bigint, (item ->> 'origin')::integer));
    END LOOP;
    IF NOT newer THEN
        EXECUTE 'TRUNCATE ' || (SELECT string_agg(chorus.only(r), ', ') FROM unnest(rels) AS r);
    END IF;
    FOR item IN SELECT e.c FROM jsonb_array_elements(items) WITH ORDINALITY AS e(c, i)
                 WHERE to_regclass(e.c ->> 'truncate') IS NOT NULL ORDER BY e.i DESC LOOP
        rel := item ->> 'truncate';
        ver := (item ->> 'version')::bigint;
        org := (item ->> 'origin')::integer;
        cols := chorus.key_columns(rel);
        -- (Versions compare with their origins, as rows do: equal HLC
        -- values from two nodes are told apart by the node.)
        IF newer THEN
            IF cardinality(cols) = 0 THEN
                EXECUTE format('DELETE FROM %s', chorus.only(rel));
            ELSE
                EXECUTE format('DELETE FROM %1$s t WHERE NOT EXISTS (SELECT 1 FROM chorus.row_version v '
                               'WHERE v.tbl = $1 AND v.pk = chorus.key_of(to_jsonb(t.*), $2) '
                               'AND (v.version, v.origin) > ($3, $4))', chorus.only(rel))
                    USING rel, cols, ver, org;
            END IF;
        END IF;
        DELETE FROM chorus.row_version v WHERE v.tbl = rel AND (v.version, v.origin) < (ver, org);
        INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
        VALUES (rel, '{}', ver, org, true)
        ON CONFLICT (tbl, pk) DO UPDATE SET version = excluded.version, origin = excluded.origin
            WHERE (v.version, v.origin) < (excluded.version, excluded.origin);
        results := results || 'truncated'::text;
    END LOOP;
    RETURN results;
END
$$;
