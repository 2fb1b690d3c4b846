-- Row images: how a row travels between backends, as JSON (to_jsonb of the
-- row) with the columns JSON cannot carry exactly in their text form, and
-- how the apply reads a row back out of one. Installed after capture.sql's
-- tables and functions, before the apply's.

-- How a row image carries the columns of `rel`, where to_jsonb alone
-- cannot carry them exactly:
-- `always`, in their text form, from the type's output function: a type
-- (or array element type) with a cast to json or jsonb, which to_jsonb
-- would use and its input function cannot read back, and arrays of json
-- or jsonb (JSON would lose their elements' text, or tell a JSON null
-- from a NULL element);
-- `arrays`, in their text form when a row has one with bounds of its own
-- (arrays not of `keys`, which are compared as to_jsonb gives them): JSON
-- loses the bounds ('[0:1]={1,2}' would arrive as '{1,2}');
-- `jsons` and `jsonbs`, columns of type json or jsonb (or a domain over
-- one): JSON carries a json value normalized (key order, white space,
-- duplicate keys) and a JSON null as SQL NULL, so the image adds their
-- exact text where it differs (see chorus.with_json_texts).
CREATE OR REPLACE FUNCTION chorus.column_forms(rel regclass, keys text[], OUT always text[],
                                               OUT arrays text[], OUT jsons text[], OUT jsonbs text[])
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE j.cast_to_json OR j.json_elements), '{}'),
           coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                    FILTER (WHERE NOT j.cast_to_json AND NOT j.json_elements AND t.typcategory = 'A'
                              AND NOT a.attname::text = ANY (coalesce(keys, '{}'))), '{}'),
           coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE j.base = 'json'::regtype), '{}'),
           coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE j.base = 'jsonb'::regtype), '{}')
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     CROSS JOIN LATERAL (SELECT CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END AS base,
                                t.typcategory = 'A' AND t.typelem IN ('json'::regtype, 'jsonb'::regtype)
                                    AS json_elements,
                                t.oid NOT IN ('json'::regtype, 'jsonb'::regtype)
                                AND EXISTS (SELECT 1 FROM pg_cast c
                                             WHERE c.castsource IN (t.oid, t.typelem, t.typbasetype)
                                               AND c.castsource NOT IN (0, 'json'::regtype, 'jsonb'::regtype)
                                               AND c.casttarget IN ('json'::regtype, 'jsonb'::regtype))
                                    AS cast_to_json) j
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- A row image (`img`, to_jsonb of row `r`) with the exact text of its
-- json and jsonb columns (`jsons`, `jsonbs`, see chorus.column_forms)
-- where JSON cannot carry it: under the key '' (no column has an empty
-- name), an object of column name to text, for a json value (as it was
-- written: white space, key order, duplicate keys) and for a JSON null in
-- a jsonb column (which to_jsonb gives as it gives SQL NULL). The apply
-- (chorus.image_columns) takes a column from there when it is there; an
-- apply that does not know of it reads the image as before. (No SET
-- search_path: it runs inside chorus.capture, whose own is pinned, and a
-- SET clause costs on every row.)
CREATE OR REPLACE FUNCTION chorus.with_json_texts(img jsonb, r anyelement, jsons text[], jsonbs text[])
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    texts jsonb := '{}';
    whole json;
    whole_text text;
    val text;
    probe text;
    row_text text;
    col text;
    is_null boolean;
    nulls text[] := '{}';
BEGIN
    IF cardinality(jsons) > 0 THEN
        -- row_to_json writes a json value as it is stored, and `->` reads
        -- it back as it is but for white space around it: a value found
        -- right after its key and right before the next has none. (A rare
        -- value with some is read from the row itself, in one query.)
        whole := row_to_json(r);
        whole_text := whole::text;
        FOREACH col IN ARRAY jsons LOOP
            val := (whole -> col)::text;
            IF val = 'null' THEN
                nulls := nulls || col;
                CONTINUE;
            END IF;
            probe := to_json(col)::text || ':' || val;
            IF strpos(whole_text, probe || ',') = 0 AND strpos(whole_text, probe || '}') = 0 THEN
                EXECUTE format('SELECT jsonb_strip_nulls(jsonb_build_object(%s))',
                               (SELECT string_agg(format('%L, ($1).%I::text', c, c), ', ') FROM unnest(jsons) AS c))
                    USING r INTO texts;
                nulls := '{}';
                EXIT;
            END IF;
            texts := texts || jsonb_build_object(col, val);
        END LOOP;
    END IF;
    FOREACH col IN ARRAY jsonbs LOOP
        IF img -> col = 'null'::jsonb THEN
            nulls := nulls || col;
        END IF;
    END LOOP;
    FOREACH col IN ARRAY nulls LOOP
        -- SQL NULL or a JSON null: without a `null` in the row's text (SQL
        -- NULL is empty there), SQL NULL; else asked of the row.
        row_text := coalesce(row_text, format('%s', r));
        EXIT WHEN strpos(row_text, 'null') = 0;
        EXECUTE format('SELECT ($1).%I IS NULL', col) USING r INTO is_null;
        IF NOT is_null THEN
            texts := texts || jsonb_build_object(col, 'null');
        END IF;
    END LOOP;
    RETURN img || chorus.json_texts_entry(texts);
