//! Reading ELF files: the one place ftvm parses ELF.
//!
//! Guest kernels are ELF files the user hands us (a vmlinux, the built-in
//! test guest, a vmlinux extracted from a bzImage), so every field in them
//! is untrusted. Rather than reading offsets by hand in each place that
//! needs one, everything goes through this thin wrapper around the `object`
//! crate's ELF reader, which bounds-checks every table against the file.
//! This module adds what ftvm needs on top: it accepts only what ftvm can
//! boot (64-bit, little-endian, x86-64) and turns the reader's terse
//! messages into errors that name the file and say what is wrong and where,
//! checking the header tables itself first so those errors can give
//! offsets and sizes.
//!
//! The actual loading into guest memory is left to linux-loader; this is
//! for looking at the file: validating it before it is loaded, the
//! sections `linux::patch_rdtsc` rewrites, the program headers that map
//! virtual to physical addresses, and the notes that mark a Linux kernel.

use std::fmt;

use object::elf::{
    FileHeader64, ProgramHeader64, SectionHeader64, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB, ELFMAG,
    EM_X86_64, EV_CURRENT, PT_LOAD, PT_NOTE, SHF_EXECINSTR, SHT_NOBITS, SHT_PROGBITS,
};
use object::read::elf::{FileHeader as _, ProgramHeader as _, SectionHeader as _, SectionTable};
use object::LittleEndian;

type Header = FileHeader64<LittleEndian>;
const LE: LittleEndian = LittleEndian;
/// Sizes of the ELF64 header and table entries (what e_ehsize,
/// e_phentsize and e_shentsize must say).
const EHDR_SIZE: usize = std::mem::size_of::<Header>();
const PHDR_SIZE: usize = std::mem::size_of::<ProgramHeader64<LittleEndian>>();
const SHDR_SIZE: usize = std::mem::size_of::<SectionHeader64<LittleEndian>>();

/// Whether `b` starts with the ELF magic. A cheap sniff for callers that
/// only need to tell an ELF file from something else (the bzImage
/// extractor's sanity check on its output); [`Elf::parse`] validates.
pub fn has_magic(b: &[u8]) -> bool {
    b.starts_with(&ELFMAG)
}

/// Why a file could not be read as an ELF file ftvm can boot, and where.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ElfError {
    /// The file, as the user named it.
    pub name: String,
    pub problem: ElfProblem,
}

/// What is wrong with an ELF file. Kept apart from the file name so a
/// caller can phrase it in its own sentence ("X is not a guest kernel: ..").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfProblem {
    #[error("the file is empty")]
    Empty,
    #[error("not an ELF file (found bytes {found} at offset 0; an ELF file starts with 7f 45 4c 46)")]
    NotElf { found: String },
    #[error("truncated ELF header: the file is {len} bytes, a 64-bit ELF header needs {EHDR_SIZE}")]
    TruncatedHeader { len: usize },
    #[error("32-bit ELF (ELFCLASS32 at byte 4): ftvm boots 64-bit x86-64 ELF files only")]
    Class32,
    #[error("invalid ELF class {0} at byte 4 (a 64-bit ELF file has 2, ELFCLASS64)")]
    BadClass(u8),
    #[error("big-endian ELF (ELFDATA2MSB at byte 5): ftvm boots little-endian x86-64 ELF files only")]
    BigEndian,
    #[error("invalid ELF data encoding {0} at byte 5 (a little-endian ELF file has 1, ELFDATA2LSB)")]
    BadEncoding(u8),
    #[error("unsupported ELF version {0} at byte 6 (expected 1, EV_CURRENT)")]
    BadVersion(u8),
    #[error("not x86-64: e_machine is {machine} ({}), x86-64 is 62", machine_name(*machine))]
    NotX86_64 { machine: u16 },
    #[error("{table} entries are {size} bytes (e_{}entsize), a 64-bit ELF file's are {expected}", table.prefix())]
    BadEntrySize { table: Table, size: u16, expected: usize },
    #[error(
        "truncated {table} table at offset {offset:#x}: {count} entries of {entsize} bytes end at {}, past the end of the file ({len:#x} bytes)",
        end_of(*offset, *count, *entsize)
    )]
    TruncatedTable { table: Table, offset: u64, count: u64, entsize: u64, len: usize },
    #[error("loadable segment {index} (offset {offset:#x}, {filesz:#x} bytes) runs past the end of the file ({len:#x} bytes)")]
    SegmentPastEnd { index: usize, offset: u64, filesz: u64, len: usize },
    #[error("section {index}: its name at offset {offset:#x} in the section name table is not inside that table")]
    BadSectionName { index: usize, offset: u32 },
    #[error("section {section} (offset {offset:#x}, {size:#x} bytes) runs past the end of the file ({len:#x} bytes)")]
    SectionPastEnd { section: String, offset: u64, size: u64, len: usize },
    /// Anything else `object` rejects; its message says what.
    #[error("malformed ELF: {0}")]
    Malformed(String),
}

