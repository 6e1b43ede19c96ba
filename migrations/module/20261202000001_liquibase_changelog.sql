-- The Java module's Liquibase bookkeeping in `pubsub_config`, so that the Java module can run on
-- this database again (a rollback): its `liquibase update` runs every changeSet that
-- `databasechangelog` does not list, and on a database this service created it would stop on
-- objects that exist (`CREATE TYPE module_role_enum`). The changeSets below are the Java module's
-- module changelog (tests/fixtures/java/liquibase-changesets.tsv); this service's first module
-- migration created the tables they end with. On a database the Java module created, the rows
-- are there and nothing is added.
CREATE TABLE IF NOT EXISTS pubsub_config.databasechangeloglock (
  id          integer PRIMARY KEY,
  locked      boolean NOT NULL,
  lockgranted timestamp,
  lockedby    varchar(255)
);
INSERT INTO pubsub_config.databasechangeloglock (id, locked) VALUES (1, false) ON CONFLICT (id) DO NOTHING;

CREATE TABLE IF NOT EXISTS pubsub_config.databasechangelog (
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
INSERT INTO pubsub_config.databasechangelog
  (id, author, filename, dateexecuted, orderexecuted, exectype, md5sum, comments, liquibase, deployment_id)
SELECT c.id, c.author, c.filename, now() AT TIME ZONE 'UTC',
       (SELECT coalesce(max(orderexecuted), 0) FROM pubsub_config.databasechangelog) + c.n,
       'EXECUTED', NULL, 'recorded by mod-pubsub 3 (Rust), which created the equivalent objects',
       '4.19.0', right((extract(epoch FROM now()) * 1000)::bigint::text, 10)
FROM (VALUES
  (1, '2019-08-14--14-00-create-module-table', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-08-14--14-00-create-module-table.xml'),
  (2, '2019-08-14--15-00-create-event_type-table', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-08-14--15-00-create-event_type-table.xml'),
  (3, '2019-08-14--16-00-create-module_role_enum-type', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-08-14--16-00-create-messaging_module-table.xml'),
  (4, '2019-08-14--16-10-create-messaging_module-table', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-08-14--16-00-create-messaging_module-table.xml'),
  (5, '2019-09-03--11-00-change-module-table-id-column-type', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-09-03--11-00-change-id-column-type.xml'),
  (6, '2019-09-03--11-10-change-messaging_module-table-id-column-type', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-09-03--11-00-change-id-column-type.xml'),
  (7, '2019-09-03--12-00-rename-event_type-table', 'RuslanLavrov', 'liquibase/module/scripts/v-0.0.1/2019-09-03--14-00-rename-event_type-table.xml'),
  (8, '2019-11-06--15-00-change-messaging-module-table', 'KaterynaSenchenko', 'liquibase/module/scripts/v-0.0.1/2019-11-06--15-00-change-messaging-module-table.xml'),
  (9, '2020-06-20--13-00-update-event-descriptor-data', 'KaterynaSenchenko', 'liquibase/module/scripts/v-0.0.1/2020-06-20--15-00-update-event-descriptor-data.xml'),
  (10, '2020-06-20--15-00-set-tmp-value', 'KaterynaSenchenko', 'liquibase/module/scripts/v-0.0.1/2020-06-20--15-00-update-event-descriptor-data.xml'),
  (11, '2020-10-01--13-00-remove-invalid-module-names', 'VolodymyrRohach', 'liquibase/module/scripts/v-0.0.1/2020-10-01--13-00-remove-invalid-module-names.xml')
) AS c (n, id, author, filename)
WHERE NOT EXISTS (
  SELECT 1 FROM pubsub_config.databasechangelog d
  WHERE d.id = c.id AND d.author = c.author AND lower(d.filename) = lower(c.filename)
);
