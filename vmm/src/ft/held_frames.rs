//! Network frames held by the gate (the output rule, as for console
//! bytes): each tagged with the exit that sent it, written to the tap once
//! the backup has acknowledged that exit. Unlike console bytes, frames are
//! not numbered or kept once released, and a held frame may be dropped
//! (the network loses frames anyway; TCP retransmits): when too many are
//! held, and by a backup, whose card never transmits.

use std::collections::VecDeque;

use crate::net::FrameSink;

/// The most frames held (a backup that stops acknowledging must not grow
/// the primary without bound): older ones are dropped.
const MAX_FRAMES: usize = 4096;
/// The most bytes held (frames are at most 1518 bytes, so this bound is
/// a guard only).
const MAX_BYTES: usize = 8 << 20;

#[derive(Default)]
pub struct HeldFrames {
    q: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Where released frames go (the tap); none: they are counted only.
    out: Option<Box<dyn FrameSink>>,
    pub released: u64,
    pub dropped: u64,
}

impl HeldFrames {
    pub fn set_out(&mut self, out: Box<dyn FrameSink>) {
        self.out = Some(out);
    }

    pub fn push(&mut self, ordinal: u64, frame: &[u8]) {
        self.bytes += frame.len();
        self.q.push_back((ordinal, frame.to_vec()));
        while self.q.len() > MAX_FRAMES || self.bytes > MAX_BYTES {
            let (_, f) = self.q.pop_front().expect("over the bound, so not empty");
            self.bytes -= f.len();
            self.dropped += 1;
        }
    }

    /// Drops a frame without holding it (a backup's).
    pub fn drop_one(&mut self) {
        self.dropped += 1;
    }

    /// Sends every frame sent at or before exit `through` (all for `None`).
    pub fn release(&mut self, through: Option<u64>) {
        while let Some((o, _)) = self.q.front() {
            if through.is_some_and(|t| *o > t) {
                break;
            }
            let (_, f) = self.q.pop_front().expect("front exists");
            self.bytes -= f.len();
            self.released += 1;
            if let Some(out) = &mut self.out {
                out.transmit(&f);
            }
        }
    }

    /// The exit of the newest held frame.
    pub fn last_ordinal(&self) -> Option<u64> {
        self.q.back().map(|(o, _)| *o)
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}
