-- Migration 5: a plain table's changes are captured by statement
-- (chorus.capture_statement; the capture triggers are made again at the
-- end of images.sql), and the apply writes a batch of rows none of which was
-- there with one INSERT: chorus.lock_rows returns how many rows it locked,
-- and chorus.write_rows is told when they are all new. Their old
-- signatures go; no table changes shape.
DROP FUNCTION IF EXISTS chorus.lock_rows(text, text[], jsonb);
DROP FUNCTION IF EXISTS chorus.write_rows(text, text[], jsonb);
