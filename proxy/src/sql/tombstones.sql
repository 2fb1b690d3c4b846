-- Pruning tombstones: the versions chorus.row_version keeps for deleted
-- rows, so that an older change of the same key that arrives later is not
-- applied (it would bring the row back on one backend only).
--
-- A tombstone of version V can go on backend B once no change older than
-- V can still reach B, and every backend has the delete:
--
-- * from each other backend O: every change O will capture from now on
--   is newer than O's horizon (chorus.horizon), which O sends through its
--   streams (chorus.emit_horizon) after every older change of its own;
--   B notes it once it has applied everything before it
--   (chorus.note_horizon, run by the stream's driver);
-- * from B's own sessions: every change B will capture is newer than B's
--   horizon, so a row inserted again after its tombstone went is still
--   newer than the delete on every backend that keeps it;
-- * every backend has every change older than V: each sends, with its
--   horizon, the least of its own and those it has noted ("complete"),
--   so reconciliation (reconcile.rs) finds no backend without the delete.
--
-- B prunes below the least of these (chorus.prune_tombstones). A backend
-- that is down, or whose horizon is not known, holds pruning back
-- everywhere, and so does a transaction that stays open after writing (as
-- it holds back VACUUM); a session's stamp left from long ago does not
-- (chorus.fresh_stamp).

-- A transaction's stamp (the proxy's, or this backend's clock without
-- one), made no older than this backend's clock by more than
-- chorus.local.stamp_age_ms, and no older than the last horizon this
-- backend sent (a promise, see chorus.emit_horizon). A session's stamp can
-- be left from a write long ago (a write inside a function a SELECT calls
-- is not stamped again), and chorus.horizon counts on the bound.
-- (PL/pgSQL: it keeps its plan for the session, where an SQL function
-- with a FROM clause is planned again at every call; this runs for every
-- captured transaction.)
CREATE OR REPLACE FUNCTION chorus.fresh_stamp(stamp bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN (SELECT greatest(stamp, c.now_hlc - (l.stamp_age_ms << 22), l.horizon_sent,
                            CASE WHEN stamp IS NULL THEN c.now_hlc END)
              FROM (SELECT chorus.clock_hlc() AS now_hlc) c LEFT JOIN chorus.local l ON true);
END
$$;

-- Set how old a stamp may be. Transactions that began before a decrease
-- may hold a stamp of the older bound: chorus.horizon uses the larger one
-- for them.
CREATE OR REPLACE FUNCTION chorus.set_stamp_age(ms bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE chorus.local l
       SET stamp_age_prev_ms = CASE WHEN ms < l.stamp_age_ms
                                    THEN greatest(l.stamp_age_ms, l.stamp_age_prev_ms)
                                    ELSE l.stamp_age_prev_ms END,
           stamp_age_changed_at = CASE WHEN ms < l.stamp_age_ms THEN clock_timestamp()
                                       ELSE l.stamp_age_changed_at END,
           stamp_age_ms = ms
     WHERE l.stamp_age_ms <> ms
$$;

-- This backend's horizon: a version older than every version a change
-- captured here from now on can carry. A transaction's changes are newer
-- than its stamp, which is no older than the moment it pinned it (in its
-- first captured change) less the stamp age: so the horizon is the start
-- of the oldest transaction that has written (or now), less the stamp
-- age. NULL when that cannot be told: a prepared transaction may hold a
-- stamp of any age, and the start of another role's session is hidden from
-- a role without pg_read_all_stats.
CREATE OR REPLACE FUNCTION chorus.horizon() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    -- Read before the sessions are: a transaction that takes its id after
    -- they were read pins its stamp after this.
    t0 timestamptz := clock_timestamp();
    oldest timestamptz;
    hidden boolean;
    age bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_prepared_xacts) THEN
        RETURN NULL;
    END IF;
    SELECT min(a.xact_start), bool_or(a.xact_start IS NULL) INTO oldest, hidden
      FROM pg_stat_activity a WHERE a.backend_xid IS NOT NULL;
    IF hidden THEN
        RETURN NULL;
    END IF;
    oldest := least(t0, oldest);
    SELECT CASE WHEN oldest < l.stamp_age_changed_at THEN greatest(l.stamp_age_ms, l.stamp_age_prev_ms)
                ELSE l.stamp_age_ms END
      INTO age FROM chorus.local l;
    RETURN (floor(extract(epoch FROM oldest) * 1000)::bigint - 1704067200000 - age) << 22;
END
$$;

-- Send this backend's horizon to its peers, through its streams, after
-- every change of its own that is older, with what it has applied of the
-- other backends in `origins` ("complete"). A horizon sent is a promise
-- (chorus.fresh_stamp keeps it): it never goes back, even when the stamp
-- age grows. Returns it (NULL: not known now, and nothing is sent).
CREATE OR REPLACE FUNCTION chorus.emit_horizon(origins integer[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    h bigint := chorus.horizon();
    complete bigint;
BEGIN
    IF h IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE chorus.local l SET horizon_sent = greatest(l.horizon_sent, h) RETURNING l.horizon_sent INTO h;
    complete := least(h, (SELECT min(coalesce(a.horizon, 0))
                            FROM unnest(origins) o LEFT JOIN chorus.applied a ON a.origin = o));
    PERFORM pg_logical_emit_message(true, 'chorus-horizon', h::text || ' ' || coalesce(complete, h)::text);
    RETURN h;
END
$$;

-- A horizon of `org` has arrived here (see chorus.emit_horizon), after
-- every change of `org` before it has been applied: `h`, its own, and
-- `complete`, below which it has every change of every origin.
CREATE OR REPLACE FUNCTION chorus.note_horizon(org integer, h bigint, complete bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO chorus.applied AS a (origin, lsn, horizon, complete) VALUES (org, '0/0', h, complete)
    ON CONFLICT (origin) DO UPDATE SET horizon = greatest(a.horizon, excluded.horizon),
                                       complete = greatest(a.complete, excluded.complete)
$$;

-- Delete up to `max_rows` tombstones that every backend has, and that no
-- older change can reach any more: older than what this backend has
-- applied and will capture (chorus.complete_below), and than what each of
-- `origins` (every other backend of the cluster) said it has (its
-- `complete`). A backend that has not applied a delete yet may still get
-- an older change of the row from reconciliation (see cluster/reconcile.rs),
-- which the tombstone stops. Rows a writer holds are left for the next
-- time. Returns how many went.
CREATE OR REPLACE FUNCTION chorus.prune_tombstones(origins integer[], max_rows integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    below bigint := chorus.horizon();
    pruned bigint;
BEGIN
    IF below IS NULL THEN
        RETURN 0;
    END IF;
    below := least(below, (SELECT min(least(coalesce(a.horizon, 0), coalesce(a.complete, 0)))
                             FROM unnest(origins) o LEFT JOIN chorus.applied a ON a.origin = o));
    IF below <= 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM chorus.row_version v
     WHERE v.ctid = ANY (ARRAY(SELECT t.ctid FROM chorus.row_version t
                                WHERE t.deleted AND t.version < below AND t.pk <> '{}'
                                LIMIT max_rows FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS pruned = ROW_COUNT;
    UPDATE chorus.local SET pruned_below = greatest(pruned_below, below), pruned_at = now();
    RETURN pruned;
END
$$;