/// The two header tables, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    ProgramHeaders,
    SectionHeaders,
}

impl Table {
    fn prefix(self) -> &'static str {
        match self {
            Table::ProgramHeaders => "ph",
            Table::SectionHeaders => "sh",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::ProgramHeaders => "program header",
            Table::SectionHeaders => "section header",
        })
    }
}

/// Where a table of `count` entries of `entsize` bytes at `offset` ends,
/// written out (it may not fit in 64 bits).
fn end_of(offset: u64, count: u64, entsize: u64) -> String {
    let end = u128::from(offset) + u128::from(count) * u128::from(entsize);
    format!("{end:#x}")
}

fn machine_name(m: u16) -> &'static str {
    match m {
        object::elf::EM_386 => "i386",
        object::elf::EM_ARM => "32-bit ARM",
        object::elf::EM_AARCH64 => "AArch64",
        object::elf::EM_RISCV => "RISC-V",
        object::elf::EM_PPC64 => "PowerPC64",
        object::elf::EM_S390 => "s390",
        object::elf::EM_NONE => "none",
        _ => "unknown",
    }
}

/// A program header (segment), with the fields ftvm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// `p_type`: [`PT_LOAD`], [`PT_NOTE`], ...
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
}

impl Segment {
    pub fn is_load(&self) -> bool {
        self.kind == PT_LOAD
    }
}

/// A section header with its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Index in the section header table (0 is the null section, never
    /// returned).
    pub index: usize,
    pub name: String,
    /// `sh_type`: [`SHT_PROGBITS`], [`SHT_NOBITS`], ...
    pub kind: u32,
    pub flags: u64,
    /// Virtual address when loaded.
    pub addr: u64,
    /// Offset of its bytes in the file (meaningless for `SHT_NOBITS`).
    pub offset: u64,
    pub size: u64,
}

impl Section {
    /// Code: `SHF_EXECINSTR` set.
    pub fn is_executable(&self) -> bool {
        self.flags & u64::from(SHF_EXECINSTR) != 0
    }

    /// Has bytes in the file (`SHT_PROGBITS`), as opposed to `.bss` and
    /// metadata sections.
    pub fn is_progbits(&self) -> bool {
        self.kind == SHT_PROGBITS
    }
}

/// An ELF note (from a `PT_NOTE` segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// The owner, without its terminating NULs ("Linux", "Xen", "GNU").
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// A validated 64-bit little-endian x86-64 ELF file.
///
/// [`Elf::parse`] checks the file header and the program header table;
/// the section header table is checked when [`Elf::sections`] is called,
/// so a file that is only loaded (linux-loader reads program headers
/// only) is not refused for a damaged section table it never uses.
pub struct Elf<'a> {
    name: &'a str,
    data: &'a [u8],
    header: &'a Header,
    phdrs: &'a [ProgramHeader64<LittleEndian>],
}