END
$$;

-- What a row image adds for the exact texts `texts` (see
-- chorus.with_json_texts): nothing when there are none.
CREATE OR REPLACE FUNCTION chorus.json_texts_entry(texts jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN texts = '{}' THEN '{}'::jsonb ELSE jsonb_build_object('', texts) END
$$;

-- A row image in SQL, for set-based statements over `rel` (aliased
-- `alias`): what the capture trigger makes of a row (to_jsonb, with
-- chorus.column_forms's `always` and `arrays` in their text form, and the
-- exact text of json values and JSON nulls, see chorus.with_json_texts).
CREATE OR REPLACE FUNCTION chorus.image_sql(rel regclass, keys text[], alias text) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT format('to_jsonb(%I.*)', alias)
           || coalesce(' || jsonb_build_object('
                       || (SELECT string_agg(format('%L, CASE WHEN %I.%I IS NULL THEN NULL ELSE format(''%%s'', %I.%I) END',
                                                    col, alias, col, alias, col), ', ')
                             FROM unnest(c.always || c.arrays) AS col)
                       || ')', '')
           || coalesce(' || chorus.json_texts_entry(jsonb_strip_nulls(jsonb_build_object('
                       || (SELECT string_agg(format('%L, CASE WHEN %L OR %I.%I::text = ''null'' THEN %I.%I::text END',
                                                    col, col = ANY (c.jsons), alias, col, alias, col), ', ')
                             FROM unnest(c.jsons || c.jsonbs) AS col)
                       || ')))', '')
      FROM chorus.column_forms(rel, keys) c
$$;

-- Whether the INSERTs and DELETEs of `leaf` (`root` itself or a partition
-- of it, with key columns `cols`) are captured by statement (see
-- chorus.capture_statement): a plain table (rows routed to a partition
-- fire no statement trigger of the partition's) outside any inheritance
-- (a statement on a parent fires no statement trigger of its children,
-- and its own transition tables hold their rows), whose primary key, if
-- any, is not deferrable (one statement may hold a key twice until its
-- commit), and whose every column to_jsonb carries exactly
-- (chorus.column_forms names none).
CREATE OR REPLACE FUNCTION chorus.by_statement(leaf regclass, root regclass, cols text[])
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT leaf = root
       AND (SELECT c.relkind = 'r' AND NOT c.relispartition FROM pg_class c WHERE c.oid = leaf)
       AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = leaf OR i.inhparent = leaf)
       AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                        WHERE k.conrelid = leaf AND k.contype = 'p' AND k.condeferrable)
       AND (SELECT cardinality(f.always || f.arrays || f.jsons || f.jsonbs) = 0
              FROM chorus.column_forms(root, cols) f)
$$;

-- Whether the UPDATEs of such a table are captured by statement too: it
-- has a key (a keyless table's updated row travels with its old image,
-- which a statement cannot pair with its new one), and no unique index
-- but its primary key and no exclusion constraint. An UPDATE by statement
-- is captured as a set of changes by key, applied by peers as a set where
-- the table allows it and otherwise one by one in the order sent; with
-- such an index, a peer applying one by one must meet the rows in the
-- order the origin's unique checks passed, which only chorus.capture
-- keeps. (A unique index or an inheritance made later makes the triggers
-- again: see chorus.remake_capture_triggers.)
CREATE OR REPLACE FUNCTION chorus.updates_by_statement(leaf regclass, root regclass, cols text[])
RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT cardinality(cols) > 0
       AND chorus.by_statement(leaf, root, cols)
       AND NOT EXISTS (SELECT 1 FROM pg_index i
                        WHERE i.indrelid = leaf AND i.indisunique AND NOT i.indisprimary)
       AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conrelid = leaf AND k.contype = 'x')
