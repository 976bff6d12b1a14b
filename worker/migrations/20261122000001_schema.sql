-- chatcluster persistent schema (owned by chatcluster-worker, read by the gateway).
-- Offsets are dense per channel and never reused across Redis epochs, so
-- (channel, channel_offset) identifies a message as well as msg_id does; both
-- are unique so a redelivered stream entry can never add a second row.

CREATE TABLE IF NOT EXISTS users (
    name       text        PRIMARY KEY,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS channels (
    name       text        PRIMARY KEY,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS messages (
    channel        text        NOT NULL,
    channel_offset bigint      NOT NULL,
    msg_id         uuid        NOT NULL,
    user_name      text        NOT NULL,
    body           text        NOT NULL,
    sent_at        timestamptz NOT NULL,
    clock          bigint      NOT NULL,
    -- History pages walk this index backwards:
    -- WHERE channel = $1 AND channel_offset < $2 ORDER BY channel_offset DESC LIMIT $3,
    -- and MAX(channel_offset) per channel is one index probe.
    PRIMARY KEY (channel, channel_offset),
    UNIQUE (msg_id)
);

CREATE TABLE IF NOT EXISTS direct_messages (
    msg_id    uuid        PRIMARY KEY,
    from_user text        NOT NULL,
    to_user   text        NOT NULL,
    body      text        NOT NULL,
    sent_at   timestamptz NOT NULL,
    clock     bigint      NOT NULL
);

-- A user's conversations: messages sent and received, newest first.
CREATE INDEX IF NOT EXISTS direct_messages_to_sent_at ON direct_messages (to_user, sent_at);
CREATE INDEX IF NOT EXISTS direct_messages_from_sent_at ON direct_messages (from_user, sent_at);

-- Messages per channel and the time of the latest one; a channel created
-- without messages shows 0 and its creation time.
CREATE OR REPLACE VIEW room_stats AS
SELECT COALESCE(c.name, m.channel)                     AS channel,
       COALESCE(m.message_count, 0)                    AS message_count,
       COALESCE(m.last_activity, c.created_at)         AS last_activity
FROM channels c
FULL OUTER JOIN (
    SELECT channel, count(*) AS message_count, max(sent_at) AS last_activity
    FROM messages
    GROUP BY channel
) m ON m.channel = c.name;