impl<'a> Elf<'a> {
    /// Parses and validates `data`; `name` (the file as the user named it)
    /// goes into errors.
    pub fn parse(name: &'a str, data: &'a [u8]) -> Result<Self, ElfError> {
        let err = |problem| ElfError { name: name.into(), problem };
        if data.is_empty() {
            return Err(err(ElfProblem::Empty));
        }
        if !has_magic(data) {
            let found: Vec<String> = data.iter().take(4).map(|b| format!("{b:02x}")).collect();
            return Err(err(ElfProblem::NotElf { found: found.join(" ") }));
        }
        if data.len() < EHDR_SIZE {
            return Err(err(ElfProblem::TruncatedHeader { len: data.len() }));
        }
        // The e_ident checks `object` does, one by one so the error says which.
        match data[4] {
            ELFCLASS64 => {}
            ELFCLASS32 => return Err(err(ElfProblem::Class32)),
            c => return Err(err(ElfProblem::BadClass(c))),
        }
        match data[5] {
            ELFDATA2LSB => {}
            ELFDATA2MSB => return Err(err(ElfProblem::BigEndian)),
            d => return Err(err(ElfProblem::BadEncoding(d))),
        }
        if data[6] != EV_CURRENT {
            return Err(err(ElfProblem::BadVersion(data[6])));
        }
        let header = Header::parse(data).map_err(|e| err(ElfProblem::Malformed(object_msg(e))))?;
        let machine = header.e_machine(LE);
        if machine != EM_X86_64 {
            return Err(err(ElfProblem::NotX86_64 { machine }));
        }

        // Program headers, as `object` reads them (an e_phoff of 0 or an
        // e_phnum of 0 means none), with the table's bounds checked here
        // first so the error can say where it is.
        let phoff = header.e_phoff(LE);
        let phnum = header.phnum(LE, data).map_err(|e| err(ElfProblem::Malformed(object_msg(e))))?;
        if phoff != 0 && phnum != 0 {
            let size = header.e_phentsize(LE);
            if usize::from(size) != PHDR_SIZE {
                return Err(err(ElfProblem::BadEntrySize { table: Table::ProgramHeaders, size, expected: PHDR_SIZE }));
            }
            check_table(data, Table::ProgramHeaders, phoff, phnum as u64, PHDR_SIZE).map_err(err)?;
        }
        let phdrs = header.program_headers(LE, data).map_err(|e| err(ElfProblem::Malformed(object_msg(e))))?;
        Ok(Elf { name, data, header, phdrs })
    }

    fn err(&self, problem: ElfProblem) -> ElfError {
        ElfError { name: self.name.into(), problem }
    }

    /// The entry point (`e_entry`).
    pub fn entry(&self) -> u64 {
        self.header.e_entry(LE)
    }

