//! History pages complete up to now: the Redis history stream for the recent
//! window, PostgreSQL for what is older, merged by offset.
//!
//! A message is in the Redis history stream the moment its publish is
//! acknowledged, and reaches PostgreSQL up to a batch later. Above its epoch's
//! `base`, the stream holds every message of the epoch from the oldest one it
//! kept, without a gap: that part of a page comes from Redis alone. Below the
//! oldest of those (older epochs, trimmed history), PostgreSQL answers, merged
//! with whatever older entries the stream still holds (a message of an epoch
//! Redis gave up may not have reached PostgreSQL yet). Pure code: the caller
//! reads both stores.

/// How a page splits between Redis and PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split<T> {
    /// Entries from the gapless part of the stream, newest first.
    pub recent: Vec<T>,
    /// Other stream entries (below the gapless part), newest first.
    pub older: Vec<T>,
    /// PostgreSQL must answer for offsets below this (`None`: all offsets
    /// below the page's `before`); not needed when `complete`.
    pub below: Option<u64>,
    /// Whether `recent` fills the page.
    pub complete: bool,
}

/// Splits the stream's newest entries below `before` (newest first; `base`
/// as [`crate::store::Page`] has it) for a page of `limit` entries that
/// `keep` (a filter, e.g. one conversation of an inbox).
pub fn split<T>(
    entries: Vec<T>,
    offset: impl Fn(&T) -> u64,
    base: Option<u64>,
    before: Option<u64>,
    limit: usize,
    keep: impl Fn(&T) -> bool,
) -> Split<T> {
    let (mut recent, mut older, mut lowest) = (Vec::new(), Vec::new(), None);
    for entry in entries {
        let at = offset(&entry);
        let gapless = base.is_some_and(|base| at > base);
        if gapless {
            lowest = Some(at);
        }
        if !keep(&entry) {
            continue;
        }
        if gapless {
            recent.push(entry);
        } else {
            older.push(entry);
        }
    }
    let below = lowest.or(before);
    let complete = recent.len() >= limit || below.is_some_and(|b| b <= 1);
    recent.truncate(limit);
    Split {
        recent,
        older,
        below,
        complete,
    }
}

/// The page, newest last: `split.recent`, then the newest of the older stream
/// entries and `stored` (PostgreSQL's page below `split.below`, any order),
/// without repeating an offset.
pub fn complete<T>(
    split: Split<T>,
    stored: Vec<T>,
    offset: impl Fn(&T) -> u64,
    limit: usize,
) -> Vec<T> {
    let Split {
        mut recent, older, ..
    } = split;
    let room = limit.saturating_sub(recent.len());
    let mut rest: Vec<T> = stored.into_iter().chain(older).collect();
    rest.sort_by_key(|entry| std::cmp::Reverse(offset(entry)));
    rest.dedup_by_key(|entry| offset(entry));
    recent.extend(rest.into_iter().take(room));
    recent.reverse();
    recent
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(
        stream: &[u64],
        base: Option<u64>,
        before: Option<u64>,
        limit: usize,
        stored: &[u64],
    ) -> Vec<u64> {
        let split = split(stream.to_vec(), |o| *o, base, before, limit, |_| true);
        let stored = if split.complete {
            Vec::new()
        } else {
            stored
                .iter()
                .copied()
                .filter(|o| split.below.is_none_or(|b| *o < b))
                .collect()
        };
        complete(split, stored, |o| *o, limit)
    }

    #[test]
    fn the_gapless_part_of_the_stream_answers_alone() {
        let split = split(vec![30, 29, 28], |o| *o, Some(10), None, 3, |_| true);
        assert!(split.complete);
        assert_eq!(complete(split, Vec::new(), |o| *o, 3), [28, 29, 30]);
    }

    #[test]
    fn postgres_answers_below_the_oldest_message_kept() {
        // History kept 28..=30 of an epoch that started after 10; PostgreSQL
        // lags (it has up to 25) and the page crosses into it without a gap.
        assert_eq!(
            page(
                &[30, 29, 28],
                Some(10),
                None,
                6,
                &(1..=25).collect::<Vec<_>>()
            ),
            [23, 24, 25, 28, 29, 30]
        );
        // Paging on from the oldest offset seen: PostgreSQL only.
        assert_eq!(
            page(&[], Some(10), Some(23), 3, &(1..=25).collect::<Vec<_>>()),
            [20, 21, 22]
        );
    }

    #[test]
    fn survivors_of_an_old_epoch_fill_what_postgres_has_not_yet() {
        // Redis restarted: the new epoch starts after 1000 (the reserved
        // bound); 501..=510 survived in the stream but only up to 505 reached
        // PostgreSQL so far.
        assert_eq!(
            page(
                &[1002, 1001, 510, 509, 508, 507, 506, 505],
                Some(1000),
                None,
                8,
                &(1..=505).collect::<Vec<_>>()
            ),
            [505, 506, 507, 508, 509, 510, 1001, 1002]
        );
    }

    #[test]
    fn without_an_epoch_everything_is_asked_of_postgres() {
        let split = split(vec![7u64, 6], |o| *o, None, None, 5, |_| true);
        assert_eq!((split.below, split.complete), (None, false));
        assert_eq!(
            complete(split, vec![1, 2, 3, 6], |o| *o, 5),
            [1, 2, 3, 6, 7]
        );
    }

    #[test]
    fn a_filter_keeps_the_gapless_range_of_everything_read() {
        // One conversation of an inbox: odd offsets are with bob. Redis kept
        // 21..=30 of the epoch; bob's older messages come from PostgreSQL.
        let odd = |o: &u64| o % 2 == 1;
        let split = split((21..=30).rev().collect(), |o| *o, Some(0), None, 7, odd);
        assert_eq!((split.below, split.complete), (Some(21), false));
        let stored = (1..=20).filter(|o| odd(o)).collect();
        assert_eq!(
            complete(split, stored, |o| *o, 7),
            [17, 19, 21, 23, 25, 27, 29]
        );
    }

    #[test]
    fn nothing_below_offset_one() {
        let split = split(vec![1u64], |o| *o, Some(0), None, 5, |_| true);
        assert!(split.complete, "offset 1 is the first there can be");
    }
}