$$;

-- The capture triggers of one table (`leaf`, a partition of `root` or
-- `root` itself), with what they need to know as arguments: by statement
-- (chorus_capture_inserts, _deletes and _updates, see
-- chorus.capture_statement) where chorus.by_statement and
-- chorus.updates_by_statement say so, and for the rest by row
-- (chorus_capture, see chorus.capture). Marked internal, as PostgreSQL
-- marks the triggers of a foreign key: psql's \d and pg_dump leave them
-- out (the table looks as it would on one PostgreSQL), and only a
-- superuser can disable them (ALTER TABLE … DISABLE TRIGGER USER passes
-- them by), so a table's owner cannot quietly stop its replication.
CREATE OR REPLACE FUNCTION chorus.put_capture_trigger(leaf regclass, root regclass, cols text[],
                                                      keyless boolean, name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f record;
    by_row text[] := '{}';
    trigger_name text;
BEGIN
    SELECT c.always, c.arrays, c.jsons, c.jsonbs INTO f FROM chorus.column_forms(root, cols) c;
    FOR trigger_name IN SELECT t.tgname FROM pg_trigger t
                         WHERE t.tgrelid = leaf
                           AND t.tgname IN ('chorus_capture', 'chorus_capture_inserts',
                                            'chorus_capture_deletes', 'chorus_capture_updates') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trigger_name, leaf);
    END LOOP;
    IF chorus.by_statement(leaf, root, cols) THEN
        EXECUTE format('CREATE TRIGGER chorus_capture_inserts AFTER INSERT ON %s '
                       'REFERENCING NEW TABLE AS chorus_new '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_statement(%L, %L)',
                       leaf, coalesce(cols, '{}')::text, name);
        EXECUTE format('CREATE TRIGGER chorus_capture_deletes AFTER DELETE ON %s '
                       'REFERENCING OLD TABLE AS chorus_old '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_statement(%L, %L)',
                       leaf, coalesce(cols, '{}')::text, name);
    ELSE
        by_row := ARRAY['INSERT', 'DELETE'];
    END IF;
    IF chorus.updates_by_statement(leaf, root, coalesce(cols, '{}')) THEN
        EXECUTE format('CREATE TRIGGER chorus_capture_updates AFTER UPDATE ON %s '
                       'REFERENCING OLD TABLE AS chorus_old NEW TABLE AS chorus_new '
                       'FOR EACH STATEMENT EXECUTE FUNCTION chorus.capture_statement(%L, %L)',
                       leaf, coalesce(cols, '{}')::text, name);
    ELSE
        by_row := by_row || 'UPDATE'::text;
    END IF;
    IF cardinality(by_row) > 0 THEN
        EXECUTE format('CREATE TRIGGER chorus_capture AFTER %s ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION chorus.capture(%L, %L, %L, %L, %L, %L, %L)',
                       array_to_string(by_row, ' OR '), leaf, coalesce(cols, '{}')::text, keyless::text, name,
                       f.always::text, f.arrays::text, f.jsons::text, f.jsonbs::text);
    END IF;
    UPDATE pg_trigger t SET tgisinternal = true
     WHERE t.tgrelid = leaf AND NOT t.tgisinternal
       AND t.tgname IN ('chorus_capture', 'chorus_capture_inserts', 'chorus_capture_deletes',
                        'chorus_capture_updates');
END
$$;

-- Make the capture triggers of a replicated plain table again, when what
-- chorus.by_statement and chorus.updates_by_statement read of it has
-- changed without an ALTER TABLE of its own (which adopts it again): a
-- unique index made on it, a table made to inherit from it. Only a table
-- captured by statement has anything to change.
CREATE OR REPLACE FUNCTION chorus.remake_capture_triggers(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT r.tbl, r.pk_columns, r.keyless
               FROM chorus.replicated_table r
              WHERE to_regclass(r.tbl) = rel
                AND EXISTS (SELECT 1 FROM pg_trigger g
                             WHERE g.tgrelid = rel
                               AND g.tgname IN ('chorus_capture_inserts', 'chorus_capture_deletes',
                                                'chorus_capture_updates')) LOOP
        PERFORM chorus.put_capture_trigger(rel, rel, t.pk_columns, t.keyless, t.tbl);
    END LOOP;
END
$$;

-- The columns of a table present in a row image, in table order.
-- (PL/pgSQL, as the other helpers the apply calls for every table of every
-- batch: it keeps its plans for the session, where an SQL function with a
-- FROM clause is planned again at every call.)
CREATE OR REPLACE FUNCTION chorus.present_columns(rel text, img jsonb) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT array_agg(a.attname::text ORDER BY a.attnum)
              FROM pg_attribute a
             WHERE a.attrelid = rel::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = '' AND img ? a.attname);
