-- A key change asked for without a key (the prototype's form: username, registered email,
-- new key, reason) keeps the email it was checked against and the reason given.
ALTER TABLE key_changes ADD COLUMN email TEXT;
ALTER TABLE key_changes ADD COLUMN reason TEXT;
