-- Global sequences on every backend (installed after capture.sql and
-- images.sql, before ddl_code.sql and ddl.sql; see cluster/capture.rs, SCHEMA_SQL).

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
-- (capped at 1/128 of the values from the sequence's START up). Backends
-- with ids up to 64 start with a block of their own, the first (id 1) at
-- START; the ranges the Raft log allocates start above the 64 initial
-- blocks.
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
    base bigint;
BEGIN
    SELECT format('%I.%I', n.nspname, c.relname), s.seqtypid::regtype::text, s.seqmax, s.seqincrement,
           s.seqstart
      INTO name, typ, maxv, step, base
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
        -- Values from START up, as on PostgreSQL; from 1 when too few
        -- are left above it for 128 blocks.
        -- (In numeric: from a bigint's lowest value, the difference
        -- overflows.)
        IF maxv::numeric - base < 127 THEN
            base := 1;
        END IF;
        block := greatest(1, least(block::numeric, div(maxv::numeric - base + 1, 128)))::bigint;
        IF node BETWEEN 1 AND 64 THEN
            lo := base + (node - 1) * block;
            hi := base + node * block - 1;
            EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1 MINVALUE %s MAXVALUE %s NO CYCLE START WITH %s RESTART WITH %s',
                           seq, lo, hi, lo, lo);
        ELSE
            -- No initial block: closed (its next nextval fails) until the
            -- node has a range from the Raft log.
            EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1 MINVALUE 1 MAXVALUE %s NO CYCLE START WITH 1', seq, maxv);
            PERFORM setval(seq, maxv, true);
        END IF;
        INSERT INTO chorus.global_sequence (seq, kind, range_lo, range_hi, block, floor)
        VALUES (name, 'galloc', lo, hi, block, base + 64 * block)
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