    /// Every program header, in table order.
    pub fn segments(&self) -> impl Iterator<Item = Segment> + 'a {
        self.phdrs.iter().map(|p| Segment {
            kind: p.p_type(LE),
            flags: p.p_flags(LE),
            offset: p.p_offset(LE),
            vaddr: p.p_vaddr(LE),
            paddr: p.p_paddr(LE),
            filesz: p.p_filesz(LE),
            memsz: p.p_memsz(LE),
            align: p.p_align(LE),
        })
    }

    /// Checks that every loadable segment's bytes are in the file, so a
    /// truncated kernel is refused with an error that says so before
    /// anything is loaded.
    pub fn check_load_segments(&self) -> Result<(), ElfError> {
        for (index, s) in self.segments().enumerate().filter(|(_, s)| s.is_load()) {
            if s.offset.checked_add(s.filesz).is_none_or(|end| end > self.data.len() as u64) {
                let len = self.data.len();
                return Err(self.err(ElfProblem::SegmentPastEnd { index, offset: s.offset, filesz: s.filesz, len }));
            }
        }
        Ok(())
    }

    /// The section header table, bounds-checked, with its name table.
    fn section_table(&self) -> Result<SectionTable<'a, Header>, ElfError> {
        let (h, data) = (self.header, self.data);
        let shoff = h.e_shoff(LE);
        if shoff == 0 {
            return Ok(SectionTable::default());
        }
        let size = h.e_shentsize(LE);
        if usize::from(size) != SHDR_SIZE {
            return Err(self.err(ElfProblem::BadEntrySize { table: Table::SectionHeaders, size, expected: SHDR_SIZE }));
        }
        if h.e_shnum(LE) == 0 {
            // The real count is in section 0 (more than 0xff00 sections),
            // which must then be there to read.
            check_table(data, Table::SectionHeaders, shoff, 1, SHDR_SIZE).map_err(|p| self.err(p))?;
        }
        let shnum = h.shnum(LE, data).map_err(|e| self.err(ElfProblem::Malformed(object_msg(e))))?;
        check_table(data, Table::SectionHeaders, shoff, shnum as u64, SHDR_SIZE).map_err(|p| self.err(p))?;
        h.sections(LE, data).map_err(|e| self.err(ElfProblem::Malformed(object_msg(e))))
    }

    /// Every section but the null one, in table order, with names.
    pub fn sections(&self) -> Result<Vec<Section>, ElfError> {
        let table = self.section_table()?;
        table
            .enumerate()
            .skip(1)
            .map(|(index, sh)| {
                let name = table
                    .section_name(LE, sh)
                    .map_err(|_| self.err(ElfProblem::BadSectionName { index: index.0, offset: sh.sh_name(LE) }))?;
                Ok(Section {
                    index: index.0,
                    name: String::from_utf8_lossy(name).into_owned(),
                    kind: sh.sh_type(LE),
                    flags: sh.sh_flags(LE),
                    addr: sh.sh_addr(LE),
                    offset: sh.sh_offset(LE),
                    size: sh.sh_size(LE),
                })
            })
            .collect()
    }

    /// The first section called `name`, if any.
    pub fn section_by_name(&self, name: &str) -> Result<Option<Section>, ElfError> {
        Ok(self.sections()?.into_iter().find(|s| s.name == name))
    }

    /// Where a section's bytes lie in the file (empty for `SHT_NOBITS`),
    /// checked against the file's length.
    pub fn section_range(&self, s: &Section) -> Result<std::ops::Range<usize>, ElfError> {
        if s.kind == SHT_NOBITS {
            return Ok(0..0);
        }
        let past_end = || {
            self.err(ElfProblem::SectionPastEnd {
                section: s.name.clone(),
                offset: s.offset,
                size: s.size,
                len: self.data.len(),
            })
        };
        let start = usize::try_from(s.offset).map_err(|_| past_end())?;
        let end = usize::try_from(s.size).ok().and_then(|n| start.checked_add(n)).ok_or_else(past_end)?;
        if end > self.data.len() {
            return Err(past_end());
        }
        Ok(start..end)
    }

    /// A section's bytes (empty for `SHT_NOBITS`).
    pub fn section_data(&self, s: &Section) -> Result<&'a [u8], ElfError> {
        Ok(&self.data[self.section_range(s)?])
    }

    /// The notes of every `PT_NOTE` segment, in file order. A segment whose
    /// notes are damaged yields the ones before the damage and then one
    /// error, and the next segment's notes follow.
    pub fn notes(&self) -> impl Iterator<Item = Result<Note<'a>, ElfError>> + '_ {
        self.phdrs.iter().filter(|p| p.p_type(LE) == PT_NOTE).flat_map(move |p| {
            let mut out = Vec::new();
            match p.notes(LE, self.data) {
                Ok(Some(mut it)) => loop {
                    match it.next() {
                        Ok(Some(n)) => out.push(Ok(Note { name: n.name(), kind: n.n_type(LE), desc: n.desc() })),
                        Ok(None) => break,
                        Err(e) => {
                            out.push(Err(self.err(ElfProblem::Malformed(object_msg(e)))));
                            break;
                        }
                    }
                },
                Ok(None) => {}
                Err(e) => out.push(Err(self.err(ElfProblem::Malformed(object_msg(e))))),
            }
            out
        })
    }
}

/// Checks that a table of `count` entries of `entsize` bytes at `offset`
/// lies inside `data`.
fn check_table(data: &[u8], table: Table, offset: u64, count: u64, entsize: usize) -> Result<(), ElfProblem> {
    let end = count.checked_mul(entsize as u64).and_then(|n| n.checked_add(offset));
    match end {
        Some(end) if end <= data.len() as u64 => Ok(()),
        _ => Err(ElfProblem::TruncatedTable { table, offset, count, entsize: entsize as u64, len: data.len() }),
    }
}

