//! The lanes' recent transitions, for people (the status page, `lifeguard status`) and for
//! whoever follows them (webhooks). A bounded ring written by [`super::State`] as it
//! publishes, under its lock, so records are in the order the transitions happened;
//! readers take only the ring's own lock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::gate::{Cause, Lane};

/// How many transitions are kept; older ones are forgotten.
pub const CAPACITY: usize = 256;
/// Longest reason kept in a record (probe errors can be long).
const REASON_MAX: usize = 512;

/// One transition of one configured lane.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1, 2, 3...: followers ask for what came after the last one they saw.
    pub seq: u64,
    pub at: SystemTime,
    pub lane: Lane,
    pub up: bool,
    pub cause: Cause,
    pub reason: String,
    pub previous_up: bool,
    pub previous_cause: Cause,
    /// How long the previous state lasted.
    pub previous_for: Duration,
    /// Sessions of the lane open when it went down: each got the disable sequence.
    pub sessions_closed: usize,
    /// The backend's QQ number, when it had told it.
    pub self_id: Option<u64>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn state_word(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "down"
    }
}

impl Record {
    /// The one JSON shape of a transition (`GET /transitions`, webhooks).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seq": self.seq,
            "time": unix(self.at),
            "lane": self.lane.as_str(),
            "state": state_word(self.up),
            "cause": self.cause.as_str(),
            "reason": self.reason,
            "previous": {
                "state": state_word(self.previous_up),
                "cause": self.previous_cause.as_str(),
                "for_seconds": self.previous_for.as_secs_f64(),
            },
            "sessions_closed": self.sessions_closed,
            "self_id": self.self_id,
        })
    }

    /// One line for people: `forward down (offline) after 12.3 s up: <reason>; 4 sessions closed`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} {} ({}) after {:.1} s {}: {}",
            self.lane.as_str(),
            state_word(self.up),
            self.cause,
            self.previous_for.as_secs_f64(),
            state_word(self.previous_up),
            self.reason
        );
        if self.sessions_closed > 0 {
            s.push_str(&format!("; {} sessions closed", self.sessions_closed));
        }
        s
    }
}

#[derive(Default)]
struct Ring {
    last_seq: u64,
    records: VecDeque<Arc<Record>>,
}

/// The ring of recent transitions.
#[derive(Default)]
pub struct History {
    ring: Mutex<Ring>,
}

impl History {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a transition; `seq` is assigned here.
    pub(super) fn push(&self, mut record: Record) {
        if record.reason.len() > REASON_MAX {
            let mut cut = REASON_MAX;
            while !record.reason.is_char_boundary(cut) {
                cut -= 1;
            }
            record.reason.truncate(cut);
        }
        let mut ring = self.lock();
        ring.last_seq += 1;
        record.seq = ring.last_seq;
        if ring.records.len() == CAPACITY {
            ring.records.pop_front();
        }
        ring.records.push_back(Arc::new(record));
    }

    /// The sequence number of the latest transition (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// The latest `n` transitions, oldest first.
    pub fn latest(&self, n: usize) -> Vec<Arc<Record>> {
        let ring = self.lock();
        let skip = ring.records.len().saturating_sub(n);
        ring.records.iter().skip(skip).cloned().collect()
    }

    /// Every transition after `seq`, oldest first, and how many of those the ring has
    /// already forgotten.
    pub fn since(&self, seq: u64) -> (Vec<Arc<Record>>, u64) {
        let ring = self.lock();
        let first_kept = ring
            .records
            .front()
            .map(|r| r.seq)
            .unwrap_or(ring.last_seq + 1);
        let missed = first_kept.saturating_sub(seq + 1);
        let records = ring
            .records
            .iter()
            .filter(|r| r.seq > seq)
            .cloned()
            .collect();
        (records, missed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(up: bool) -> Record {
        Record {
            seq: 0,
            at: SystemTime::now(),
            lane: Lane::Forward,
            up,
            cause: if up { Cause::Healthy } else { Cause::Admin },
            reason: "x".repeat(2000),
            previous_up: !up,
            previous_cause: Cause::Starting,
            previous_for: Duration::from_millis(1500),
            sessions_closed: 3,
            self_id: Some(1),
        }
    }

    #[test]
    fn bounded_and_followable_by_sequence() {
        let h = History::default();
        assert_eq!(h.since(0), (vec![], 0));
        for i in 0..CAPACITY + 10 {
            h.push(record(i % 2 == 0));
        }
        assert_eq!(h.last_seq(), (CAPACITY + 10) as u64);
        assert_eq!(h.latest(usize::MAX).len(), CAPACITY);
        let last5 = h.latest(5);
        assert_eq!(
            last5.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (CAPACITY as u64 + 6..=CAPACITY as u64 + 10).collect::<Vec<_>>()
        );
        let (after, missed) = h.since(h.last_seq() - 2);
        assert_eq!((after.len(), missed), (2, 0));
        // A follower that fell behind by more than the ring holds learns how much it missed.
        let (all, missed) = h.since(0);
        assert_eq!((all.len(), missed), (CAPACITY, 10));
        assert!(all[0].reason.len() <= REASON_MAX);
        let v = all[0].to_json();
        assert_eq!(v["previous"]["for_seconds"], 1.5);
        assert_eq!(v["sessions_closed"], 3);
    }
}
