-- `audit_date` is the Java module's `timestamp without time zone` (UTC wall time): the Java
-- module binds a `LocalDateTime` there and parses what it reads back without an offset, so a
-- `timestamptz` column would break its audit writes and history after a rollback. Schemas that
-- an earlier version of this service converted to `timestamptz` go back to it here.
DO $$
BEGIN
  IF EXISTS (
    SELECT 1 FROM information_schema.columns
    WHERE table_schema = current_schema() AND table_name = 'audit_message'
      AND column_name = 'audit_date' AND data_type = 'timestamp with time zone'
  ) THEN
    ALTER TABLE audit_message ALTER COLUMN audit_date TYPE timestamp USING audit_date AT TIME ZONE 'UTC';
  END IF;
END $$;
