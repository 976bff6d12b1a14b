-- Direct messages as users expect, and offsets that are never reused.
-- Additive: new tables only, filled from what is already stored.

-- Offsets handed out by gateways are reserved here first, in blocks, per
-- channel and per user inbox: every offset ever assigned is at most
-- `reserved`, so an epoch started after Redis lost state (a crash with
-- `appendfsync everysec`, a wipe, a failover) starts above it, even above
-- messages still on their way to this database.
CREATE TABLE IF NOT EXISTS offset_blocks (
    kind     text   NOT NULL CHECK (kind IN ('channel', 'inbox')),
    name     text   NOT NULL,
    reserved bigint NOT NULL,
    PRIMARY KEY (kind, name)
);

-- Each user's inbox: the direct messages it sent and received, at offsets
-- dense per user (the same offsets the gateway pushes and recovers by).
-- A message between two users is in both inboxes, at each one's own offset.
CREATE TABLE IF NOT EXISTS inbox (
    user_name    text   NOT NULL,
    inbox_offset bigint NOT NULL,
    msg_id       uuid   NOT NULL,
    partner      text   NOT NULL,
    PRIMARY KEY (user_name, inbox_offset),
    UNIQUE (user_name, msg_id)
);
-- `dm_history` pages one conversation backwards:
-- WHERE user_name = $1 AND partner = $2 AND inbox_offset < $3 ORDER BY inbox_offset DESC.
CREATE INDEX IF NOT EXISTS inbox_conversation ON inbox (user_name, partner, inbox_offset);

-- The newest message of every conversation of every user; `conversations`
-- lists them newest first.
CREATE TABLE IF NOT EXISTS conversations (
    user_name   text   NOT NULL,
    partner     text   NOT NULL,
    last_offset bigint NOT NULL,
    msg_id      uuid   NOT NULL,
    PRIMARY KEY (user_name, partner)
);
CREATE INDEX IF NOT EXISTS conversations_newest ON conversations (user_name, last_offset);

-- Direct messages stored before inboxes existed enter both users' inboxes in
-- the order they were sent; new inbox epochs start above them.
INSERT INTO inbox (user_name, inbox_offset, msg_id, partner)
SELECT owner, row_number() OVER (PARTITION BY owner ORDER BY sent_at, msg_id), msg_id, partner
FROM (
    SELECT to_user AS owner, from_user AS partner, msg_id, sent_at FROM direct_messages
    UNION ALL
    SELECT from_user, to_user, msg_id, sent_at FROM direct_messages WHERE from_user <> to_user
) AS d
ON CONFLICT DO NOTHING;

INSERT INTO conversations (user_name, partner, last_offset, msg_id)
SELECT DISTINCT ON (user_name, partner) user_name, partner, inbox_offset, msg_id
FROM inbox
ORDER BY user_name, partner, inbox_offset DESC
ON CONFLICT DO NOTHING;