/// `object`'s error message (a short phrase such as "Invalid ELF note
/// namesz"), kept as text so [`ElfProblem`] stays `Clone + PartialEq`.
fn object_msg(e: object::read::Error) -> String {
    e.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GUEST: &[u8] = ftvm_guest::TEST_GUEST_ELF;

    fn put_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn get_u64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn problem(b: &[u8]) -> ElfProblem {
        match Elf::parse("f.elf", b) {
            Ok(_) => panic!("parsed"),
            Err(e) => {
                assert!(e.to_string().starts_with("f.elf: "), "{e}");
                e.problem
            }
        }
    }

    /// The test guest with a `PT_NOTE` segment added (appended to the file,
    /// with a copy of the program header table grown by one entry), holding
    /// a "Xen" and a "Linux" note as a vmlinux does.
    pub(crate) fn with_linux_notes() -> Vec<u8> {
        let mut b = GUEST.to_vec();
        b.resize(b.len().next_multiple_of(8), 0);
        let note_off = b.len();
        for (name, kind, desc) in [(&b"Xen\0"[..], 6u32, &b"linux\0"[..]), (b"Linux\0", 0x100, b"6.1.0\0")] {
            b.extend_from_slice(&(name.len() as u32).to_le_bytes());
            b.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            b.extend_from_slice(&kind.to_le_bytes());
            for part in [name, desc] {
                b.extend_from_slice(part);
                b.resize(b.len().next_multiple_of(4), 0);
            }
        }
        let note_len = b.len() - note_off;
        b.resize(b.len().next_multiple_of(8), 0);
        let (phoff, phnum) = (get_u64(&b, 0x20) as usize, u16::from_le_bytes([b[0x38], b[0x39]]) as usize);
        let new_phoff = b.len();
        b.extend_from_slice(&GUEST[phoff..phoff + phnum * PHDR_SIZE]);
        let mut ph = [0u8; PHDR_SIZE];
        put_u32(&mut ph, 0, PT_NOTE);
        put_u32(&mut ph, 4, 4); // PF_R
        put_u64(&mut ph, 8, note_off as u64);
        put_u64(&mut ph, 32, note_len as u64);
        put_u64(&mut ph, 40, note_len as u64);
        put_u64(&mut ph, 48, 4);
        b.extend_from_slice(&ph);
        put_u64(&mut b, 0x20, new_phoff as u64);
        put_u16(&mut b, 0x38, (phnum + 1) as u16);
        b
    }

    #[test]
    fn reads_the_test_guest() {
        let e = Elf::parse("guest", GUEST).unwrap();
        assert_eq!(e.entry(), 0x10_0000);
        let loads: Vec<Segment> = e.segments().filter(Segment::is_load).collect();
        assert!(!loads.is_empty());
        assert!(loads.iter().all(|s| s.paddr == s.vaddr && s.memsz >= s.filesz));
        let text = e.section_by_name(".text").unwrap().expect(".text");
        assert!(text.is_executable() && text.is_progbits());
        assert_eq!(text.addr, e.entry());
        let code = e.section_data(&text).unwrap();
        assert_eq!(code.len() as u64, text.size);
        // The bytes of .text are where its loadable segment says.
        let seg = loads.iter().find(|s| (s.vaddr..s.vaddr + s.filesz).contains(&text.addr)).unwrap();
        let at = (seg.offset + text.addr - seg.vaddr) as usize;
        assert_eq!(&GUEST[at..at + code.len()], code);
        let bss = e.section_by_name(".bss").unwrap().expect(".bss");
        assert_eq!(e.section_data(&bss).unwrap(), &[] as &[u8]);
        assert!(e.section_by_name(".nonexistent").unwrap().is_none());
        assert_eq!(e.notes().count(), 0);
    }

    #[test]
    fn reads_notes() {
        let b = with_linux_notes();
        let e = Elf::parse("t", &b).unwrap();
        let notes: Vec<Note> = e.notes().map(Result::unwrap).collect();
        assert_eq!(notes.len(), 2);
        assert_eq!((notes[0].name, notes[0].kind, notes[0].desc), (&b"Xen"[..], 6, &b"linux\0"[..]));
        assert_eq!((notes[1].name, notes[1].kind, notes[1].desc), (&b"Linux"[..], 0x100, &b"6.1.0\0"[..]));
        // A note whose name runs past its segment: the notes before it,
        // then an error.
        let mut bad = b.clone();
        let note2 = notes_offset(&b) + 12 + 4 + 8;
        put_u32(&mut bad, note2, 0x7fff_ffff);
        let e = Elf::parse("t", &bad).unwrap();
        let got: Vec<_> = e.notes().collect();
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        assert!(got[1].as_ref().unwrap_err().to_string().starts_with("t: malformed ELF: "), "{:?}", got[1]);
    }

    fn notes_offset(b: &[u8]) -> usize {
        let e = Elf::parse("t", b).unwrap();
        let s = e.segments().find(|s| s.kind == PT_NOTE).unwrap();
        s.offset as usize
    }

    #[test]
    fn names_the_problem() {
        assert_eq!(problem(b""), ElfProblem::Empty);
        let e = problem(b"hello world");
        assert_eq!(e, ElfProblem::NotElf { found: "68 65 6c 6c".into() });
        assert!(e.to_string().contains("not an ELF file (found bytes 68 65 6c 6c"), "{e}");
        assert_eq!(problem(&GUEST[..40]), ElfProblem::TruncatedHeader { len: 40 });
        assert_eq!(problem(&GUEST[..3]), ElfProblem::NotElf { found: "7f 45 4c".into() });

        let with = |at: usize, v: u8| {
            let mut b = GUEST.to_vec();
            b[at] = v;
            problem(&b)
        };
        assert_eq!(with(4, 1), ElfProblem::Class32);
        assert!(ElfProblem::Class32.to_string().contains("32-bit ELF"));
        assert_eq!(with(4, 7), ElfProblem::BadClass(7));
        assert_eq!(with(5, 2), ElfProblem::BigEndian);
        assert_eq!(with(5, 0), ElfProblem::BadEncoding(0));
        assert_eq!(with(6, 0), ElfProblem::BadVersion(0));

        let mut arm = GUEST.to_vec();
        put_u16(&mut arm, 0x12, object::elf::EM_AARCH64);
        let e = problem(&arm);
        assert_eq!(e, ElfProblem::NotX86_64 { machine: 183 });
        assert!(e.to_string().starts_with("not x86-64: e_machine is 183 (AArch64)"), "{e}");
    }

    #[test]
    fn program_header_table_out_of_bounds() {
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x38, 0xfff0);
        let e = problem(&b);
        assert!(
            matches!(e, ElfProblem::TruncatedTable { table: Table::ProgramHeaders, offset: 0x40, count: 0xfff0, .. }),
            "{e:?}"
        );
        assert!(
            e.to_string().starts_with("truncated program header table at offset 0x40: 65520 entries of 56 bytes"),
            "{e}"
        );
        let mut b = GUEST.to_vec();
        put_u64(&mut b, 0x20, u64::MAX - 8);
        assert!(matches!(problem(&b), ElfProblem::TruncatedTable { table: Table::ProgramHeaders, .. }));
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x36, 32);
        assert_eq!(problem(&b), ElfProblem::BadEntrySize { table: Table::ProgramHeaders, size: 32, expected: 56 });
        // A loadable segment past the end of the file.
        let e = Elf::parse("g", &GUEST[..0x2000]).unwrap().check_load_segments().unwrap_err();
        assert!(matches!(e.problem, ElfProblem::SegmentPastEnd { index: 0, offset: 0x1000, .. }), "{e}");
        assert!(e.to_string().starts_with("g: loadable segment 0 (offset 0x1000, "), "{e}");
        Elf::parse("g", GUEST).unwrap().check_load_segments().unwrap();
        // No program headers is not an error in itself.
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x38, 0);
        assert_eq!(Elf::parse("t", &b).unwrap().segments().count(), 0);
    }

    fn section_problem(b: &[u8]) -> ElfProblem {
        let e = Elf::parse("f.elf", b).expect("the header is fine");
        let err = e.sections().unwrap_err();
        assert!(err.to_string().starts_with("f.elf: "), "{err}");
        err.problem
    }

    #[test]
    fn section_header_table_out_of_bounds() {
        let shoff = get_u64(GUEST, 0x28);
        let shnum = u16::from_le_bytes([GUEST[0x3c], GUEST[0x3d]]);
        // Cut off the last section header.
        let short = &GUEST[..GUEST.len() - 1];
        let e = section_problem(short);
        assert!(
            e.to_string()
                .starts_with(&format!("truncated section header table at offset {shoff:#x}: {shnum} entries of 64 bytes")),
            "{e}"
        );
        // e_shoff pointing past the end, and overflowing with the size.
        let mut b = GUEST.to_vec();
        put_u64(&mut b, 0x28, GUEST.len() as u64 + 0x1000);
        assert!(matches!(section_problem(&b), ElfProblem::TruncatedTable { table: Table::SectionHeaders, .. }));
        put_u64(&mut b, 0x28, u64::MAX - 63);
        assert!(matches!(section_problem(&b), ElfProblem::TruncatedTable { table: Table::SectionHeaders, .. }));
        // A huge section count.
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x3c, 0xfeff);
        assert!(matches!(
            section_problem(&b),
            ElfProblem::TruncatedTable { table: Table::SectionHeaders, count: 0xfeff, .. }
        ));
        // An extended count (e_shnum 0) whose section 0 lies past the end.
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x3c, 0);
        put_u64(&mut b, 0x28, GUEST.len() as u64 - 10);
        assert!(matches!(
            section_problem(&b),
            ElfProblem::TruncatedTable { table: Table::SectionHeaders, count: 1, .. }
        ));
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x3a, 40);
        assert_eq!(
            section_problem(&b),
            ElfProblem::BadEntrySize { table: Table::SectionHeaders, size: 40, expected: 64 }
        );
        // The program headers are still readable: loading needs only them.
        assert!(Elf::parse("t", &b).unwrap().segments().count() > 0);
    }

    #[test]
    fn garbage_section_table() {
        let shoff = get_u64(GUEST, 0x28) as usize;
        let shnum = u16::from_le_bytes([GUEST[0x3c], GUEST[0x3d]]) as usize;
        // A name offset past the name table.
        let mut b = GUEST.to_vec();
        put_u32(&mut b, shoff + SHDR_SIZE, 0xffff_fff0);
        assert_eq!(section_problem(&b), ElfProblem::BadSectionName { index: 1, offset: 0xffff_fff0 });
        // A section name table index past the table.
        let mut b = GUEST.to_vec();
        put_u16(&mut b, 0x3e, 200);
        assert!(matches!(section_problem(&b), ElfProblem::Malformed(_)));
        // The whole table overwritten with a pattern.
        let mut b = GUEST.to_vec();
        for (i, x) in b[shoff..shoff + shnum * SHDR_SIZE].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(151).wrapping_add(17);
        }
        assert!(Elf::parse("t", &b).unwrap().sections().is_err());
        // A section whose bytes lie past the end of the file.
        let mut b = GUEST.to_vec();
        let text = Elf::parse("t", GUEST).unwrap().section_by_name(".text").unwrap().unwrap();
        let sh = shoff + text.index * SHDR_SIZE;
        put_u64(&mut b, sh + 0x20, GUEST.len() as u64);
        let e = Elf::parse("t", &b).unwrap();
        let text = e.section_by_name(".text").unwrap().unwrap();
        let err = e.section_data(&text).unwrap_err();
        assert!(matches!(err.problem, ElfProblem::SectionPastEnd { .. }), "{err}");
        assert!(err.to_string().starts_with("t: section .text (offset 0x1000, "), "{err}");
        put_u64(&mut b, sh + 0x18, u64::MAX);
        let e = Elf::parse("t", &b).unwrap();
        assert!(e.section_data(&e.section_by_name(".text").unwrap().unwrap()).is_err());
    }

    /// Every reader in this module on `b`: it may fail, it must not panic.
    pub(crate) fn read_everything(b: &[u8]) {
        let Ok(e) = Elf::parse("fuzz", b) else { return };
        let _ = e.entry();
        let _ = e.segments().count();
        let _ = e.check_load_segments();
        let _ = e.notes().count();
        if let Ok(sections) = e.sections() {
            for s in &sections {
                let _ = e.section_data(s);
            }
        }
    }

    /// A small deterministic PRNG (xorshift64*), so a failure reproduces.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Offsets worth damaging: the header, both tables, the notes.
    pub(crate) fn hot_spots(b: &[u8]) -> Vec<std::ops::Range<usize>> {
        let e = Elf::parse("t", b).unwrap();
        let shoff = get_u64(b, 0x28) as usize;
        let phoff = get_u64(b, 0x20) as usize;
        let mut v = vec![
            0..EHDR_SIZE,
            phoff..phoff + e.segments().count() * PHDR_SIZE,
            shoff..b.len().min(shoff + 7 * SHDR_SIZE),
        ];
        v.extend(e.segments().filter(|s| s.kind == PT_NOTE).map(|s| s.offset as usize..(s.offset + s.filesz) as usize));
        v
    }

    #[test]
    fn no_panic_on_truncated_or_damaged_files() {
        for base in [GUEST.to_vec(), with_linux_notes()] {
            for len in 0..=base.len() {
                read_everything(&base[..len]);
            }
            let spots = hot_spots(&base);
            let mut rng = Rng(0x5eed_e1f0_0d15_ea5e);
            for _ in 0..20_000 {
                let mut b = base.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = if rng.below(4) == 0 {
                        rng.below(b.len())
                    } else {
                        let r = &spots[rng.below(spots.len())];
                        (r.start + rng.below(r.len().max(1))).min(b.len() - 1)
                    };
                    b[at] = match rng.below(3) {
                        0 => b[at] ^ (1 << rng.below(8)),
                        1 => 0xff,
                        _ => rng.next() as u8,
                    };
                }
                read_everything(&b);
            }
        }
    }
}
