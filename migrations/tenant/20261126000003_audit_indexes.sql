-- The audit trail is written for every publish and every delivery attempt, and read by
-- /pubsub/history, which always filters by a date range (audit_date index) and then perhaps by
-- event type or correlation id, and by the payload and audit look-ups by event id (event_id
-- index). The two indexes below cost two index insertions per audit row and served no query the
-- audit_date index does not; audit rows' own ids are now time-ordered (UUIDv7), so primary-key
-- insertions append instead of landing all over the index.
DROP INDEX IF EXISTS audit_message_correlation_id_idx;
DROP INDEX IF EXISTS audit_message_event_type_date_idx;
