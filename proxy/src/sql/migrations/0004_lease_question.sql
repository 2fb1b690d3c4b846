-- Migration 4: a session asks its node for the cluster DDL lease when a
-- function it called runs DDL (chorus.ask_lease, which ddl.sql defines with
-- the sequences of question and answer), and json and jsonb values carry
-- their exact text (chorus.column_forms, which replaces text_columns; the
-- capture triggers are made again with their new arguments at the end of
-- capture.sql). No table changes shape.
DROP FUNCTION IF EXISTS chorus.text_columns(regclass, text[]);
