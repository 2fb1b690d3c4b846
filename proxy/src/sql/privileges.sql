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
