//! State transfer (rule 5): a backup that joins gets a snapshot of the
//! primary's VM taken at one exit, then the log from the first record after
//! that exit, instead of the whole log from boot. The log sender asks for
//! a snapshot here; the vCPU thread (which owns the VM) takes it at the end
//! of its next exit (`Recorder`, at `Observed::ExitDone`) and hands it back
//! with the byte offset in the in-memory log where that exit's records end.
//! Everything before that offset is then never needed again, so the
//! primary drops it (`LogBuf::trim_before`): its memory no longer grows
//! with the run.
//!
//! Pre-copy keeps the guest's pause short: the sender first copies (and
//! compresses) all of guest memory while the guest runs, noting which
//! 1 MiB chunks the guest writes meanwhile: every call of the dirty log
//! from then on (the recorder's resyncs and idle clears, which start new
//! dirty intervals, and the snapshot's own) reports its pages here. At the
//! snapshot exit only those chunks are captured again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use replay_log::Header;
use vm_memory::GuestMemoryMmap;

use crate::snapshot::{capture_chunk, chunk_count, Chunk, MemoryImage, Snapshot, CHUNK};

/// A snapshot taken for a joining backup.
pub struct Taken {
    pub snapshot: Snapshot,
    /// Memory chunks captured during the pause (all of them without
    /// pre-copy).
    pub chunks_in_pause: usize,
    /// Offset in the `LogBuf` just past the last record of the snapshot's
    /// exit: the backup gets the log from there on.
    pub offset: usize,
    /// How long the guest was paused to take it (it is encoded and sent
    /// after the guest resumes).
    pub pause: Duration,
    /// The console output before it (`Gate::emitted_tail`): its first
    /// byte's number, and the bytes.
    pub tail: (u64, Vec<u8>),
    /// The network frames held (`Gate::frames_held`).
    pub frames: super::held_frames::FramesHeld,
}

/// Requests for snapshots, between the log sender and the vCPU thread.
pub struct Transfers {
    /// The guest, as snapshots name it.
    pub guest: Header,
    pending: AtomicBool,
    reply: Mutex<Option<Sender<Result<Taken, String>>>>,
    /// While a backup is joining: the ordinal from which it has the VM
    /// (the snapshot's), so that the lag throttle measures it from there
    /// rather than from boot. `u64::MAX` while the snapshot is still to be
    /// taken (nothing to throttle against yet).
    floor: AtomicU64,
    /// Where the records start in the log from boot, for a VMM whose log
    /// starts at boot (a primary that booted the guest): while nothing of
    /// it was dropped, a backup can replay it from boot instead (`BOOT`),
    /// with no snapshot at all. That is what a backup in the view from the
    /// start gets: it protects the guest from its first exit.
    boot_records: Mutex<Option<usize>>,
    /// Guest memory, for the pre-copy pass (read while the guest runs).
    mem: Mutex<Option<GuestMemoryMmap>>,
    pre: Mutex<PreCopy>,
    /// The vCPU tracks dirty pages (and reports them here): without it a
    /// pre-copy would miss writes (a promoted backup replaying, before its
    /// recorder starts).
    tracking: AtomicBool,
}

/// One sender's pre-copy: what it copied, and what was written since.
#[derive(Default)]
struct PreCopy {
    /// Which pre-copy this is: a sender that was replaced must not hand
    /// in its copy.
    generation: u64,
    /// Chunks written since the pass started; `None`: no pass running.
    dirty: Option<BTreeSet<usize>>,
    /// The pass's copy, once complete.
    chunks: Option<Vec<Chunk>>,
}

impl Transfers {
    pub fn new(guest: Header) -> Arc<Self> {
        Arc::new(Transfers { guest, pending: AtomicBool::new(false), reply: Mutex::new(None), floor: AtomicU64::new(0),
            boot_records: Mutex::new(None),
            mem: Mutex::new(None),
            pre: Mutex::new(PreCopy::default()),
            tracking: AtomicBool::new(false),
        })
    }

