-- What the Java module's tenant API expects in `<tenant>_mod_pubsub`, so that it can take a
-- tenant over again (a rollback):
-- * Liquibase's `databasechangelog` listing the Java tenant changelog
--   (tests/fixtures/java/liquibase-changesets.tsv), or its `liquibase update` stops on
--   `audit_message_payload`, which exists;
-- * RMB's `rmb_internal` with its row, or RMB answers 400 for a tenant whose schema exists;
-- * the role `<tenant>_mod_pubsub`, which RMB logs in as and ALTERs on every upgrade, created
--   as RMB creates it (password: the tenant id) where our database user may create roles.
-- On a schema the Java module created, all of it exists and nothing is changed.
CREATE TABLE IF NOT EXISTS databasechangeloglock (
  id          integer PRIMARY KEY,
  locked      boolean NOT NULL,
  lockgranted timestamp,
  lockedby    varchar(255)
);
INSERT INTO databasechangeloglock (id, locked) VALUES (1, false) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS databasechangelog (
  id            varchar(255) NOT NULL,
  author        varchar(255) NOT NULL,
  filename      varchar(255) NOT NULL,
  dateexecuted  timestamp NOT NULL,
  orderexecuted integer NOT NULL,
  exectype      varchar(10) NOT NULL,
  md5sum        varchar(35),
  description   varchar(255),
  comments      varchar(255),
  tag           varchar(255),
  liquibase     varchar(20),
  contexts      varchar(255),
  labels        varchar(255),
  deployment_id varchar(10)
);

-- MD5SUM stays NULL: Liquibase then computes and stores it without running the changeSet (the
-- checksums of changeSets that use ${database.defaultSchemaName} differ per schema). Rows are
-- matched the way Liquibase matches them: ID, AUTHOR, FILENAME (case-insensitively).
INSERT INTO databasechangelog
  (id, author, filename, dateexecuted, orderexecuted, exectype, md5sum, comments, liquibase, deployment_id)
SELECT c.id, c.author, c.filename, now() AT TIME ZONE 'UTC',
       (SELECT coalesce(max(orderexecuted), 0) FROM databasechangelog) + c.n,
       'EXECUTED', NULL, 'recorded by mod-pubsub 3 (Rust), which created the equivalent objects',
       '4.19.0', right((extract(epoch FROM now()) * 1000)::bigint::text, 10)
FROM (VALUES
  (1, '2019-09-06--13-00-create-audit_message_payload-table', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-09-06--13-00-create-audit_message_payload-table.xml'),
  (2, '2019-09-06--15-00-create-message_state-type', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-09-06--15-00-create-audit_message-table.xml'),
  (3, '2019-09-06--15-00-create-audit_message-table', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-09-06--15-00-create-audit_message-table.xml'),
  (4, '2019-11-08--15-00-add-rejected-message_state', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-11-08--15-00-change-audit_message-table.xml'),
  (5, '2019-11-08--15-00-update-audit_message-table', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-11-08--15-00-change-audit_message-table.xml'),
  (6, '2019-11-12--17-00-drop-foreign-key-constraint-on-message-payload', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-11-12--17-00-drop-foreign-key-constraint-on-message-payload.xml'),
  (7, '2019-11-19--15-00-create-user-table', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2019-11-19--15-00-create-user-table.xml'),
  (8, '2020-04-20--15-00-update-audit_message-table', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2020-04-20-15-00-change-audit_message-table.xml'),
  (9, '2020-06-20--13-00-update-audit-message-payload-data', 'KaterynaSenchenko', 'liquibase/tenant/scripts/v-0.0.1/2020-06-20--15-00-update-audit-message-payload-data.xml'),
  (10, '2021-04-26--15-00-drop-user-table', 'AlexanderKurash', 'liquibase/tenant/scripts/v-0.0.1/2021-04-26--15-00-drop-user-table.xml')
) AS c (n, id, author, filename)
WHERE NOT EXISTS (
  SELECT 1 FROM databasechangelog d
  WHERE d.id = c.id AND d.author = c.author AND lower(d.filename) = lower(c.filename)
);

CREATE TABLE IF NOT EXISTS rmb_internal (
  id    serial PRIMARY KEY,
  jsonb jsonb NOT NULL
);
INSERT INTO rmb_internal (jsonb)
SELECT jsonb_build_object('rmbVersion', '36.0.0', 'moduleVersion', 'mod-pubsub-3.0.0', 'schemaJson', E'{}\n')
WHERE NOT EXISTS (SELECT 1 FROM rmb_internal);

DO $$
DECLARE
  schema_name text := current_schema();
  tenant text := left(current_schema(), -length('_mod_pubsub'));
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = schema_name) THEN
    BEGIN
      EXECUTE format('CREATE ROLE %I PASSWORD %L NOSUPERUSER NOCREATEDB INHERIT LOGIN', schema_name, tenant);
    EXCEPTION
      -- Roles belong to the cluster: an install of this tenant in another database made it.
      WHEN duplicate_object OR unique_violation THEN NULL;
      WHEN insufficient_privilege THEN
        RAISE WARNING 'role % not created (no CREATEROLE): the Java module cannot take this tenant over until it exists (README, Rolling back to the Java module)', schema_name;
        RETURN;
    END;
  END IF;
  BEGIN
    EXECUTE format('GRANT %I TO CURRENT_USER', schema_name);
  EXCEPTION WHEN insufficient_privilege OR invalid_grant_operation THEN NULL;
  END;
  BEGIN
    EXECUTE format('GRANT ALL PRIVILEGES ON SCHEMA %I TO %I', schema_name, schema_name);
    EXECUTE format('GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA %I TO %I', schema_name, schema_name);
    EXECUTE format('GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA %I TO %I', schema_name, schema_name);
    -- Tables later migrations create.
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT ALL ON TABLES TO %I', schema_name, schema_name);
    EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT ALL ON SEQUENCES TO %I', schema_name, schema_name);
  EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'privileges on % not granted to role %', schema_name, schema_name;
  END;
END $$;
