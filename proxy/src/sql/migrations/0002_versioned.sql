-- Migration 2: from any schema installed before versions were recorded
-- (version 1) to version 2. The definitions that follow it (capture.sql,
-- apply.sql, privileges.sql) create what is missing and replace every
-- function; this brings older tables to their shape and drops what
-- earlier layouts had and this one does not.

-- Columns added over time.
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS sequence_id integer;
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS driver_epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.applied ADD COLUMN IF NOT EXISTS max_version bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.applied ADD COLUMN IF NOT EXISTS driver_epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.conflict ADD COLUMN IF NOT EXISTS detail text;

-- replicated_table.keyless was named insert_only before such tables
-- replicated updates and deletes.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                WHERE a.attrelid = 'chorus.replicated_table'::regclass AND a.attname = 'insert_only') THEN
        ALTER TABLE chorus.replicated_table RENAME COLUMN insert_only TO keyless;
    END IF;
END
$$;

-- Writers of one row key serialized on an advisory lock per key, which
-- filled PostgreSQL's lock table in transactions of some thousand rows;
-- they serialize on the key's chorus.row_version row now.
DROP FUNCTION IF EXISTS chorus.key_lock(text, jsonb);
-- Folded into chorus.capture.
DROP FUNCTION IF EXISTS chorus.record(text, text, jsonb, jsonb, bigint, integer);
-- Renamed chorus.sequence_status.
DROP FUNCTION IF EXISTS chorus.galloc_status();
-- Apply functions of earlier layouts, replaced.
DROP FUNCTION IF EXISTS chorus.write_row(text, text[], jsonb);
DROP FUNCTION IF EXISTS chorus.apply_ddl(jsonb);
-- Took no driver epoch.
DROP FUNCTION IF EXISTS chorus.apply_transactions(integer, jsonb, bigint, pg_lsn);
-- Nested DDL is counted for every statement now (chorus.note_ddl_start).
DROP EVENT TRIGGER IF EXISTS chorus_extension;
DROP FUNCTION IF EXISTS chorus.note_extension();
