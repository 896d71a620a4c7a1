//! Network frames held by the gate (the output rule, as for console
//! bytes): each tagged with the exit that sent it, written to the tap once
//! the backup has acknowledged that exit. Unlike console bytes, frames are
//! not numbered or kept once released, and a held frame may be dropped
//! when too many are held (the network loses frames anyway; TCP
//! retransmits).
//!
//! A backup holds the frames its replay sends too, because after a
//! takeover it must send exactly those the old primary never did: the
//! primary's every high-water mark says through which exit it had put its
//! frames on the wire (`Progress { frames_out }`), the backup forgets its
//! frames up to there ([`HeldFrames::sent_elsewhere`]) and, once promoted,
//! sends the rest. Frames the old primary sent after its last mark that
//! reached the backup go out twice (at most a round trip's worth; TCP and
//! any receiver of a lossy network discard duplicates); none is lost.

use std::collections::VecDeque;

use crate::net::FrameSink;

/// The most frames held (a backup that stops acknowledging must not grow
/// the primary without bound): older ones are dropped.
const MAX_FRAMES: usize = 4096;
/// The most bytes held (frames are at most 1518 bytes, so this bound is
/// a guard only).
const MAX_BYTES: usize = 8 << 20;

/// The frames a primary held at a snapshot (`FRAMES` in the stream).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FramesHeld {
    pub out_through: u64,
    pub frames: Vec<(u64, Vec<u8>)>,
}

impl FramesHeld {
    /// `FRAMES <out_through> <n>`, then per frame its exit (`u64`), its
    /// length (`u32`, little-endian) and its bytes. (A few fields after the
    /// snapshot, in the stream's own line-and-bytes style: no codec needed.)
    pub fn write_to(&self, w: &mut impl std::io::Write) -> std::io::Result<()> {
        w.write_all(format!("FRAMES {} {}\n", self.out_through, self.frames.len()).as_bytes())?;
        for (ordinal, f) in &self.frames {
            w.write_all(&ordinal.to_le_bytes())?;
            w.write_all(&(f.len() as u32).to_le_bytes())?;
            w.write_all(f)?;
        }
        Ok(())
    }

    /// Reads what [`FramesHeld::write_to`] wrote after `line` (already
    /// read): at most [`MAX_FRAMES`] frames of at most `max_frame` bytes,
    /// none after exit `at` (the snapshot's).
    pub fn read_from(line: &str, r: &mut impl std::io::Read, max_frame: usize, at: u64) -> Result<FramesHeld, String> {
        let (out_through, n) = line
            .strip_prefix("FRAMES ")
            .and_then(|r| r.split_once(' '))
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<usize>().ok()?)))
            .filter(|&(o, n)| n <= MAX_FRAMES && o <= at)
            .ok_or_else(|| format!("{line:?} where `FRAMES <exit> <count>` (at most exit {at}, {MAX_FRAMES} frames) belongs"))?;
        let mut frames = Vec::with_capacity(n);
        for i in 0..n {
            let mut head = [0u8; 12];
            r.read_exact(&mut head).map_err(|e| format!("reading held frame {i} of {n}: {e}"))?;
            let ordinal = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
            let after = frames.last().map_or(out_through + 1, |(o, _)| *o);
            if len > max_frame || ordinal > at || ordinal < after {
                return Err(format!(
                    "held frame {i} of {n}: {len} bytes at exit {ordinal} (at most {max_frame} bytes, at exits {after} to {at}, in order)"
                ));
            }
            let mut f = vec![0u8; len];
            r.read_exact(&mut f).map_err(|e| format!("reading held frame {i} of {n}: {e}"))?;
            frames.push((ordinal, f));
        }
        Ok(FramesHeld { out_through, frames })
    }
}

#[derive(Default)]
pub struct HeldFrames {
    q: VecDeque<(u64, Vec<u8>)>,
    bytes: usize,
    /// Where released frames go (the tap); none: they are counted only.
    out: Option<Box<dyn FrameSink>>,
    /// Frames sent through this exit are on the wire: released here, or
    /// by the primary this VMM backs.
    out_through: u64,
    /// Frames sent through this exit were sent by the primary this VMM
    /// backs (its marks say so).
    elsewhere: u64,
    pub released: u64,
    pub dropped: u64,
    /// Frames the previous primary had sent already (not sent again).
    pub sent_before: u64,
}

impl HeldFrames {
    pub fn set_out(&mut self, out: Box<dyn FrameSink>) {
        self.out = Some(out);
    }

    /// A frame the guest sent at exit `ordinal`, held until released.
    pub fn push(&mut self, ordinal: u64, frame: &[u8]) {
        if ordinal <= self.elsewhere {
            // Replayed by a backup: the primary sent it.
            self.sent_before += 1;
            return;
        }
        self.bytes += frame.len();
        self.q.push_back((ordinal, frame.to_vec()));
        while self.q.len() > MAX_FRAMES || self.bytes > MAX_BYTES {
            let (_, f) = self.q.pop_front().expect("over the bound, so not empty");
            self.bytes -= f.len();
            self.dropped += 1;
        }
    }

