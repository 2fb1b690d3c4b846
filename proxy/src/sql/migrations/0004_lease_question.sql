-- Migration 4: a session asks its node for the cluster DDL lease when a
-- function it called runs DDL (chorus.ask_lease, which ddl.sql defines with
-- the sequence the answer comes in). No table changes shape.
SELECT 1;
