-- Migration 3: tombstones are pruned (see tombstones.sql), which bounds how
-- old a transaction's stamp may be.
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS stamp_age_ms bigint NOT NULL DEFAULT 300000;
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS stamp_age_prev_ms bigint NOT NULL DEFAULT 300000;
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS stamp_age_changed_at timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS pruned_below bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS pruned_at timestamptz;
ALTER TABLE chorus.local ADD COLUMN IF NOT EXISTS horizon_sent bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.applied ADD COLUMN IF NOT EXISTS horizon bigint NOT NULL DEFAULT 0;
ALTER TABLE chorus.applied ADD COLUMN IF NOT EXISTS complete bigint NOT NULL DEFAULT 0;
-- Transactions that began before this upgrade may hold a stamp of any age:
-- until they are over, nothing is old enough to prune (chorus.horizon).
UPDATE chorus.local SET stamp_age_prev_ms = 1::bigint << 40, stamp_age_changed_at = now();
