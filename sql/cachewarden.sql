-- cachewarden: invalidate cache entries from row changes (README, "PostgreSQL triggers").
--
-- Install once per database:   psql "$DATABASE_URL" -f sql/cachewarden.sql
-- Attach to a table:
--
--   CREATE TRIGGER personas_cachewarden
--     AFTER INSERT OR UPDATE OR DELETE ON personas
--     FOR EACH ROW EXECUTE FUNCTION cachewarden_notify('user_id', 'analytics:{user_id}');
--
-- Arguments (all optional, trigger arguments are text):
--   1. the user column: its value goes into `userIds` (every entry of that user).
--      '' means none (only the tags are invalidated).
--   2.. tag templates: `{column}` is replaced by the row's value of that column, e.g.
--      'analytics:{user_id}' or 'org:{org_id}:reports'. A template whose column is NULL
--      or empty in the row is skipped.
--   An argument 'mode=stale' (anywhere after the first) marks entries stale instead of
--   deleting them.
--
-- On INSERT the new row is used, on DELETE the old one, on UPDATE both: when a row moves
-- from one user to another, both users' entries go. An UPDATE that changes nothing sends
-- nothing. The notification goes out on commit (NOTIFY is transactional), on the channel
-- set by `cachewarden.channel` (ALTER DATABASE ... SET cachewarden.channel = '...'),
-- default 'cachewarden', and carries a selector:
--   {"userIds":["42"],"tags":["analytics:42"],"mode":"delete","reason":"public.personas UPDATE"}
-- TRUNCATE fires no row trigger: invalidate through the API after one.
--
-- It must be attached AFTER ... FOR EACH ROW: attached BEFORE it would cancel the row change
-- (a trigger function returning NULL does that), and FOR EACH STATEMENT it has no row to read,
-- so either raises an error in the writing statement. A user id or tag longer than 128 bytes
-- (more than any cache entry can carry) is left out; a selector too long for one
-- notification (PostgreSQL's limit is 8000 bytes) goes out as several.

CREATE OR REPLACE FUNCTION cachewarden_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
  user_column text := CASE WHEN TG_NARGS > 0 THEN TG_ARGV[0] ELSE '' END;
  mode text := 'delete';
  templates text[] := '{}';
  images jsonb[] := '{}';
  r jsonb;
  tmpl text;
  tag text;
  col text;
  val text;
  user_ids text[] := '{}';
  tags text[] := '{}';
  rest text;
  m text[];
  at int;
  reason text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME || ' ' || TG_OP;
  payload text;
  channel text := coalesce(nullif(current_setting('cachewarden.channel', true), ''), 'cachewarden');
BEGIN
  IF TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'ROW' THEN
    RAISE EXCEPTION 'cachewarden_notify must be attached AFTER ... FOR EACH ROW (on %.% it is % ... FOR EACH %)',
      TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_WHEN, TG_LEVEL;
  END IF;
  FOR i IN 1 .. TG_NARGS - 1 LOOP
    IF TG_ARGV[i] IN ('mode=stale', 'mode=delete') THEN
      mode := substr(TG_ARGV[i], 6);
    ELSIF TG_ARGV[i] <> '' THEN
      templates := templates || TG_ARGV[i];
    END IF;
  END LOOP;

  IF TG_OP = 'UPDATE' THEN
    -- jsonb has equality where some column types (json, point) have none.
    IF to_jsonb(OLD) = to_jsonb(NEW) THEN
      RETURN NULL;
    END IF;
    images := ARRAY[to_jsonb(OLD), to_jsonb(NEW)];
  ELSIF TG_OP = 'INSERT' THEN
    images := ARRAY[to_jsonb(NEW)];
  ELSE
    images := ARRAY[to_jsonb(OLD)];
  END IF;

  FOREACH r IN ARRAY images LOOP
    IF user_column <> '' THEN
      IF NOT r ? user_column THEN
        RAISE EXCEPTION 'cachewarden_notify: table %.% has no column "%"', TG_TABLE_SCHEMA, TG_TABLE_NAME, user_column;
      END IF;
      val := r ->> user_column;
      IF val IS NOT NULL AND val <> '' AND octet_length(val) <= 128 AND NOT val = ANY (user_ids) THEN
        user_ids := user_ids || val;
      END IF;
    END IF;
    FOREACH tmpl IN ARRAY templates LOOP
      -- Placeholders are filled left to right in one pass, so a value holding `{col}` is
      -- kept as it is, not filled in turn.
      tag := '';
      rest := tmpl;
      LOOP
        m := regexp_match(rest, '\{([A-Za-z_][A-Za-z0-9_]*)\}');
        EXIT WHEN m IS NULL;
        col := m[1];
        IF NOT r ? col THEN
          RAISE EXCEPTION 'cachewarden_notify: table %.% has no column "%" (tag template "%")',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, col, tmpl;
        END IF;
        val := r ->> col;
        IF val IS NULL OR val = '' THEN
          tag := NULL;
          EXIT;
        END IF;
        at := position('{' || col || '}' IN rest);
        tag := tag || substr(rest, 1, at - 1) || val;
        rest := substr(rest, at + length(col) + 2);
      END LOOP;
      IF tag IS NOT NULL THEN
        tag := tag || rest;
        IF octet_length(tag) <= 128 AND NOT tag = ANY (tags) THEN
          tags := tags || tag;
        END IF;
      END IF;
    END LOOP;
  END LOOP;

  IF cardinality(user_ids) = 0 AND cardinality(tags) = 0 THEN
    RETURN NULL;
  END IF;
  payload := jsonb_build_object('userIds', to_jsonb(user_ids), 'tags', to_jsonb(tags), 'mode', mode, 'reason', reason)::text;
  IF octet_length(payload) < 8000 THEN
    PERFORM pg_notify(channel, payload);
    RETURN NULL;
  END IF;
  -- Too long for one notification: the users in one (at most two, of 128 bytes), each tag in its own.
  IF cardinality(user_ids) > 0 THEN
    PERFORM pg_notify(channel, jsonb_build_object('userIds', to_jsonb(user_ids), 'mode', mode, 'reason', reason)::text);
  END IF;
  FOREACH tag IN ARRAY tags LOOP
    PERFORM pg_notify(channel, jsonb_build_object('tags', jsonb_build_array(tag), 'mode', mode, 'reason', reason)::text);
  END LOOP;
  RETURN NULL;
END;
$$;