    /// The primary this VMM backs has sent every frame through exit
    /// `through`: forget those, and any such frame replayed later.
    pub fn sent_elsewhere(&mut self, through: u64) {
        self.elsewhere = self.elsewhere.max(through);
        self.out_through = self.out_through.max(through);
        while self.q.front().is_some_and(|(o, _)| *o <= through) {
            let (_, f) = self.q.pop_front().expect("front exists");
            self.bytes -= f.len();
            self.sent_before += 1;
        }
    }

    /// This VMM's guest runs live from here (a backup that took over
    /// finished replaying): every frame from now on is new, even one of
    /// the exit where the log ended, which its last mark may cover.
    pub fn live(&mut self) {
        self.elsewhere = 0;
    }

    /// Sends every frame sent at or before exit `through` (all for `None`).
    pub fn release(&mut self, through: Option<u64>) {
        while let Some((o, _)) = self.q.front() {
            if through.is_some_and(|t| *o > t) {
                break;
            }
            let (o, f) = self.q.pop_front().expect("front exists");
            self.bytes -= f.len();
            self.released += 1;
            self.out_through = self.out_through.max(o);
            if let Some(out) = &mut self.out {
                out.transmit(&f);
            }
        }
    }

    /// Every frame sent through this exit is on the wire (what a mark
    /// tells the backup): through the newest released, but never as far as
    /// a frame still held (one exit's frames may straddle a change of
    /// view: some released, the rest held for a backup that just joined).
    /// Frames dropped over the bound count as sent: nobody will send them.
    pub fn out_through(&self) -> u64 {
        match self.q.front() {
            Some((o, _)) => self.out_through.min(o.saturating_sub(1)),
            None => self.out_through,
        }
    }

    /// What a new backup needs at a state transfer: through which exit
    /// frames are on the wire, and the frames still held (their exits are
    /// at or before the snapshot's, so its replay will not send them).
    pub fn held(&self) -> FramesHeld {
        FramesHeld { out_through: self.out_through(), frames: self.q.iter().cloned().collect() }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> FramesHeld {
        FramesHeld { out_through: 7, frames: vec![(8, vec![1; 60]), (9, vec![]), (9, vec![2; 1518])] }
    }

    #[test]
    fn held_frames_cross_a_state_transfer_whole() {
        let mut b = Vec::new();
        held().write_to(&mut b).unwrap();
        let nl = b.iter().position(|&c| c == b'\n').unwrap();
        let line = std::str::from_utf8(&b[..nl]).unwrap();
        assert_eq!(line, "FRAMES 7 3");
        let mut r = &b[nl + 1..];
        assert_eq!(FramesHeld::read_from(line, &mut r, 1518, 9).unwrap(), held());
        assert!(r.is_empty());
    }

    #[test]
    fn bad_held_frames_are_refused_clearly() {
        let mut b = Vec::new();
        held().write_to(&mut b).unwrap();
        let body = &b[b.iter().position(|&c| c == b'\n').unwrap() + 1..];
        let err = |line: &str, body: &[u8], max: usize, at: u64| FramesHeld::read_from(line, &mut &body[..], max, at).unwrap_err();
        assert!(err("FRAMES 7 4097", body, 1518, 9).contains("4096 frames"));
        assert!(err("FRAMES x 3", body, 1518, 9).contains("where `FRAMES <exit> <count>`"));
        assert!(err("TAIL 0 0", body, 1518, 9).contains("where `FRAMES"));
        assert!(err("FRAMES 7 3", body, 1000, 9).contains("held frame 2 of 3: 1518 bytes at exit 9 (at most 1000 bytes"));
        assert!(err("FRAMES 7 3", body, 1518, 8).contains("held frame 1 of 3: 0 bytes at exit 9"), "a frame after the snapshot's exit");
        assert!(err("FRAMES 10 3", body, 1518, 10).contains("held frame 0 of 3: 60 bytes at exit 8 (at most 1518 bytes, at exits 11 to 10"), "a frame said sent");
        assert!(err("FRAMES 12 0", body, 1518, 10).contains("at most exit 10"), "sent beyond the snapshot");
        let mut swapped = Vec::new();
        FramesHeld { out_through: 0, frames: vec![(9, vec![1]), (8, vec![2])] }.write_to(&mut swapped).unwrap();
        let sb = &swapped[swapped.iter().position(|&c| c == b'\n').unwrap() + 1..];
        assert!(err("FRAMES 0 2", sb, 1518, 9).contains("held frame 1 of 2: 1 bytes at exit 8 (at most 1518 bytes, at exits 9 to 9, in order)"));
        assert!(err("FRAMES 7 3", &body[..body.len() - 1], 1518, 9).contains("reading held frame 2 of 3"));
        // A length of 2^32 - 1 is refused before anything is allocated.
        let mut huge = 8u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(err("FRAMES 0 1", &huge, 1518, 9).contains("4294967295 bytes"));
    }
}
