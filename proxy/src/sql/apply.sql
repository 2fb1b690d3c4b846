-- Applying changes from other nodes, on a peer backend. Called by the
-- replication stream inside one transaction per batch, with
-- `SET LOCAL chorus.applying = on` so the capture trigger stays quiet.

-- A comma-separated list of quoted identifiers.
CREATE OR REPLACE FUNCTION chorus.ident_list(names text[], prefix text DEFAULT '') RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT string_agg(prefix || quote_ident(n), ', ' ORDER BY o)
      FROM unnest(names) WITH ORDINALITY AS u(n, o)
$$;

-- `t.a = k.a AND t.b = k.b …` for the key columns: rows matched column by
-- column. (A row comparison, (a, b) IN (…), needs every column's = in a
-- btree operator family, which a user's type need not have: PostgreSQL's
-- regression suite makes such keys, and the apply failed on them for good.)
CREATE OR REPLACE FUNCTION chorus.key_match(cols text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT string_agg(format('t.%1$I = k.%1$I', c), ' AND ' ORDER BY o)
      FROM unnest(cols) WITH ORDINALITY AS u(c, o)
$$;

-- Lock the rows with these keys (a JSON array of key objects) that exist,
-- in key order.
CREATE OR REPLACE FUNCTION chorus.lock_rows(rel text, cols text[], keys jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('SELECT count(*) FROM (SELECT 1 FROM %1$s t WHERE EXISTS '
                   '(SELECT 1 FROM jsonb_populate_recordset(NULL::%1$s, $1) k WHERE %3$s) '
                   'ORDER BY %2$s FOR UPDATE OF t) s',
                   rel, chorus.ident_list(cols, 't.'), chorus.key_match(cols))
    USING keys;
END
$$;

-- The key columns of a replicated table; an error if it is not replicated.
CREATE OR REPLACE FUNCTION chorus.key_columns(rel text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cols text[];
BEGIN
    SELECT t.pk_columns INTO cols FROM chorus.replicated_table t WHERE t.tbl = rel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'received a change for table %, which is not replicated on this backend', rel
            USING ERRCODE = '55000';
    END IF;
    RETURN cols;
END
$$;

-- Insert or update rows from their images (a JSON array; every image of
-- one call has the same keys, and no two the same key). Columns are matched
-- by name: those the images lack take their default, keys the table lacks
-- are ignored. A table without key columns only ever gets inserts.
--
-- An UPDATE of the rows that exist, then an INSERT of the others, not
-- INSERT … ON CONFLICT: a speculative insertion that writes anything in
-- between (an index expression whose function writes, as PostgreSQL's
-- regression suite makes) leaves WAL that logical decoding cannot read
-- ("invalid ordering of speculative insertion changes"), and the stream
-- from this backend would stop there for good. No other session can
-- insert one of these keys in between: the apply holds every key's lock,
-- which a local write takes before it commits.
CREATE OR REPLACE FUNCTION chorus.write_rows(rel text, cols text[], imgs jsonb) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    present text[] := chorus.present_columns(rel, imgs -> 0);
    others text[];
    absent text := '';
    source text;
    json_columns boolean;
BEGIN
    -- OVERRIDING SYSTEM VALUE: the origin's value of a GENERATED ALWAYS
    -- identity column is the row's.
    IF present IS NULL THEN
        -- No column (a table of none, or all dropped here): rows of
        -- defaults, one per image.
        EXECUTE format('INSERT INTO %1$s OVERRIDING SYSTEM VALUE SELECT FROM jsonb_array_elements($1)', rel)
        USING imgs;
        RETURN;
    END IF;
    -- (Images with exact json texts are read one at a time; the others,
    -- as a set, column by column from the record.)
    json_columns := chorus.has_json_columns(rel, present);
    IF json_columns THEN
        source := format('jsonb_array_elements($1) AS e(v) CROSS JOIN LATERAL jsonb_populate_record(NULL::%s, e.v) k', rel);
    ELSE
        source := format('jsonb_populate_recordset(NULL::%s, $1) k', rel);
    END IF;
    IF cardinality(cols) > 0 THEN
        SELECT array_agg(p ORDER BY o) INTO others
          FROM unnest(present) WITH ORDINALITY AS u(p, o) WHERE p <> ALL (cols);
        IF others IS NOT NULL THEN
            EXECUTE format('UPDATE %1$s t SET (%2$s) = ROW(%3$s) FROM %5$s WHERE %4$s',
                           rel, chorus.ident_list(others),
                           CASE WHEN json_columns THEN chorus.image_columns(rel, others, 'e.v')
                                ELSE chorus.ident_list(others, 'k.') END,
                           chorus.key_match(cols), source)
            USING imgs;
        END IF;
        absent := format(' WHERE NOT EXISTS (SELECT FROM %1$s t WHERE %2$s)', rel, chorus.key_match(cols));
    END IF;
    EXECUTE format('INSERT INTO %1$s (%2$s) OVERRIDING SYSTEM VALUE SELECT %3$s FROM %4$s',
                   rel, chorus.ident_list(present),
                   CASE WHEN json_columns THEN chorus.image_columns(rel, present, 'e.v')
                        ELSE chorus.ident_list(present, 'k.') END, source) || absent
    USING imgs;
END
$$;

-- Write a remote row image, resolving conflicts on secondary UNIQUE
-- indexes by last writer wins: when the image collides with a different
-- local row, the one with the lower (version, origin) loses. A losing
-- local row is deleted (its version kept as a tombstone); a losing remote
-- row is not written. Either way the conflict is logged, and the apply goes
-- on. Returns NULL (written, no conflict), 'remote_wins' (written after
-- removing losers) or 'local_wins' (not written).
CREATE OR REPLACE FUNCTION chorus.write_row_resolving(
    rel text, cols text[], key jsonb, img jsonb, ver bigint, org integer
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    index_name text;
    index_cols text[];
    local_img jsonb;
    local_key jsonb;
    lv bigint;
    lo integer;
    outcome text;
BEGIN
    -- Each round removes one losing row; a row collides with at most one
    -- row per unique index.
    FOR attempt IN 1..32 LOOP
        BEGIN
            PERFORM chorus.write_rows(rel, cols, jsonb_build_array(img));
            RETURN outcome;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS index_name = CONSTRAINT_NAME;
        END;
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO index_cols
          FROM pg_index i
          JOIN pg_class c ON c.oid = i.indexrelid
          CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel::regclass AND c.relname = index_name AND NOT i.indisprimary
           AND k.ord <= i.indnkeyatts  -- (not its INCLUDE columns)
        HAVING bool_and(a.attname IS NOT NULL);
        local_img := NULL;
        IF index_cols IS NOT NULL THEN
            EXECUTE format('SELECT to_jsonb(t.*) FROM %1$s t WHERE (%2$s) = '
                           '(SELECT %2$s FROM jsonb_populate_record(NULL::%1$s, $1))',
                           rel, chorus.ident_list(index_cols))
            INTO local_img USING img;
        END IF;
        local_key := chorus.key_of(local_img, cols);
        lv := NULL;
        lo := NULL;
        IF local_key IS NOT NULL THEN
            SELECT v.version, v.origin INTO lv, lo FROM chorus.row_version v
             WHERE v.tbl = rel AND v.pk = local_key FOR UPDATE;
        END IF;
        -- Without a key on either side (keyless tables, expression
        -- indexes) there is nothing to compare: the local row stays.
        IF key IS NOT NULL AND local_key IS NOT NULL
           AND (ver, org) > (coalesce(lv, 0), coalesce(lo, 0)) THEN
            INSERT INTO chorus.conflict (tbl, pk, kind, resolution, local_version, local_origin,
                                         local_row, remote_version, remote_origin, remote_row)
            VALUES (rel, key, 'unique', 'remote_wins', lv, lo, local_img, ver, org, img);
            PERFORM chorus.delete_row(rel, cols, local_key);
            INSERT INTO chorus.row_version AS v (tbl, pk, version, origin, deleted)
            VALUES (rel, local_key, coalesce(lv, 0), coalesce(lo, 0), true)
            ON CONFLICT (tbl, pk) DO UPDATE SET deleted = true;
            outcome := 'remote_wins';
        ELSE
            INSERT INTO chorus.conflict (tbl, pk, kind, resolution, local_version, local_origin,
                                         local_row, remote_version, remote_origin, remote_row)
            VALUES (rel, key, 'unique', 'local_wins', lv, lo, local_img, ver, org, img);
            RETURN 'local_wins';
        END IF;
    END LOOP;
    RAISE EXCEPTION 'could not resolve unique conflicts for a row of %', rel
        USING ERRCODE = '23505';
END
$$;

-- Record the first versions of keys that had none when the apply read
-- them. Their version rows could not be locked then: if a local write has
-- made one since (its transaction was still open, or committed after the
-- read), this apply decided without it. The insert then fails on the key
-- (23505, after waiting for that write to end), the apply is undone and
-- retried (see chorus.apply_transactions: a batch whose deferred checks fail is
-- applied again, and the stream retries any other failure), and then
-- compares with that version. (A plain INSERT, not ON CONFLICT DO NOTHING:
-- a fifth less time for a large transaction's new keys, which this
-- statement writes one version row each.)
CREATE OR REPLACE FUNCTION chorus.first_versions(rel text, keys jsonb[], vers bigint[],
                                                 orgs integer[], dels boolean[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    INSERT INTO chorus.row_version (tbl, pk, version, origin, deleted)
    SELECT rel, u.k, u.ver, u.org, u.del FROM unnest(keys, vers, orgs, dels) AS u(k, ver, org, del);
END
$$;

-- The current image of the row with this key, or NULL.
CREATE OR REPLACE FUNCTION chorus.read_row(rel text, cols text[], key jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    img jsonb;
BEGIN
    EXECUTE format('SELECT %3$s FROM %1$s t, jsonb_populate_record(NULL::%1$s, $1) k WHERE %2$s',
                   rel, chorus.key_match(cols), chorus.image_sql(rel::regclass, cols, 't'))
    INTO img USING key;
    RETURN img;
END
$$;

CREATE OR REPLACE FUNCTION chorus.delete_row(rel text, cols text[], key jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DELETE FROM %1$s t USING jsonb_populate_record(NULL::%1$s, $1) k WHERE %2$s',
                   rel, chorus.key_match(cols))
    USING key;
END
$$;

-- Apply an UPDATE or DELETE of a table without a primary key: one row
-- whose columns read the same as the change's old row (compared in their
-- text form, which every type has, unlike =) is changed, as the origin
-- changed one. With no row versions there is nothing to order concurrent
-- writes by: when no row matches (it was changed or deleted here first),
-- the change is skipped and logged as update_missing or delete_missing.
-- Each call scans the table, as PostgreSQL's own logical replication does
-- for REPLICA IDENTITY FULL without an index.
CREATE OR REPLACE FUNCTION chorus.apply_keyless(rel text, op text, old jsonb, img jsonb,
                                                ver bigint, org integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    matched text[] := chorus.present_columns(rel, old);
    changed text[];
    found_oid oid;
    found_tid tid;
BEGIN
    -- The old row read with its columns' base types: a domain's check
    -- constraint added NOT VALID since may refuse the value it had.
    -- (A table of no columns: any row.)
    EXECUTE format('SELECT t.tableoid, t.ctid FROM %1$s t WHERE ROW(%2$s)::text = '
                   '(SELECT ROW(%3$s)::text FROM jsonb_to_record($1) AS k(%4$s)) '
                   'LIMIT 1 FOR UPDATE OF t',
                   rel, chorus.ident_list(matched, 't.'), chorus.image_columns(rel, matched, '$1'),
                   coalesce(chorus.base_type_columns(rel, matched), 'chorus_none int'))
    INTO found_oid, found_tid USING old;
    IF found_tid IS NULL THEN
        INSERT INTO chorus.conflict (tbl, kind, resolution, remote_version, remote_origin, remote_row, detail)
        VALUES (rel, chorus.conflict_kind(op, NULL, false, NULL, NULL), 'skipped', ver, org, coalesce(img, old),
                'no row here matches the old row of this table without a primary key');
        RETURN chorus.conflict_kind(op, NULL, false, NULL, NULL) || ':skipped';
    END IF;
    IF op = 'DELETE' THEN
        EXECUTE format('DELETE FROM %s t WHERE t.tableoid = $1 AND t.ctid = $2', rel)
        USING found_oid, found_tid;
        RETURN 'applied';
    END IF;
    -- Only the columns the update changed: the others (an identity column
    -- GENERATED ALWAYS among them) keep the value the row has.
    SELECT array_agg(c ORDER BY o) INTO changed
      FROM unnest(chorus.present_columns(rel, img)) WITH ORDINALITY AS u(c, o)
     WHERE img -> c IS DISTINCT FROM old -> c
        OR img -> '' -> c IS DISTINCT FROM old -> '' -> c;
    IF changed IS NOT NULL THEN
        BEGIN
            EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $3) k) '
                           'WHERE t.tableoid = $1 AND t.ctid = $2', rel, chorus.ident_list(changed),
                           chorus.image_columns(rel, changed, '$3'))
            USING found_oid, found_tid, img;
        EXCEPTION WHEN unique_violation THEN
            -- Another row here holds the new value of a unique column;
            -- with no key on either side there is nothing to order them
            -- by: the local rows stay (as for inserts, see
            -- chorus.write_row_resolving).
            INSERT INTO chorus.conflict (tbl, kind, resolution, remote_version, remote_origin, remote_row, detail)
            VALUES (rel, 'unique', 'local_wins', ver, org, img, SQLERRM);
            RETURN 'unique:local_wins';
        END;
    END IF;
    RETURN 'applied';
END
$$;

-- The conflict a row change meets here, or NULL when it applies cleanly:
-- the one place conflicts are classified (chorus.apply_change,
-- chorus.apply_batch and chorus.apply_keyless ask it). `op` and `prev`
-- are the change's operation and the version it overwrote on its origin;
-- `have`, `cur_version` and `cur_deleted` what this backend holds of the
-- row. A change whose `prev` is the version held here is clean; otherwise
-- the kind names the change's operation and what it found: no row
-- (`*_missing`), a deleted one (`*_delete`), or a live one written by
-- someone else (`insert_insert`, `update_update`, and `update_delete`
-- for a delete that meets an update).
CREATE OR REPLACE FUNCTION chorus.conflict_kind(op text, prev bigint, have boolean,
                                                cur_version bigint, cur_deleted boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN NOT have THEN CASE op WHEN 'UPDATE' THEN 'update_missing'
                                   WHEN 'DELETE' THEN 'delete_missing' END
        WHEN cur_version IS NOT DISTINCT FROM prev THEN NULL
        WHEN cur_deleted THEN CASE op WHEN 'INSERT' THEN 'insert_delete'
                                      WHEN 'UPDATE' THEN 'update_delete'
                                      ELSE 'delete_delete' END
        ELSE CASE op WHEN 'INSERT' THEN 'insert_insert'
                     WHEN 'UPDATE' THEN 'update_update'
                     ELSE 'update_delete' END
    END
$$;

-- Whether a change (version `ver` from origin `org`) wins over what this
-- backend holds of its row: last writer wins by (version, origin), and a
-- row not held here is always written.
CREATE OR REPLACE FUNCTION chorus.remote_wins(ver bigint, org integer, have boolean,
                                              cur_version bigint, cur_origin integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT NOT have OR (ver, org) > (cur_version, cur_origin)
$$;

-- Apply one change. Last writer wins by (version, origin). A change whose
-- `prev` equals the version held here applies cleanly; anything else is a
-- conflict, resolved the same way and written to chorus.conflict.
-- Returns 'applied', 'duplicate', or '<kind>:<remote_wins|local_wins>'.
CREATE OR REPLACE FUNCTION chorus.apply_change(change jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    rel text := change ->> 'table';
    op text := change ->> 'op';
    key jsonb := nullif(change -> 'key', 'null'::jsonb);
    img jsonb := nullif(change -> 'row', 'null'::jsonb);
    ver bigint := (change ->> 'version')::bigint;
    prev bigint := (change ->> 'prev')::bigint;
    org integer := (change ->> 'origin')::integer;
    cols text[];
    cur chorus.row_version%ROWTYPE;
    have_version boolean;
    kind text;
    remote_wins boolean;
    local_img jsonb;
    unique_outcome text;
BEGIN
    cols := chorus.key_columns(rel);
    -- (The table lock first: a TRUNCATE committing meanwhile has set its
    -- marker by the time it is granted.)
    EXECUTE format('LOCK TABLE %s IN ROW EXCLUSIVE MODE', rel);
    IF (ver, org) < (SELECT v.version, v.origin FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = '{}') THEN
        -- Made before a TRUNCATE of the table that this backend has had.
        RETURN 'truncated:skipped';
    END IF;
    IF key IS NULL AND op <> 'INSERT' THEN
        RETURN chorus.apply_keyless(rel, op, change -> 'old', img, ver, org);
    END IF;
    IF key IS NULL THEN
        unique_outcome := chorus.write_row_resolving(rel, cols, key, img, ver, org);
        RETURN coalesce('unique:' || unique_outcome, 'applied');
    END IF;

    -- The row first, then its version row: the order a local write locks
    -- them in (its statement the row, its capture trigger the version), so
    -- the two cannot deadlock on an existing row.
    PERFORM chorus.lock_rows(rel, cols, jsonb_build_array(key));
    SELECT * INTO cur FROM chorus.row_version v WHERE v.tbl = rel AND v.pk = key FOR UPDATE;
    have_version := FOUND;
    IF have_version AND cur.version = ver AND cur.origin = org THEN
        RETURN 'duplicate';
    END IF;
    IF NOT have_version AND ver < (SELECT l.pruned_below FROM chorus.local l) THEN
        -- Every change this old has been applied here (see
        -- chorus.prune_tombstones): the key's tombstone was pruned. Only
        -- reconciliation still offers such a row (one a backend has not
        -- applied the delete of yet); streams never do.
        RETURN 'pruned:skipped';
    END IF;

    kind := chorus.conflict_kind(op, prev, have_version, cur.version, cur.deleted);
    remote_wins := chorus.remote_wins(ver, org, have_version, cur.version, cur.origin);
    IF kind IS NOT NULL THEN
        local_img := chorus.read_row(rel, cols, key);
        INSERT INTO chorus.conflict (tbl, pk, kind, resolution, local_version, local_origin,
                                     local_row, remote_version, remote_origin, remote_row)
        VALUES (rel, key, kind, CASE WHEN remote_wins THEN 'remote_wins' ELSE 'local_wins' END,
                cur.version, cur.origin, local_img, ver, org, img);
    END IF;
    IF NOT remote_wins THEN
        RETURN kind || ':local_wins';
    END IF;

    IF op = 'DELETE' THEN
        PERFORM chorus.delete_row(rel, cols, key);
    ELSE
        unique_outcome := chorus.write_row_resolving(rel, cols, key, img, ver, org);
        IF unique_outcome = 'local_wins' THEN
            -- The row lost on a unique index: it is gone here, as it is
            -- (or will be) on every backend that resolves the same way.
            PERFORM chorus.delete_row(rel, cols, key);
        END IF;
    END IF;
    IF have_version THEN
        UPDATE chorus.row_version v
           SET version = ver, origin = org,
               deleted = op = 'DELETE' OR unique_outcome IS NOT DISTINCT FROM 'local_wins'
         WHERE v.tbl = rel AND v.pk = key;
    ELSE
        PERFORM chorus.first_versions(rel, ARRAY[key], ARRAY[ver], ARRAY[org],
                                      ARRAY[op = 'DELETE' OR unique_outcome IS NOT DISTINCT FROM 'local_wins']);
    END IF;
    IF unique_outcome IS NOT NULL THEN
        RETURN 'unique:' || unique_outcome;
    END IF;
    RETURN coalesce(kind || ':remote_wins', 'applied');
END
$$;

-- Whether a table's changes may be applied set-based (chorus.apply_batch):
-- nothing on it depends on the order in which rows of one batch are
-- written, or on the order relative to other tables. No exclusion
-- constraint, no trigger that fires in the apply (ENABLE REPLICA or
-- ALWAYS), and unique indexes besides the primary key only on plain
-- columns, checked at once, NULLs distinct (no expression, no predicate,
-- not NULLS NOT DISTINCT, not deferred): chorus.unique_overlap can tell
-- from their columns when a batch must go one by one. Foreign keys do not
-- matter: the apply runs with session_replication_role = replica (see
-- chorus.apply_begin), where their checks and actions do not fire, nor do
-- the other triggers.
-- (PL/pgSQL: see chorus.present_columns.)
CREATE OR REPLACE FUNCTION chorus.batchable(rel text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r regclass := rel::regclass;
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.contype = 'x' AND c.conrelid = r)
       -- (indnullsnotdistinct is read from the row as JSON: PostgreSQL
       -- 13 and 14 have no such column.)
       AND NOT EXISTS (SELECT 1 FROM pg_index i
                        WHERE i.indrelid = r AND i.indisunique AND NOT i.indisprimary
                          AND (i.indexprs IS NOT NULL OR i.indpred IS NOT NULL OR NOT i.indimmediate
                               OR (to_jsonb(i) ->> 'indnullsnotdistinct') = 'true'))
       AND NOT EXISTS (SELECT 1 FROM pg_trigger t
                        WHERE t.tgrelid = r AND t.tgenabled IN ('R', 'A')
                          AND t.tgname NOT IN ('chorus_capture', 'chorus_capture_inserts', 'chorus_capture_deletes',
                                               'chorus_capture_updates', 'chorus_truncate', 'chorus_truncate_end'));
END
$$;

-- Whether some row image among these changes of `rel` (a JSON array)
-- holds a value of a unique index besides the primary key that a row of
-- another key here, or another key's image, also holds. Applied one by
-- one, such a batch may meet a unique conflict and resolve it (see
-- chorus.write_row_resolving); set-based, it might meet it in another
-- order, or not at all. Without any such value, neither way meets a
-- conflict, and both end the same. (A row of another key that only a
-- concurrent transaction holds is not seen here, but the set-based write
-- then fails on it, and the batch goes one by one too.)
CREATE OR REPLACE FUNCTION chorus.unique_overlap(rel text, cols text[], changes jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    ucols text[];
    overlap boolean;
BEGIN
    FOR ucols IN
        SELECT array_agg(a.attname::text ORDER BY k.ord)
          FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = rel::regclass AND i.indisunique AND NOT i.indisprimary
           AND k.ord <= i.indnkeyatts  -- (not its INCLUDE columns)
         GROUP BY i.indexrelid
    LOOP
        EXECUTE format(
            'WITH img AS (SELECT e.c -> ''key'' AS key, r AS img'
            '               FROM jsonb_array_elements($1) AS e(c)'
            '              CROSS JOIN LATERAL jsonb_populate_record(NULL::%1$s, e.c -> ''row'') AS r'
            '              WHERE jsonb_typeof(e.c -> ''row'') = ''object'')'
            ' SELECT EXISTS (SELECT 1 FROM img i JOIN %1$s t ON %2$s WHERE NOT (%3$s))'
            '     OR EXISTS (SELECT 1 FROM img i WHERE %4$s GROUP BY %5$s HAVING count(DISTINCT i.key) > 1)',
            rel,
            (SELECT string_agg(format('t.%1$I = (i.img).%1$I', u), ' AND ') FROM unnest(ucols) AS u),
            (SELECT string_agg(format('t.%1$I = (i.img).%1$I', c), ' AND ') FROM unnest(cols) AS c),
            (SELECT string_agg(format('(i.img).%1$I IS NOT NULL', u), ' AND ') FROM unnest(ucols) AS u),
            (SELECT string_agg(format('(i.img).%1$I', u), ', ') FROM unnest(ucols) AS u))
        INTO overlap USING changes;
        IF overlap THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END
$$;

-- Before a large set-based batch on `rel` (`n` changes): analyze the table
-- if PostgreSQL believes it holds fewer rows than the batch. Its
-- statements join the batch's images (estimated at 100 rows) with the
-- table; a table emptied and vacuumed is estimated at no rows whatever it
-- holds since, and one large origin transaction is applied in parts
-- within one transaction, where the rows earlier parts wrote are never
-- counted: the planner then scans the images again for every row of the
-- table (a nested loop over a part's 50 000 images and the 50 000 rows of
-- the part before took minutes). ANALYZE counts the rows this
-- transaction wrote. It is skipped, not waited for, when another session
-- holds the table's statistics lock (a VACUUM, another apply's ANALYZE),
-- and when it fails.
CREATE OR REPLACE FUNCTION chorus.refresh_estimate(rel text, n integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    believed real;
    lock_wait text := current_setting('lock_timeout');
BEGIN
    IF n < 1000 THEN
        RETURN;
    END IF;
    SELECT c.reltuples INTO believed FROM pg_class c WHERE c.oid = rel::regclass;
    -- (-1: never analyzed; the planner then counts the table's pages.)
    IF believed < 0 OR believed >= n THEN
        RETURN;
    END IF;
    BEGIN
        PERFORM set_config('lock_timeout', '1ms', true);
        EXECUTE format('ANALYZE %s', rel);
        PERFORM set_config('lock_timeout', lock_wait, true);
    EXCEPTION WHEN OTHERS THEN
        -- (Only an estimate is lost; the apply goes on. The setting is
        -- back with the subtransaction's rollback.)
        NULL;
    END;
END
$$;

-- Apply the changes of one batchable table from one batch, set-based, with
-- the outcome of applying them one by one: per key, the batch's last
-- change (the newest: one origin's versions of a row only grow) against
-- the version held here, by (version, origin); a conflict when the key's
-- first change in the batch did not overwrite the version held here. A few
-- statements for the whole batch instead of several per change.
-- Returns one result per change: 'applied' for changes superseded in the
-- batch, else as chorus.apply_change; or NULL, having written nothing, when
-- the changes must go one by one (see chorus.unique_overlap).
CREATE OR REPLACE FUNCTION chorus.apply_batch(rel text, changes jsonb) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    cols text[];
    results text[];
    del_keys jsonb;
    up_rows jsonb;
    v_keys jsonb[];
    v_vers bigint[];
    v_orgs integer[];
    v_dels boolean[];
    n_keys jsonb[];
    n_vers bigint[];
    n_orgs integer[];
    n_dels boolean[];
BEGIN
    cols := chorus.key_columns(rel);
    IF cardinality(cols) = 0 THEN
        -- Without a key: inserts together, updates and deletes (matched by
        -- content) one by one, in order.
        IF NOT EXISTS (SELECT 1 FROM jsonb_array_elements(changes) c WHERE c ->> 'op' <> 'INSERT') THEN
            PERFORM chorus.write_rows(rel, cols,
                (SELECT jsonb_agg(e.c -> 'row' ORDER BY e.n)
                   FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)));
            RETURN array_fill('applied'::text, ARRAY[jsonb_array_length(changes)]);
        END IF;
        RETURN ARRAY(SELECT chorus.apply_change(c) FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)
                      ORDER BY e.n);
    END IF;

    PERFORM chorus.refresh_estimate(rel, jsonb_array_length(changes));
    -- Lock the existing rows, then the keys' version rows, each in one
    -- order (so two applies cannot deadlock), rows first as local writes
    -- do. A key without a version row cannot be locked: a local write may
    -- make one meanwhile, which chorus.first_versions finds out.
    PERFORM chorus.lock_rows(rel, cols,
                             (SELECT jsonb_agg(DISTINCT c -> 'key') FROM jsonb_array_elements(changes) c));
    PERFORM 1 FROM chorus.row_version v
     WHERE v.tbl = rel AND v.pk IN (SELECT c -> 'key' FROM jsonb_array_elements(changes) c)
     ORDER BY v.pk FOR UPDATE;
    IF chorus.unique_overlap(rel, cols, changes) THEN
        RETURN NULL;
    END IF;

    -- Every key's outcome in one statement (no loop over keys): its last
    -- change against the version held here, its conflict logged (the
    -- local row read before anything below changes it), and what is to be
    -- deleted, written and versioned, gathered for the statements after.
    WITH c AS (
        SELECT e.n, e.c ->> 'op' AS op, e.c -> 'key' AS k,
               nullif(e.c -> 'row', 'null'::jsonb) AS img, (e.c ->> 'version')::bigint AS ver,
               (e.c ->> 'prev')::bigint AS prev, (e.c ->> 'origin')::integer AS org
          FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)
    ), per_key AS (
        -- (Grouped by hash, then joined by position: sorting the keys
        -- compares JSON values, several times slower.)
        SELECT min(c.n) AS first_n, max(c.n) AS last_n FROM c GROUP BY c.k
    ), held AS (
        SELECT l.k, l.op, l.img, l.ver, l.org, v.tbl IS NOT NULL AS have,
               v.version AS cur_ver, v.origin AS cur_org,
               chorus.conflict_kind(f.op, f.prev, v.tbl IS NOT NULL, v.version, v.deleted) AS kind,
               chorus.remote_wins(l.ver, l.org, v.tbl IS NOT NULL, v.version, v.origin) AS wins,
               v.tbl IS NOT NULL AND v.version = l.ver AND v.origin = l.org AS dup
          FROM per_key p
          JOIN c l ON l.n = p.last_n
          JOIN c f ON f.n = p.first_n
          LEFT JOIN chorus.row_version v ON v.tbl = rel AND v.pk = l.k
    ), logged AS (
        INSERT INTO chorus.conflict (tbl, pk, kind, resolution, local_version, local_origin,
                                     local_row, remote_version, remote_origin, remote_row)
        SELECT rel, h.k, h.kind, CASE WHEN h.wins THEN 'remote_wins' ELSE 'local_wins' END,
               h.cur_ver, h.cur_org, chorus.read_row(rel, cols, h.k), h.ver, h.org, h.img
          FROM held h
         WHERE NOT h.dup AND h.kind IS NOT NULL
    )
    SELECT array_agg(CASE WHEN h.dup THEN 'duplicate'
                          WHEN NOT h.wins THEN h.kind || ':local_wins'
                          ELSE coalesce(h.kind || ':remote_wins', 'applied') END),
           jsonb_agg(h.k) FILTER (WHERE NOT h.dup AND h.wins AND h.op = 'DELETE'),
           jsonb_agg(h.img) FILTER (WHERE NOT h.dup AND h.wins AND h.op <> 'DELETE'),
           array_agg(h.k) FILTER (WHERE NOT h.dup AND h.wins AND h.have),
           array_agg(h.ver) FILTER (WHERE NOT h.dup AND h.wins AND h.have),
           array_agg(h.org) FILTER (WHERE NOT h.dup AND h.wins AND h.have),
           array_agg(h.op = 'DELETE') FILTER (WHERE NOT h.dup AND h.wins AND h.have),
           coalesce(array_agg(h.k) FILTER (WHERE NOT h.dup AND h.wins AND NOT h.have), '{}'),
           coalesce(array_agg(h.ver) FILTER (WHERE NOT h.dup AND h.wins AND NOT h.have), '{}'),
           coalesce(array_agg(h.org) FILTER (WHERE NOT h.dup AND h.wins AND NOT h.have), '{}'),
           coalesce(array_agg(h.op = 'DELETE') FILTER (WHERE NOT h.dup AND h.wins AND NOT h.have), '{}')
      INTO results, del_keys, up_rows, v_keys, v_vers, v_orgs, v_dels, n_keys, n_vers, n_orgs, n_dels
      FROM held h;

    IF del_keys IS NOT NULL THEN
        EXECUTE format('DELETE FROM %1$s t USING jsonb_populate_recordset(NULL::%1$s, $1) k WHERE %2$s',
                       rel, chorus.key_match(cols))
        USING del_keys;
    END IF;
    IF up_rows IS NOT NULL THEN
        PERFORM chorus.write_rows(rel, cols, up_rows);
    END IF;
    IF v_keys IS NOT NULL THEN
        UPDATE chorus.row_version v SET version = u.ver, origin = u.org, deleted = u.del
          FROM unnest(v_keys, v_vers, v_orgs, v_dels) AS u(k, ver, org, del)
         WHERE v.tbl = rel AND v.pk = u.k;
    END IF;
    PERFORM chorus.first_versions(rel, n_keys, n_vers, n_orgs, n_dels);
    -- (One result per key; a key's earlier changes in the batch applied.)
    RETURN results || array_fill('applied'::text,
                                 ARRAY[jsonb_array_length(changes) - coalesce(cardinality(results), 0)]);
END
$$;

-- The table a change of `rel`'s row lands in, given the partition it was
-- in on its origin (`leaf`, see chorus.capture): `rel` itself, unless that
-- partition has left `rel`'s tree here (a DETACH from another node applied
-- here before this change, while on the origin it came after). The row is
-- then in the detached table, which replicates on its own, so the change
-- applies there, as it will on the origin once the DETACH arrives.
CREATE OR REPLACE FUNCTION chorus.landed(rel text, leaf text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN l IS NULL OR to_regclass(rel) IN (SELECT pg_partition_ancestors(l)) THEN rel
                ELSE leaf END
      FROM to_regclass(leaf) AS l
$$;

-- Apply the row changes at positions lo..hi of a batch (no DDL among
-- them; see chorus.apply_changes): batchable tables set-based, one
-- statement group per table; the others change by change in stream
-- order. Reordering is safe: a batchable table's rows depend on no other
-- table or row, and the batch commits as one transaction.
--
-- Rows written against another schema than this backend's (their origin
-- had not applied a DDL yet, or already had a later one) never stall the
-- stream:
-- * non-null values for columns this table lacks (dropped or renamed
--   here) are logged as a conflict of kind unknown_column (the row image
--   kept, the columns in `detail`), and the rest of the row applies;
-- * a row that cannot be written at all (a value of a changed type that
--   does not convert, a new NOT NULL or CHECK it breaks) is skipped and
--   logged as schema_mismatch with PostgreSQL's error.
CREATE OR REPLACE FUNCTION chorus.apply_dml(changes jsonb, lo integer, hi integer) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    grp record;
    change jsonb;
    results text[] := '{}';
    slow text[] := '{}';
    slow_changes jsonb[];
    done text[];
    failure text;
    mark chorus.row_version%ROWTYPE;
    cs jsonb;
BEGIN
    -- Partitions' rows whose partition has left the tree here go to it
    -- (see chorus.landed): one check per partition named, not per row.
    IF EXISTS (SELECT 1 FROM (SELECT DISTINCT e.c ->> 'table' AS tbl, e.c ->> 'leaf' AS leaf
                                FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)
                               WHERE e.n BETWEEN lo AND hi AND e.c ? 'leaf') p
                WHERE chorus.landed(p.tbl, p.leaf) <> p.tbl) THEN
        changes := (SELECT jsonb_agg(CASE WHEN e.c ? 'leaf' AND e.n BETWEEN lo AND hi
                                          THEN e.c || jsonb_build_object('table',
                                                          chorus.landed(e.c ->> 'table', e.c ->> 'leaf'))
                                          ELSE e.c END ORDER BY e.n)
                      FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n));
    END IF;
    -- Each table's changes, in stream order: the changes themselves when
    -- they are all of one table (as the parts of a large transaction
    -- usually are), else taken out by a JSON path (in C, where building
    -- them row by row in SQL cost a third of a large apply).
    FOR grp IN
        SELECT t.tbl,
               CASE WHEN count(*) OVER () = 1 AND lo = 1 AND hi = jsonb_array_length(changes) THEN changes
                    ELSE jsonb_path_query_array(changes, '$[$lo to $hi] ? (@.table == $t)',
                                                jsonb_build_object('lo', lo - 1, 'hi', hi - 1, 't', t.tbl))
               END AS cs
          FROM (SELECT e.c ->> 'table' AS tbl, min(e.n) AS first
                  FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)
                 WHERE e.n BETWEEN lo AND hi
                 GROUP BY 1) t
         ORDER BY t.first
    LOOP
        IF to_regclass(grp.tbl) IS NULL THEN
            -- Dropped here by DDL ordered after these changes were made on
            -- their origin: nothing to apply them to. Logged, and the
            -- stream goes on.
            INSERT INTO chorus.conflict (tbl, pk, kind, resolution, remote_version, remote_origin, remote_row)
            SELECT grp.tbl, nullif(c -> 'key', 'null'::jsonb), 'missing_table', 'skipped',
                   (c ->> 'version')::bigint, (c ->> 'origin')::integer, nullif(c -> 'row', 'null'::jsonb)
              FROM jsonb_array_elements(grp.cs) AS c;
            results := results || array_fill('missing_table:skipped'::text, ARRAY[jsonb_array_length(grp.cs)]);
            CONTINUE;
        END IF;
        INSERT INTO chorus.conflict (tbl, pk, kind, resolution, remote_version, remote_origin, remote_row, detail)
        SELECT grp.tbl, nullif(c -> 'key', 'null'::jsonb), 'unknown_column', 'values_not_applied',
               (c ->> 'version')::bigint, (c ->> 'origin')::integer, c -> 'row', string_agg(k, ', ')
          FROM jsonb_array_elements(grp.cs) AS c,
               -- (The row less the table's columns, in C: about a seventh
               -- of listing every row's keys and comparing each.)
               jsonb_object_keys(CASE jsonb_typeof(c -> 'row') WHEN 'object'
                                      THEN (c -> 'row') - ARRAY(SELECT a.attname::text FROM pg_attribute a
                                                                 WHERE a.attrelid = grp.tbl::regclass
                                                                   AND a.attnum > 0 AND NOT a.attisdropped)
                                      ELSE '{}' END) AS k
         WHERE c -> 'row' -> k <> 'null'::jsonb
         GROUP BY c;
        IF chorus.batchable(grp.tbl) THEN
            -- Changes made before a TRUNCATE of the table that this
            -- backend has had are skipped (see chorus.capture_truncate;
            -- chorus.apply_change checks the same one by one).
            -- (The table lock first: a TRUNCATE committing meanwhile has
            -- set its marker by the time it is granted.)
            cs := grp.cs;
            EXECUTE format('LOCK TABLE %s IN ROW EXCLUSIVE MODE', grp.tbl);
            SELECT * INTO mark FROM chorus.row_version v WHERE v.tbl = grp.tbl AND v.pk = '{}';
            IF FOUND THEN
                cs := (SELECT coalesce(jsonb_agg(e.c ORDER BY e.o), '[]')
                         FROM jsonb_array_elements(grp.cs) WITH ORDINALITY AS e(c, o)
                        WHERE ((e.c ->> 'version')::bigint, (e.c ->> 'origin')::integer)
                              >= (mark.version, mark.origin));
                results := results || array_fill('truncated:skipped'::text,
                                                  ARRAY[jsonb_array_length(grp.cs) - jsonb_array_length(cs)]);
                CONTINUE WHEN jsonb_array_length(cs) = 0;
            END IF;
            BEGIN
                done := chorus.apply_batch(grp.tbl, cs);
                IF done IS NULL THEN
                    slow := slow || grp.tbl;
                ELSE
                    results := results || done;
                END IF;
            EXCEPTION WHEN data_exception OR not_null_violation OR check_violation OR datatype_mismatch
                           OR unique_violation THEN
                -- Some row does not fit this schema, or meets a row of
                -- another key on a unique index (one a concurrent
                -- transaction wrote): change by change.
                slow := slow || grp.tbl;
            END;
        ELSE
            slow := slow || grp.tbl;
        END IF;
    END LOOP;
    IF cardinality(slow) > 0 THEN
        slow_changes := ARRAY(SELECT e.c FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, n)
                               WHERE e.n BETWEEN lo AND hi AND (e.c ->> 'table') = ANY (slow)
                               ORDER BY e.n);
        -- All at once, and only if a row does not fit, again one by one.
        BEGIN
            done := '{}';
            FOREACH change IN ARRAY slow_changes LOOP
                done := done || chorus.apply_change(change);
            END LOOP;
        EXCEPTION WHEN data_exception OR not_null_violation OR check_violation OR datatype_mismatch THEN
            done := '{}';
            FOREACH change IN ARRAY slow_changes LOOP
                BEGIN
                    done := done || chorus.apply_change(change);
                EXCEPTION WHEN data_exception OR not_null_violation OR check_violation OR datatype_mismatch THEN
                    GET STACKED DIAGNOSTICS failure = MESSAGE_TEXT;
                    INSERT INTO chorus.conflict (tbl, pk, kind, resolution, remote_version, remote_origin, remote_row, detail)
                    VALUES (change ->> 'table', nullif(change -> 'key', 'null'::jsonb), 'schema_mismatch', 'skipped',
                            (change ->> 'version')::bigint, (change ->> 'origin')::integer,
                            nullif(change -> 'row', 'null'::jsonb), failure);
                    done := done || 'schema_mismatch:skipped'::text;
                END;
            END LOOP;
        END;
        results := results || done;
    END IF;
    RETURN results;
END
$$;

-- Apply a JSON array of changes in order: DDL statements one by one at
-- their place, the row changes between them by chorus.apply_dml. One
-- result per change (not in input order).
CREATE OR REPLACE FUNCTION chorus.apply_changes(changes jsonb) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    n integer := jsonb_array_length(changes);
    lo integer := 1;
    hi integer;
    at integer;
    results text[] := '{}';
BEGIN
    FOR at IN SELECT e.i FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, i)
               WHERE e.c ? 'ddl' OR e.c ? 'truncate' ORDER BY e.i LOOP
        CONTINUE WHEN at < lo;
        IF at > lo THEN
            results := results || chorus.apply_dml(changes, lo, at - 1);
        END IF;
        IF changes -> (at - 1) ? 'ddl' THEN
            results := results || chorus.apply_stream_ddl(changes -> (at - 1));
            lo := at + 1;
        ELSE
            -- One TRUNCATE statement's tables come one after another.
            hi := at;
            WHILE hi < n AND changes -> hi ? 'truncate' LOOP
                hi := hi + 1;
            END LOOP;
            results := results || chorus.apply_truncate(
                (SELECT jsonb_agg(e.c ORDER BY e.i) FROM jsonb_array_elements(changes) WITH ORDINALITY AS e(c, i)
                  WHERE e.i BETWEEN at AND hi));
            lo := hi + 1;
        END IF;
    END LOOP;
    IF lo <= n THEN
        results := results || chorus.apply_dml(changes, lo, n);
    END IF;
    RETURN results;
END
$$;

-- The start of an apply transaction for origin `org` by the driver of
-- `epoch`: the capture trigger stays quiet, a deadlock with a local write
-- aborts this transaction (it is retried) rather than the client's (a
-- 10 ms deadlock_timeout runs its deadlock check first), the commit is
-- durable whatever the backend's default (the stream tells the origin's
-- slot to move on once it commits: a crash of this backend must not lose
-- changes the origin no longer keeps). The origin's row is locked: applies
-- of one origin take turns, and one from a driver older than the last one
-- seen is refused (fenced). Returns the position applied up to.
CREATE OR REPLACE FUNCTION chorus.apply_begin(org integer, epoch bigint) RETURNS pg_lsn
LANGUAGE plpgsql AS $$
DECLARE
    done pg_lsn;
    fence bigint;
BEGIN
    PERFORM set_config('chorus.applying', 'on', true);
    PERFORM set_config('deadlock_timeout', '10ms', true);
    PERFORM set_config('synchronous_commit', 'on', true);
    -- A batch's statements sort and hash its changes (up to 50 000 row
    -- images): in memory, not in temporary files, unless the backend
    -- already allows more.
    IF pg_size_bytes(current_setting('work_mem')) < pg_size_bytes('64MB') THEN
        PERFORM set_config('work_mem', '64MB', true);
    END IF;
    -- As PostgreSQL's own logical replication applies: the tables'
    -- ordinary triggers (and foreign key checks and actions) do not fire
    -- again for rows their origin's triggers already made or checked,
    -- whose effects arrive as changes of their own; triggers marked ENABLE
    -- REPLICA or ENABLE ALWAYS do. (For the session, not the transaction:
    -- every change of the setting drops the session's cached plans.)
    IF current_setting('session_replication_role') <> 'replica' THEN
        PERFORM set_config('session_replication_role', 'replica', false);
    END IF;
    SELECT a.lsn, a.driver_epoch INTO done, fence FROM chorus.applied a WHERE a.origin = org FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO chorus.applied (origin, lsn) VALUES (org, '0/0') ON CONFLICT (origin) DO NOTHING;
        SELECT a.lsn, a.driver_epoch INTO done, fence FROM chorus.applied a WHERE a.origin = org FOR UPDATE;
    END IF;
    IF fence > epoch THEN
        RAISE EXCEPTION 'the changes of origin % are applied by a newer driver (epoch % > %)', org, fence, epoch
            USING ERRCODE = 'CH001';
    END IF;
    IF fence < epoch THEN
        UPDATE chorus.applied SET driver_epoch = epoch WHERE origin = org;
    END IF;
    RETURN done;
END
$$;

-- The end of an apply transaction: the position applied up to from `org`,
-- with the newest version seen (the node's clock observes it).
CREATE OR REPLACE FUNCTION chorus.apply_end(org integer, upto pg_lsn, newest_version bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE chorus.applied AS a
       SET lsn = upto, applied_at = now(), max_version = greatest(a.max_version, newest_version)
     WHERE a.origin = org
$$;

-- Apply a batch of origin transactions ([{"end": <commit end LSN>,
-- "changes": [...]}, ...], in commit order) from origin `org`, in the
-- caller's (one statement's) transaction: skip those already applied here,
-- apply the rest, and record `upto` as the position applied from `org`.
-- (A batch too large for one statement is applied with apply_begin,
-- apply_changes in parts and apply_end in one transaction instead; see
-- ReplicationStream::apply.)
CREATE OR REPLACE FUNCTION chorus.apply_transactions(
    org integer, txns jsonb, newest_version bigint, upto pg_lsn, epoch bigint,
    OUT results text[], OUT skipped integer
)
LANGUAGE plpgsql AS $$
DECLARE
    done pg_lsn := chorus.apply_begin(org, epoch);
    todo jsonb;
    applying integer;
BEGIN
    SELECT jsonb_agg(c.change ORDER BY t.n, c.m), count(DISTINCT t.n)
      INTO todo, applying
      FROM jsonb_array_elements(txns) WITH ORDINALITY AS t(txn, n),
           jsonb_array_elements(t.txn -> 'changes') WITH ORDINALITY AS c(change, m)
     WHERE (t.txn ->> 'end')::pg_lsn > done;
    skipped := jsonb_array_length(txns) - applying;
    results := '{}';
    IF applying > 0 THEN
        -- Deferrable constraints (a DEFERRABLE UNIQUE, a deferrable foreign
        -- key) are checked once the batch is applied, as the origin checked
        -- them at the end of its statements or transactions: applied row
        -- by row, an UPDATE t SET u = u + 1 would collide with itself on
        -- the way. Should they fail then (rows of another node in
        -- between), the batch is applied again checking them row by row,
        -- which resolves each collision as a conflict.
        BEGIN
            SET CONSTRAINTS ALL DEFERRED;
            results := chorus.apply_changes(todo);
            SET CONSTRAINTS ALL IMMEDIATE;
        EXCEPTION WHEN unique_violation OR foreign_key_violation OR exclusion_violation THEN
            results := chorus.apply_changes(todo);
        END;
        PERFORM chorus.apply_end(org, upto, newest_version);
    END IF;
END
$$;
