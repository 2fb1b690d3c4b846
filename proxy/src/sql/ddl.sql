-- DDL replication on every backend: the event triggers that put a
-- transaction's DDL in its change stream (or refuse it), and the
-- statements of the DDL log recorded in a transaction block (installed
-- after sequences.sql and ddl_code.sql; see cluster/capture.rs, SCHEMA_SQL).

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
    unreadable_type text;
    has_values boolean;
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
        -- itself; for a call in a SELECT or CALL alone, which it cannot
        -- see coming, the session asks it now (chorus.ask_lease).
        IF caller.nested
           AND (lease IS NULL
                OR (coalesce(current_setting('chorus.ddl_txn', true), '') <> lease::text
                    AND EXISTS (SELECT 1 FROM chorus.ddl_history h WHERE h.seq = lease))) THEN
            lease := chorus.ask_lease(tg_tag);
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
        -- A unique index, or a table that inherits, changes how its table
        -- (or parent) is captured (see chorus.by_statement).
        IF cmd.object_type = 'index' AND cmd.command_tag = 'CREATE INDEX' THEN
            PERFORM chorus.remake_capture_triggers(i.indrelid::regclass)
               FROM pg_index i WHERE i.indexrelid = cmd.objid AND i.indisunique;
        END IF;
        IF cmd.object_type = 'table' AND cmd.command_tag IN ('CREATE TABLE', 'ALTER TABLE') THEN
            PERFORM chorus.remake_capture_triggers(i.inhparent::regclass)
               FROM pg_inherits i WHERE i.inhrelid = cmd.objid;
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
        -- columns' input functions: some internal types have none, so such
        -- a column may only hold NULLs (as a catalog's mostly do).
        FOR unreadable, unreadable_type IN
            SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
              FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = made AND a.attnum > 0 AND NOT a.attisdropped
               AND t.typinput::text IN ('pg_node_tree_in', 'pg_ndistinct_in', 'pg_dependencies_in',
                                        'pg_mcv_list_in', 'pg_ddl_command_in', 'brin_bloom_summary_in',
                                        'brin_minmax_multi_summary_in')
        LOOP
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s t WHERE t.%I IS NOT NULL)', made, unreadable)
                INTO has_values;
            IF has_values THEN
                RAISE EXCEPTION '% with values in a column of type % cannot be replicated: PostgreSQL cannot read such a value back', tg_tag, unreadable_type
                    USING ERRCODE = '0A000',
                          HINT = format('Cast column %I to text in the query.', unreadable);
            END IF;
        END LOOP;
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
