//! Which records of a partition are unfinished, and so how far its position may move.

use std::collections::BTreeMap;

use chrono::Utc;

/// Which offsets of a partition are received and not finished, so the committed position
/// never passes a record that is still being handled.
#[derive(Default)]
pub(super) struct OffsetTracker {
    /// Offsets received and not finished, with their Kafka timestamps (ms; or when received).
    pub(super) open: BTreeMap<i64, i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The position last stored.
    stored: i64,
}

impl OffsetTracker {
    pub(super) fn seen(&mut self, offset: i64, timestamp: Option<i64>) {
        if self.next.is_none() {
            self.stored = offset;
        }
        let at = timestamp.unwrap_or_else(|| Utc::now().timestamp_millis());
        self.open.insert(offset, at);
        self.next = Some(self.next.unwrap_or(offset).max(offset + 1));
    }

    /// Marks the record finished; returns the partition's new position when it moved.
    pub(super) fn finish(&mut self, offset: i64) -> Option<i64> {
        self.open.remove(&offset);
        let position = self
            .open
            .keys()
            .next()
            .copied()
            .or(self.next)
            .unwrap_or(self.stored);
        if position <= self.stored {
            return None;
        }
        self.stored = position;
        Some(position)
    }

    /// The timestamp of the oldest unfinished record.
    pub(super) fn oldest(&self) -> Option<i64> {
        self.open.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_never_passes_an_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.seen(o, Some(1000 + o));
        }
        assert_eq!(t.oldest(), Some(1010));
        // 11 and 12 finish first: 10 is still open, nothing to store.
        assert_eq!(t.finish(11), None);
        assert_eq!(t.finish(12), None);
        // 10 finishes: the position moves to 13, the oldest open record.
        assert_eq!(t.finish(10), Some(13));
        assert_eq!(t.oldest(), Some(1013));
        assert_eq!(t.finish(13), Some(14));
        assert_eq!(t.oldest(), None);
        // Nothing open: finishing again moves nothing.
        assert_eq!(t.finish(13), None);
    }
}