    /// The guest's memory, for pre-copy (without it, the whole snapshot is
    /// taken during the pause).
    pub fn set_mem(&self, mem: GuestMemoryMmap) {
        *self.mem.lock().unwrap() = Some(mem);
    }

    /// The recorder turned dirty-page tracking on; it reports every call
    /// of the dirty log from now on.
    pub fn tracking_on(&self) {
        self.tracking.store(true, Ordering::SeqCst);
    }

    /// Pages the dirty log reported (each call starts a new interval, so
    /// every caller must report here).
    pub fn note_dirty(&self, pages: &[u64]) {
        let mut p = self.pre.lock().unwrap();
        if let Some(d) = &mut p.dirty {
            d.extend(pages.iter().map(|&gpa| (gpa / CHUNK) as usize));
        }
    }

    /// Copies all of guest memory while the guest runs, noting what it
    /// writes meanwhile; the snapshot asked for next uses the copy. Returns
    /// how many chunks were written during the pass; an error (no memory,
    /// no tracking, `stop`) leaves the whole capture to the pause.
    pub fn precopy(&self, stop: &AtomicBool) -> Result<usize, String> {
        let mem = self.mem.lock().unwrap().clone().ok_or("no guest memory to pre-copy")?;
        let generation = {
            let mut p = self.pre.lock().unwrap();
            p.generation += 1;
            p.dirty = Some(BTreeSet::new());
            p.chunks = None;
            p.generation
        };
        // Checked after the dirty set exists: every write from here on is
        // in a later call of the dirty log.
        if !self.tracking.load(Ordering::SeqCst) {
            self.pre.lock().unwrap().dirty = None;
            return Err("the vCPU does not track dirty pages yet".into());
        }
        let size = self.guest.mem_bytes;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut chunks = Vec::with_capacity(chunk_count(size));
        let copied = (0..chunk_count(size)).try_for_each(|i| {
            if stop.load(Ordering::Relaxed) {
                return Err("stopped".to_string());
            }
            chunks.push(capture_chunk(&mem, size, i, &mut buf)?);
            Ok(())
        });
        let mut p = self.pre.lock().unwrap();
        if let Err(e) = copied {
            if p.generation == generation {
                p.dirty = None;
            }
            return Err(e);
        }
        if p.generation != generation {
            return Err("another backup's transfer started".into());
        }
        let n = p.dirty.as_ref().map_or(0, BTreeSet::len);
        p.chunks = Some(chunks);
        Ok(n)
    }

    /// Guest memory for a snapshot at this exit (guest paused, its dirty
    /// pages up to now reported): the pre-copy with the chunks written
    /// since captured again, or all of it if there was no pre-copy. Ends
    /// the pre-copy. Returns the image and how many chunks were captured.
    pub fn memory_now(&self, mem: &GuestMemoryMmap) -> Result<(MemoryImage, usize), String> {
        let size = self.guest.mem_bytes;
        let (dirty, chunks) = {
            let mut p = self.pre.lock().unwrap();
            (p.dirty.take(), p.chunks.take())
        };
        match (dirty, chunks) {
            (Some(dirty), Some(mut chunks)) if chunks.len() == chunk_count(size) => {
                let mut buf = vec![0u8; CHUNK as usize];
                for &i in &dirty {
                    if let Some(c) = chunks.get_mut(i) {
                        *c = capture_chunk(mem, size, i, &mut buf)?;
                    }
                }
                Ok((MemoryImage::from_chunks(size, chunks)?, dirty.len()))
            }
            _ => Ok((MemoryImage::capture(mem, size)?, chunk_count(size))),
        }
    }

    /// This VMM's log starts at boot; its records at `offset`.
    pub fn set_boot_records(&self, offset: usize) {
        *self.boot_records.lock().unwrap() = Some(offset);
    }

    pub fn boot_records(&self) -> Option<usize> {
        *self.boot_records.lock().unwrap()
    }

