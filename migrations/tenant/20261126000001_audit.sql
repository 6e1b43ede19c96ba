-- Per-tenant schema `<tenant>_mod_pubsub`: the audit trail. Applied with search_path set to the
-- tenant's schema, so names are unqualified. Idempotent against the Java module's tables.

DO $$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = current_schema() AND t.typname = 'message_state'
  ) THEN
    CREATE TYPE message_state AS ENUM ('CREATED', 'PUBLISHED', 'RECEIVED', 'DELIVERED', 'REJECTED');
  END IF;
END $$;

CREATE TABLE IF NOT EXISTS audit_message_payload (
  event_id uuid PRIMARY KEY,
  content  jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS audit_message (
  id             uuid PRIMARY KEY,
  event_id       uuid NOT NULL,
  event_type     text NOT NULL,
  correlation_id text,
  tenant_id      text NOT NULL,
  created_by     text,
  audit_date     timestamp NOT NULL,
  state          message_state NOT NULL,
  published_by   text NOT NULL,
  error_message  text
);

CREATE INDEX IF NOT EXISTS audit_message_audit_date_idx ON audit_message (audit_date);
CREATE INDEX IF NOT EXISTS audit_message_event_id_idx ON audit_message (event_id);
CREATE INDEX IF NOT EXISTS audit_message_event_type_date_idx ON audit_message (event_type, audit_date);
CREATE INDEX IF NOT EXISTS audit_message_correlation_id_idx ON audit_message (correlation_id);
