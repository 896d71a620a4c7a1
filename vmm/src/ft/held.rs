//! Output held by the gate: the bytes, and runs of them by the exit that
//! produced them. A byte costs one byte (it cost 16 as an (ordinal, byte)
//! pair); a run costs 16 bytes per exit that produced output.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct Held {
    bytes: VecDeque<u8>,
    /// (ordinal, length) per exit, oldest first; lengths sum to `bytes.len()`.
    runs: VecDeque<(u64, usize)>,
}

impl Held {
    pub fn push(&mut self, ordinal: u64, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.bytes.extend(b);
        match self.runs.back_mut() {
            Some((o, n)) if *o == ordinal => *n += b.len(),
            _ => self.runs.push_back((ordinal, b.len())),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The held bytes, oldest first.
    pub fn bytes(&self) -> impl Iterator<Item = &u8> {
        self.bytes.iter()
    }

    /// The exit that produced the newest held byte.
    pub fn last_ordinal(&self) -> Option<u64> {
        self.runs.back().map(|&(o, _)| o)
    }

    /// Moves to `out` every byte produced at or before exit `through`
    /// (all of them for `None`); returns the exit of the last one moved.
    pub fn release(&mut self, through: Option<u64>, out: &mut Vec<u8>) -> Option<u64> {
        let mut last = None;
        while let Some(&(o, n)) = self.runs.front() {
            if through.is_some_and(|t| o > t) {
                break;
            }
            out.extend(self.bytes.drain(..n));
            self.runs.pop_front();
            last = Some(o);
        }
        last
    }

    /// Forgets the oldest `n` bytes (a backup's bounded tail).
    pub fn forget(&mut self, mut n: usize) {
        n = n.min(self.bytes.len());
        self.bytes.drain(..n);
        while n > 0 {
            let Some(front) = self.runs.front_mut() else { break };
            if front.1 <= n {
                n -= front.1;
                self.runs.pop_front();
            } else {
                front.1 -= n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_release_in_order_up_to_an_exit() {
        let mut h = Held::default();
        h.push(3, b"ab");
        h.push(3, b"c");
        h.push(5, b"");
        h.push(7, b"de");
        h.push(9, b"f");
        assert_eq!((h.len(), h.last_ordinal()), (6, Some(9)));
        let mut out = Vec::new();
        assert_eq!(h.release(Some(2), &mut out), None);
        assert_eq!(h.release(Some(7), &mut out), Some(7));
        assert_eq!(out, b"abcde");
        h.forget(0);
        assert_eq!(h.release(None, &mut out), Some(9));
        assert_eq!((out.as_slice(), h.is_empty(), h.last_ordinal()), (&b"abcdef"[..], true, None));
    }

    #[test]
    fn forgetting_cuts_through_runs() {
        let mut h = Held::default();
        h.push(1, b"aaa");
        h.push(2, b"bbb");
        h.forget(4);
        let mut out = Vec::new();
        assert_eq!(h.release(Some(1), &mut out), None, "run 1 is gone");
        assert_eq!(h.release(Some(2), &mut out), Some(2));
        assert_eq!(out, b"bb");
        h.push(4, b"x");
        h.forget(100);
        assert!(h.is_empty() && h.last_ordinal().is_none());
    }

    #[test]
    fn a_byte_costs_a_byte() {
        let mut h = Held::default();
        for i in 0..1000u64 {
            h.push(i / 100, &[b'x'; 100]);
        }
        assert_eq!((h.len(), h.runs.len()), (100_000, 10));
    }
}
