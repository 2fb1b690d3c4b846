-- DDL that code runs (a DO block, a PL/pgSQL function): its text and role,
-- read from PostgreSQL's context stack, and the cluster DDL lease that a
-- session asks its node for when such DDL comes without one. Used by
-- chorus.handle_ddl (ddl.sql).

-- Whether `q` is one statement: no `;` but at its end, reading literals,
-- quoted names, dollar quotes and comments as PostgreSQL's lexer does. (A
-- function body in `BEGIN ATOMIC … END` counts as several.) It walks the
-- bytes once: DDL run from a function can be long (a CREATE FUNCTION).
CREATE OR REPLACE FUNCTION chorus.single_statement(q text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    b bytea := convert_to(q, 'UTF8');
    n integer := length(b);
    i integer := 0;
    c integer;
    e integer;
    depth integer;
    quote bytea;
    escapes boolean;
    ended boolean := false;
BEGIN
    WHILE i < n LOOP
        c := get_byte(b, i);
        IF c IN (9, 10, 11, 12, 13, 32) THEN
            i := i + 1;
        ELSIF c = 45 AND i + 1 < n AND get_byte(b, i + 1) = 45 THEN
            -- -- to the end of the line
            e := position('\x0a'::bytea IN substring(b FROM i + 1));
            i := CASE WHEN e = 0 THEN n ELSE i + e END;
        ELSIF c = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN
            -- /* … */, nested
            depth := 1;
            i := i + 2;
            WHILE i < n AND depth > 0 LOOP
                IF get_byte(b, i) = 47 AND i + 1 < n AND get_byte(b, i + 1) = 42 THEN
                    depth := depth + 1;
                    i := i + 2;
                ELSIF get_byte(b, i) = 42 AND i + 1 < n AND get_byte(b, i + 1) = 47 THEN
                    depth := depth - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF ended THEN
            -- Something after a `;`.
            RETURN false;
        ELSIF c = 59 THEN
            ended := true;
            i := i + 1;
        ELSIF c IN (39, 34) THEN
            -- '…' (E'…' with backslash escapes) or "…", a doubled quote
            -- inside
            escapes := c = 39
                       AND ((i > 0 AND get_byte(b, i - 1) IN (69, 101)
                             AND (i = 1 OR NOT (get_byte(b, i - 2) >= 128
                                                OR chr(get_byte(b, i - 2)) ~ '[A-Za-z0-9_$]')))
                            OR current_setting('standard_conforming_strings') = 'off');
            i := i + 1;
            LOOP
                EXIT WHEN i >= n;
                IF escapes AND get_byte(b, i) = 92 THEN
                    i := i + 2;
                ELSIF get_byte(b, i) = c THEN
                    i := i + 1;
                    EXIT WHEN i >= n OR get_byte(b, i) <> c;
                    i := i + 1;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
        ELSIF c = 36 AND NOT (i > 0 AND (chr(get_byte(b, i - 1)) ~ '[A-Za-z0-9_$]' OR get_byte(b, i - 1) >= 128)) THEN
            -- $tag$ … $tag$ (a `$` not inside a name; $1 is a parameter)
            e := i + 1;
            WHILE e < n AND (chr(get_byte(b, e)) ~ '[A-Za-z_]' OR get_byte(b, e) >= 128
                             OR (e > i + 1 AND chr(get_byte(b, e)) ~ '[0-9]')) LOOP
                e := e + 1;
            END LOOP;
            IF e < n AND get_byte(b, e) = 36 THEN
                quote := substring(b FROM i + 1 FOR e - i + 1);
                depth := position(quote IN substring(b FROM e + 2));
                i := CASE WHEN depth = 0 THEN n ELSE e + depth + length(quote) END;
            ELSE
                i := i + 1;
            END IF;
        ELSE
            i := i + 1;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- Where the DDL statement this event trigger fires for comes from. A
-- statement the client sent has no frame below this trigger's own in
-- PostgreSQL's context stack (GET DIAGNOSTICS … PG_CONTEXT); one that a
-- function or a DO block ran has the frames of its callers: for PL/pgSQL's
-- SQL statements and EXECUTE (and any SPI query), `SQL statement "<its
-- text>"` first. (An SQL-language function's statement shows as `SQL
-- function "f" statement N`, without its text: `statement` is NULL.)
-- `definer` is the owner of the innermost SECURITY DEFINER function among
-- the callers, the role the statement ran as; `unsure` names a caller that
-- may be SECURITY DEFINER but could not be told apart from others of its
-- name.
CREATE OR REPLACE FUNCTION chorus.nested_ddl(user_path text, OUT nested boolean, OUT statement text,
                                             OUT definer text, OUT unsure text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stack text;
    marker text := E'\nPL/pgSQL function chorus.capture_ddl() line ';
    at integer;
    line text;
    signature text;
    name text;
    fn regprocedure;
BEGIN
    nested := false;
    GET DIAGNOSTICS stack = PG_CONTEXT;
    at := position(marker IN stack);
    IF at = 0 THEN
        RETURN;
    END IF;
    stack := substr(stack, at + length(marker));
    at := position(E'\n' IN stack);
    IF at = 0 THEN
        RETURN;
    END IF;
    stack := substr(stack, at + 1);
    nested := true;
    -- The text ends at the first quote followed by a caller's frame (or
    -- at the last quote, when no frame follows: a C function's SPI).
    statement := substring(stack FROM E'^SQL statement "(.*?)"\\n(?:PL/[^\\n]* function |SQL function ")');
    IF statement IS NULL THEN
        statement := substring(stack FROM E'^SQL statement "(.*)"$');
    END IF;
    FOR line IN SELECT l.l FROM regexp_split_to_table(stack, E'\n') WITH ORDINALITY AS l(l, n) ORDER BY l.n LOOP
        IF line ~ '^PL/pgSQL function .* line [0-9]+ at ' THEN
            signature := substring(line FROM '^PL/pgSQL function (.*) line [0-9]+ at ');
            CONTINUE WHEN signature = 'inline_code_block';
            -- (Printed as the function's path showed it when compiled.)
            PERFORM set_config('search_path', user_path, true);
            fn := to_regprocedure(signature);
            PERFORM set_config('search_path', 'pg_catalog, pg_temp', true);
            name := regexp_replace(regexp_replace(signature, E'\\(.*$', ''), E'^.*\\.', '');
        ELSIF line ~ '^(SQL|PL/[A-Za-z]+) function "' THEN
            fn := NULL;
            name := substring(line FROM '^(?:SQL|PL/[A-Za-z]+) function "(.*?)"');
        ELSE
            CONTINUE;
        END IF;
        IF fn IS NOT NULL THEN
            IF (SELECT p.prosecdef FROM pg_proc p WHERE p.oid = fn) THEN
                SELECT pg_get_userbyid(p.proowner)::text INTO definer FROM pg_proc p WHERE p.oid = fn;
                RETURN;
            END IF;
        ELSIF EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = btrim(name, '"') AND p.prosecdef) THEN
            unsure := name;
            RETURN;
        END IF;
    END LOOP;
END
$$;

-- DDL that a function runs in a transaction without the cluster DDL lease
-- (a `SELECT f()` or `CALL p()` that Chorus could not see coming): the
-- session asks its Chorus node for the lease, mid-statement, and waits for
-- the answer. The question is a NOTICE (`chorus:lease <n>`, n a number
-- from chorus.lease_question, unique to the question), which the backend
-- sends at once and the node keeps from the client. The answer comes in the
-- sequence chorus.lease_grant, which a transaction reads as it is now,
-- whatever its snapshot: the question's number in the high 32 bits, and in
-- the low ones the lease's number, or, with bit 31 set, why it was refused
-- (1: another transaction holds it, 2: no Raft majority in time, 3: the
-- node cannot replicate DDL now, 4: another failure). Only one session in
-- the cluster holds the lease at a time, so one sequence serves every
-- session of the backend. A session that does not come through a Chorus
-- node (no `chorus.lease_wait_ms`, set at login) has no one to ask.
CREATE SEQUENCE IF NOT EXISTS chorus.lease_question MINVALUE 1 MAXVALUE 2147483647 CYCLE;
CREATE SEQUENCE IF NOT EXISTS chorus.lease_grant MINVALUE 0 START 0;

CREATE OR REPLACE FUNCTION chorus.ask_lease(tag text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    question bigint;
    answer bigint;
    level text := current_setting('client_min_messages');
    wait_ms bigint := coalesce(nullif(current_setting('chorus.lease_wait_ms', true), '')::bigint, 0);
    deadline timestamptz;
    refused bigint;
BEGIN
    IF wait_ms <= 0 OR coalesce(current_setting('chorus.origin', true), '') = '' THEN
        RAISE EXCEPTION '% run from a function cannot be replicated here: Chorus did not see DDL coming in this transaction', tag
            USING ERRCODE = '0A000',
                  HINT = 'Run it through a Chorus node, or SET chorus.ddl_scope = ''local'' to run it on this backend only.';
    END IF;
    question := nextval('chorus.lease_question');
    deadline := clock_timestamp() + make_interval(secs => wait_ms / 1000.0);
    -- The question reaches the node whatever the client asked to hear.
    PERFORM set_config('client_min_messages', 'notice', true);
    RAISE NOTICE 'chorus:lease %', question;
    PERFORM set_config('client_min_messages', level, true);
    LOOP
        SELECT g.last_value INTO answer FROM chorus.lease_grant g;
        EXIT WHEN answer >> 32 = question;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION '% run from a function cannot be replicated: no answer from the Chorus node for the cluster DDL lease within % ms', tag, wait_ms
                USING ERRCODE = '55P03';
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
    answer := answer & 4294967295;
    IF answer >= 2147483648 THEN
        refused := answer - 2147483648;
        RAISE EXCEPTION '% run from a function cannot be replicated now: %', tag,
            CASE refused WHEN 1 THEN 'another transaction with DDL is open in the cluster'
                         WHEN 2 THEN 'the cluster DDL lease was not confirmed by a Raft majority in time'
                         WHEN 3 THEN 'this node cannot replicate DDL now'
                         ELSE 'the cluster DDL lease could not be taken' END
            USING ERRCODE = CASE refused WHEN 1 THEN '55P03' WHEN 2 THEN '40003' WHEN 3 THEN '55000' ELSE 'XX000' END,
                  HINT = 'Another transaction with DDL is open in the cluster, or this node cannot reach a Raft majority; retry.';
    END IF;
    PERFORM set_config('chorus.ddl_seq', answer::text, true);
    RETURN answer;
END
$$;
