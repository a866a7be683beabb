-- Basphere schema v5: the uid of the Unix account Basphere created for a user. Basphere manages
-- (re-keys, locks, removes) only the account whose uid it recorded here when it ran `useradd`.
ALTER TABLE users ADD COLUMN unix_uid INTEGER;
