-- Module schema `pubsub_config`: event descriptors and messaging-module registrations.
--
-- Idempotent against a database that the Java module (Liquibase) created: every object is
-- created only when missing, so the service starts on the Java module's final tables and adds
-- what they lack (a unique registration key, lookup indexes, registration timestamps).

DO $$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'pubsub_config' AND t.typname = 'module_role_enum'
  ) THEN
    CREATE TYPE pubsub_config.module_role_enum AS ENUM ('PUBLISHER', 'SUBSCRIBER');
  END IF;
END $$;

CREATE TABLE IF NOT EXISTS pubsub_config.event_descriptor (
  id         text PRIMARY KEY,
  descriptor jsonb NOT NULL
);

CREATE TABLE IF NOT EXISTS pubsub_config.messaging_module (
  id                  uuid PRIMARY KEY,
  event_type_id       text NOT NULL CONSTRAINT fk_event_type_id REFERENCES pubsub_config.event_descriptor (id),
  tenant_id           text NOT NULL,
  role                pubsub_config.module_role_enum NOT NULL,
  subscriber_callback text,
  module_id           text NOT NULL,
  activated           boolean NOT NULL DEFAULT true
);

ALTER TABLE pubsub_config.messaging_module
  ADD COLUMN IF NOT EXISTS created_date timestamptz NOT NULL DEFAULT now();

-- The Java module had no unique key, so an adopted table may hold duplicates: keep one of each.
DELETE FROM pubsub_config.messaging_module a
  USING pubsub_config.messaging_module b
  WHERE a.tenant_id = b.tenant_id AND a.role = b.role AND a.module_id = b.module_id
    AND a.event_type_id = b.event_type_id AND a.id > b.id;

DO $$
BEGIN
  IF NOT EXISTS (
    SELECT 1 FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
    WHERE n.nspname = 'pubsub_config' AND c.conname = 'messaging_module_registration_key'
  ) THEN
    ALTER TABLE pubsub_config.messaging_module
      ADD CONSTRAINT messaging_module_registration_key UNIQUE (tenant_id, role, module_id, event_type_id);
  END IF;
END $$;

CREATE INDEX IF NOT EXISTS messaging_module_event_type_idx
  ON pubsub_config.messaging_module (event_type_id, tenant_id, role);

-- `_tenant` 2.0 jobs, shared by all instances so that any instance can answer Okapi's polls.
CREATE TABLE IF NOT EXISTS pubsub_config.tenant_job (
  id           uuid PRIMARY KEY,
  tenant_id    text NOT NULL,
  attributes   jsonb NOT NULL,
  complete     boolean NOT NULL DEFAULT false,
  error        text,
  messages     jsonb NOT NULL DEFAULT '[]'::jsonb,
  created_date timestamptz NOT NULL DEFAULT now(),
  updated_date timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS tenant_job_tenant_idx ON pubsub_config.tenant_job (tenant_id);
