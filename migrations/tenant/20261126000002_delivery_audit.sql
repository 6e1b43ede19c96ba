-- Delivery rows (RECEIVED, DELIVERED, REJECTED) name the subscriber module and the attempt.
ALTER TABLE audit_message ADD COLUMN IF NOT EXISTS subscriber text;
ALTER TABLE audit_message ADD COLUMN IF NOT EXISTS attempt integer;