    /// Asks for a snapshot at the vCPU's next exit; the answer comes on
    /// the returned channel. A request still unanswered is replaced (its
    /// sender, a stream that was given up, gets nothing).
    pub fn request(&self) -> Receiver<Result<Taken, String>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *self.reply.lock().unwrap() = Some(tx);
        self.floor.store(u64::MAX, Ordering::SeqCst);
        self.pending.store(true, Ordering::SeqCst);
        rx
    }

    /// Whether a snapshot is asked for (cheap: checked at every exit).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes the request, for the vCPU thread to answer.
    pub fn take(&self) -> Option<Sender<Result<Taken, String>>> {
        self.pending.store(false, Ordering::SeqCst);
        self.reply.lock().unwrap().take()
    }

    /// A backup joins: until its transfer starts there is nothing to
    /// throttle the guest against (call before the gate waits for it).
    pub fn joining(&self) {
        self.floor.store(u64::MAX, Ordering::SeqCst);
    }

    /// The snapshot was taken at `ordinal` (0: the backup replays from
    /// boot).
    pub fn taken_at(&self, ordinal: u64) {
        self.floor.store(ordinal, Ordering::SeqCst);
    }

    /// What the lag throttle counts the backup as having, at least.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn guest(mem_bytes: u64) -> Header {
        Header { kernel_sha256: [1; 32], initrd_sha256: None, mem_bytes, cmdline: String::new(), ftvm_version: "t".into(), kernel_name: "t".into(), net_mac: None }
    }

    fn image_bytes(img: &MemoryImage, size: u64) -> Vec<u8> {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        img.restore(&m).unwrap();
        let mut v = vec![0u8; size as usize];
        m.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    }

    #[test]
    fn precopy_plus_dirty_chunks_is_memory_as_it_is_now() {
        let size = 4 * CHUNK;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        mem.write_slice(&[7u8; 4096], GuestAddress(CHUNK)).unwrap();
        let t = Transfers::new(guest(size));
        t.set_mem(mem.clone());
        let stop = AtomicBool::new(false);
        assert!(t.precopy(&stop).is_err(), "pre-copy without dirty tracking");
        t.tracking_on();
        assert_eq!(t.precopy(&stop), Ok(0));
        // The guest writes two pages after the pass; the dirty log reports them.
        mem.write_slice(&[9u8; 4096], GuestAddress(3 * CHUNK + 8192)).unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(CHUNK)).unwrap();
        t.note_dirty(&[3 * CHUNK + 8192, CHUNK]);
        let (img, n) = t.memory_now(&mem).unwrap();
        assert_eq!(n, 2, "only the written chunks are captured in the pause");
        let mut now = vec![0u8; size as usize];
        mem.read_slice(&mut now, GuestAddress(0)).unwrap();
        assert!(image_bytes(&img, size) == now);
        // Without a pre-copy, everything is captured in the pause.
        let (img, n) = t.memory_now(&mem).unwrap();
        assert_eq!(n, 4);
        assert!(image_bytes(&img, size) == now);
    }

    #[test]
    fn a_write_not_reported_would_be_missed() {
        // Why every call of the dirty log must report here.
        let size = 2 * CHUNK;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let t = Transfers::new(guest(size));
        t.set_mem(mem.clone());
        t.tracking_on();
        t.precopy(&AtomicBool::new(false)).unwrap();
        mem.write_slice(&[5u8; 16], GuestAddress(100)).unwrap();
        let (img, n) = t.memory_now(&mem).unwrap();
        assert_eq!(n, 0);
        assert_eq!(image_bytes(&img, size)[100], 0);
    }

    #[test]
    fn a_stopped_precopy_leaves_everything_to_the_pause() {
        let size = 2 * CHUNK;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let t = Transfers::new(guest(size));
        t.set_mem(mem.clone());
        t.tracking_on();
        assert!(t.precopy(&AtomicBool::new(true)).is_err());
        assert_eq!(t.memory_now(&mem).unwrap().1, 2);
    }
}