END
$$;

-- The select list that reads columns `cols` of `rel` from a row image
-- (`img`, an SQL expression, populated as the record `k`): each column
-- from `k`, but a json or jsonb column (or a domain over one) from the
-- image's exact text when it carries one (see chorus.with_json_texts).
CREATE OR REPLACE FUNCTION chorus.image_columns(rel text, cols text[], img text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT string_agg(CASE WHEN u.c = ANY (f.jsons || f.jsonbs)
                           THEN format('CASE WHEN (%1$s -> '''') ? %2$L THEN ((%1$s -> '''') ->> %2$L)::%3$s ELSE k.%2$I END',
                                       img, u.c, CASE WHEN u.c = ANY (f.jsons) THEN 'json' ELSE 'jsonb' END)
                           ELSE format('k.%I', u.c) END, ', ' ORDER BY u.o)
      FROM chorus.column_forms(rel::regclass, '{}') f, unnest(cols) WITH ORDINALITY AS u(c, o)
$$;

-- Whether any of columns `cols` of `rel` is json or jsonb (or a domain
-- over one): then the rows of a batch of images are read one image at a
-- time, for chorus.image_columns.
-- (The json and jsonb columns as chorus.column_forms tells them, without
-- its look at every column's casts.)
CREATE OR REPLACE FUNCTION chorus.has_json_columns(rel text, cols text[]) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                    WHERE a.attrelid = rel::regclass AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.attname = ANY (cols)
                      AND CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
                          IN ('json'::regtype, 'jsonb'::regtype));
END
$$;

-- A column definition list (`a int4, b text`) of these columns of a
-- table, each with its type, or for a domain the type the domain is
-- over (domains of domains followed to the end).
CREATE OR REPLACE FUNCTION chorus.base_type_columns(rel text, cols text[]) RETURNS text
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE chain AS (
        SELECT a.attname, a.attnum, a.atttypid AS typ, a.atttypmod AS typmod
          FROM pg_attribute a
         WHERE a.attrelid = rel::regclass AND a.attname = ANY (cols) AND NOT a.attisdropped
        UNION ALL
        SELECT c.attname, c.attnum, t.typbasetype,
               CASE WHEN t.typtypmod <> -1 THEN t.typtypmod ELSE c.typmod END
          FROM chain c JOIN pg_type t ON t.oid = c.typ
         WHERE t.typtype = 'd'
    )
    SELECT string_agg(format('%I %s', c.attname, format_type(c.typ, c.typmod)), ', ' ORDER BY c.attnum)
      FROM chain c JOIN pg_type t ON t.oid = c.typ
     WHERE t.typtype <> 'd'
$$;

-- Capture triggers made before json and jsonb values carried their exact
-- text, and arrays of them their text form (with fewer than 7 arguments,
-- see chorus.put_capture_trigger), or before a plain table's changes were
-- captured by statement (a row trigger on its INSERTs and DELETEs, see
-- chorus.by_statement), are made again, once.
DO $$
DECLARE
    t record;
    prior_role text := current_setting('session_replication_role');
BEGIN
    FOR t IN SELECT g.tgrelid::regclass AS leaf, a[1] AS cols, a[2] AS keyless, a[3] AS name
               FROM pg_trigger g
              CROSS JOIN LATERAL string_to_array(encode(g.tgargs, 'escape'), E'\\000') AS a
              WHERE g.tgname = 'chorus_capture' AND to_regclass(a[3]) IS NOT NULL
                AND (g.tgnargs BETWEEN 3 AND 6
                     OR (g.tgtype & 12 <> 0  -- TRIGGER_TYPE_INSERT, TRIGGER_TYPE_DELETE
                         AND chorus.by_statement(g.tgrelid, to_regclass(a[3]), a[1]::text[])))
    LOOP
        -- (Chorus's own DDL: no event trigger sees it, see chorus.adopt.)
        PERFORM set_config('session_replication_role', 'replica', true);
        PERFORM chorus.put_capture_trigger(t.leaf, t.name::regclass, t.cols::text[],
                                           t.keyless::boolean, t.name);
    END LOOP;
    PERFORM set_config('session_replication_role', prior_role, true);
END
$$;
