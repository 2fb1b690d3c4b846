-- Who may use what of the chorus schema, run after the schema and apply
-- functions are installed (by the installer, in the same transaction).
--
-- Application roles reach Chorus only through the capture trigger and the
-- DDL event trigger, which run as the schema's owner; they may read
-- nothing of chorus.* and run none of its functions but the ones made for
-- them. Triggers and event triggers fire without an EXECUTE check.
REVOKE ALL ON SCHEMA chorus FROM PUBLIC;
GRANT USAGE ON SCHEMA chorus TO PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA chorus FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA chorus FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA chorus FROM PUBLIC;
GRANT EXECUTE ON FUNCTION chorus.uuidv7(), chorus.sequence_status(), chorus.trusted_session(),
    chorus.ddl_settings(), chorus.capture_log_statement()
    TO PUBLIC;

-- Change records are transactional logical messages with the prefix
-- `chorus`: a role that could emit one could make peers apply any row.
-- Only the chorus schema's owner (and superusers) may emit messages.
DO $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
              WHERE p.proname = 'pg_logical_emit_message'
                AND p.pronamespace = 'pg_catalog'::regnamespace LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
END
$$;

-- The tables (and sequences of their own) of the chorus schema that do not
-- belong to chorus_owner yet: a sequence that belongs to a column moves
-- with its table.
CREATE OR REPLACE FUNCTION chorus.tables_to_own() RETURNS SETOF regclass
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT c.oid::regclass
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = 'chorus'::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND c.relowner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'chorus_owner')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype IN ('a', 'i')
                          AND d.refclassid = 'pg_catalog.pg_class'::regclass)
     ORDER BY c.oid
$$;
REVOKE EXECUTE ON FUNCTION chorus.tables_to_own() FROM PUBLIC;

-- Every object of Chorus's on this backend (the schema and all in it, the
-- event triggers, the publication) belongs to one role of its own,
-- chorus_owner, which nobody logs in as: the capture and DDL functions run
-- as it (SECURITY DEFINER), whichever role installed them, and the role
-- Chorus logs in with (replication.user) can change without the objects
-- changing hands. It is a superuser because what those functions do needs
-- one: they make internal triggers on new tables, and emit change
-- messages. Granting membership in it grants that.
--
-- The tables move afterwards, one per transaction (see
-- `chorus.tables_to_own` and capture.rs): changing a table's owner locks
-- it, and taking those locks together, under load, deadlocks with capture.
DO $$
DECLARE
    obj record;
    owner oid;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'chorus_owner') THEN
        CREATE ROLE chorus_owner NOLOGIN SUPERUSER;
    END IF;
    owner := (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'chorus_owner');
    IF (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'chorus') <> owner THEN
        ALTER SCHEMA chorus OWNER TO chorus_owner;
    END IF;
    FOR obj IN SELECT p.oid::regprocedure AS name, p.prokind
                 FROM pg_catalog.pg_proc p
                WHERE p.pronamespace = 'chorus'::regnamespace AND p.proowner <> owner LOOP
        EXECUTE format('ALTER %s %s OWNER TO chorus_owner',
                       CASE obj.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END, obj.name);
    END LOOP;
    FOR obj IN SELECT e.evtname FROM pg_catalog.pg_event_trigger e
                WHERE e.evtname LIKE 'chorus%' AND e.evtowner <> owner LOOP
        EXECUTE format('ALTER EVENT TRIGGER %I OWNER TO chorus_owner', obj.evtname);
    END LOOP;
    FOR obj IN SELECT p.pubname FROM pg_catalog.pg_publication p
                WHERE p.pubname = 'chorus' AND p.pubowner <> owner LOOP
        EXECUTE format('ALTER PUBLICATION %I OWNER TO chorus_owner', obj.pubname);
    END LOOP;
END
$$;
