//! ftvm's built-in test guest: a small x86-64 kernel in C and GNU assembly
//! (`guest/testguest/`), compiled by this crate's `build.rs` with the host
//! gcc and embedded here as a static ELF64 image.
//!
//! # Boot contract
//!
//! The VMM loads each `PT_LOAD` segment at its physical address (the image
//! is linked at 1 MiB, `p_paddr == p_vaddr`; the `.bss` part of the data
//! segment need not be zeroed, the guest does that) and enters at the ELF
//! entry point:
//!
//! * 64-bit long mode, CPL0, paging on with an identity map of the first
//!   4 GiB; GDT with a 64-bit code selector 0x08 and data selector 0x10;
//! * RFLAGS = 0x2 (interrupts off), any (empty) IDT: the guest loads its own;
//! * RSP anywhere usable (the VMM uses 0x8ff0): the guest switches to its
//!   own 16 KiB stack in `.bss` before using it;
//! * RDI = guest-physical address of a NUL-terminated command line (may be
//!   empty; at most 4095 bytes are read), RSI = guest memory size in bytes.
//!
//! The machine it expects: one CPU; a 16550 UART at 0x3f8 on IRQ4; two
//! 8259A PICs (0x20/0x21, 0xa0/0xa1), which the guest programs with ICW1-4
//! (vector bases 0x20/0x28, cascade on IRQ2, 8086 mode, edge-triggered) and
//! masks down to IRQ0, IRQ2 and IRQ4; an 8254 PIT at 0x40-0x43 (1193182 Hz,
//! channel 0 on IRQ0); a CMOS RTC at 0x70/0x71; and a debug exit port 0xf4,
//! where a byte written ends the VM with that exit status (0: the run
//! finished; 3: CPU exception; 4: unexpected interrupt vector).
//!
//! The code uses only plain integer instructions plus `in`/`out`, `cli`,
//! `sti`, `hlt`, `lidt` and `iretq`, and for spin mode at CPL3 `lgdt`,
//! `ltr`, `mov` to CR3 and one `ud2` (the planned exit from CPL3, at
//! `user_exit_ud2`): no `int`/`int3`, `rdtsc(p)`, `rdrand`, `rdseed`,
//! `cpuid`, `xsave`/`xrstor`, `cmpxchg16b`, other `ud2`, x87, MMX, SSE or
//! AVX (the unit tests check the disassembly). It idles with `sti; hlt`
//! and never polls a device in a loop, except for the final wait for the
//! UART's transmitter to empty and in the fatal-exception path.
//!
//! # Command line
//!
//! Space-separated `key=value` options: `seconds=N` (run time in guest
//! seconds, i.e. `N * hz` timer ticks; default 3; 0 runs forever), `hz=N`
//! (PIT rate, default 100, clamped to 19..=10000), `lines=N` (status lines
//! per second, default 10, at most `hz`; 0 for none), `quiet=1` (no status
//! lines; bare `quiet` also works), `burst=N` (default 0; see below),
//! `spin=N`, `spin3=N` and `spinkb=K` (spin mode, below).
//! Unknown options are ignored and reported as
//! `[boot] ignoring unknown option KEY`.
//!
//! # Burst mode
//!
//! With `burst=N` (N > 0, at most 10^9) the guest is work-bound instead of
//! timer-paced, so the wall time of a run measures VMM overhead. The
//! banner gains ` burst=N` (`... seconds=S burst=N mem=M MiB`); right
//! after the rtc line the guest prints N lines
//! `[bNNNN] pit=P sum=XXXXXXXX` back to back, as fast as its
//! interrupt-driven UART transmit allows (it sleeps in `sti; hlt` only
//! while the 4 KiB TX ring is full), then
//! `[done] ticks=T lines=N rx=R sum=XXXXXXXX`, drains its output and writes
//! 0 to port 0xf4 at once (`seconds`, `lines` and `quiet` do not apply).
//! `NNNN` is the burst line number from 1 (at least 4 digits), `P` channel
//! 0's latched count; line number and `P` are folded into the running
//! checksum (8 little-endian bytes each) before the line is printed. The
//! PIT is read with interrupts enabled: those port exits are the burst's
//! only exits with IF=1, where a VMM that injects interrupts only at exits
//! (ftvm) delivers the timer and THRE interrupts, so the timer keeps
//! ticking throughout the burst.
//!
//! # Spin mode
//!
//! With `spin=N` (CPL0) and/or `spin3=N` (CPL3; after the CPL0 spin if both
//! are given) the guest prints `[spin] cpl=C start target=N kib=K` after the
//! rtc line, drains its output, then runs a loop that makes no VM exit at
//! all (integer instructions and memory accesses only; a unit test checks
//! `spin_body` against an allowlist): it rewrites a `K`-KiB buffer
//! (`spinkb`, default 256, a power of two; it lies at the first 2 MiB
//! boundary above the image) with a xorshift64 chain, one word anywhere and
//! one word on the next page per step, and after every 64 steps reads the
//! tick counter the PIT ISR increments, until it has grown by `N` (one round
//! at least). Then `[spin] cpl=C ticks=T iters=I sum=XXXXXXXX`: ticks seen,
//! rounds run, and a 64-bit FNV-1a over the buffer's words folded to 32
//! bits. The guest then carries on as usual (burst, or the normal run, whose
//! schedule then starts at the tick count after the spins). A VMM that
//! injects interrupts only at exits never ends the loop; the output is a
//! function of where the timer interrupts arrive, so a replay reproduces it.
//!
//! For CPL3 the guest loads its own GDT (the VMM's 0x08/0x10 plus user
//! data 0x18 and 64-bit user code 0x20 at DPL3, and a TSS at 0x28 whose
//! RSP0 is a kernel interrupt stack) and its own identity page tables (4 GiB
//! in 2 MiB pages, U set below the end of the spin buffer), enters CPL3 with
//! `iretq`, takes timer interrupts there through RSP0, and leaves with `ud2`
//! at `user_exit_ud2`, whose #UD the handler turns into a return to the
//! kernel (a CPL3 `syscall` or `int` misbehaves on the local PVM KVM).
//!
//! # Output (COM1, lines end in `\n`)
//!
//! ```text
//! ftvm test guest: hz=100 lines=10 seconds=1 mem=64 MiB
//! [boot] ignoring unknown option console
//! [boot] rtc 2024-05-01 12:34:56
//! [0001] ticks=10 pit=11525 sum=f3bcc294
//! [0002] ticks=20 pit=11536 sum=b4927619
//! [0003] ticks=30 pit=11482 sum=47ae7592
//! [0004] ticks=40 pit=11522 sum=c454e143
//! [echo] "hi there"
//! [0005] ticks=50 pit=11642 sum=b315fb07
//! ...
//! [0010] ticks=100 pit=11529 sum=5afa6c57 rb=b4/11370
//! [done] ticks=100 lines=10 rx=10 sum=5afa6c57
//! ```
//!
//! * Status line `[NNNN] ticks=T pit=P sum=XXXXXXXX` every `hz / lines`
//!   ticks: `NNNN` the line number from 1, zero-padded to at least 4 digits;
//!   `T` the tick count; `P` channel 0's count, latched (command 0x00) right
//!   then; every 10th line adds ` rb=SS/C` from a read-back command (0xc2:
//!   latch count and status of channel 0), status in hex, count in decimal.
//! * `sum` is a running FNV-1a 32-bit checksum (offset basis 0x811c9dc5,
//!   prime 0x01000193) over every byte received on COM1, folded in as it is
//!   received, and over the values of each status line in the order line
//!   number, ticks, pit (and then rb status, rb count), each folded as its
//!   8 little-endian bytes (as a `u64`) before the line is printed.
//! * `[echo] "..."`: received bytes, shown when a CR or LF arrives (not
//!   included; the LF of a CR LF pair is swallowed), when 64 are pending, or
//!   at the next status-line tick. Printable ASCII as is, `"` and `\`
//!   backslash-escaped, anything else as `\xHH`.
//!   The guest never drops input: while its 1 KiB RX ring is full it turns
//!   the UART's receive interrupt off (IER = 0x02), leaving bytes in the
//!   UART, and turns it back on once the ring is half empty. Bytes the UART
//!   itself lost (LSR.OE) are reported as
//!   `[echo] (uart overrun xN: bytes were lost before the guest read them)`.
//! * `T` is the tick count when the line is printed. Status lines are due at
//!   ticks `k * (hz / lines)`; if output backs up (the 4 KiB TX ring is full)
//!   the guest waits, and late lines are printed one after another, each
//!   with the tick count of its own printing, so there are always
//!   `seconds * lines` of them.
//! * Other boot lines: `[boot] ignoring bad value for option KEY` and
//!   `[boot] KEY=V out of range, using U` (hz, lines, seconds).
//! * `[done] ticks=T lines=N rx=R sum=XXXXXXXX` after `seconds * hz` ticks,
//!   then the guest waits for its output to drain and writes 0 to port 0xf4.
//! * Faults: `[fatal] exception V error=0xE rip=0xRRRRRRRRRRRRRRRR` (exit
//!   status 3; ` cpl=3` appended for a fault at CPL3) or `[fatal] unexpected vector V` (exit status 4), printed
//!   with polled output; `V` in decimal.
//!
//! The output is a function of the command line, when timer interrupts
//! arrive, the PIT and RTC values read and the bytes received only, so a
//! VMM replaying those inputs at the same points reproduces it byte for
//! byte.

/// The test guest's ELF image.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// Human-readable name of the built-in guest.
pub const TEST_GUEST_NAME: &str = "built-in test guest";

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    use object::elf::{FileHeader64, ELFCLASS64, ELFDATA2LSB, EM_X86_64, ET_EXEC, PF_X, PT_LOAD};
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    use object::LittleEndian as LE;

    #[test]
    fn is_static_elf64_x86_64_at_1mib() {
        let e = TEST_GUEST_ELF;
        let h = FileHeader64::<LE>::parse(e).expect("an ELF64 header");
        assert_eq!(h.e_ident().class, ELFCLASS64, "ELFCLASS64");
        assert_eq!(h.e_ident().data, ELFDATA2LSB, "little-endian");
        assert_eq!(h.e_type(LE), ET_EXEC, "ET_EXEC");
        assert_eq!(h.e_machine(LE), EM_X86_64, "EM_X86_64");

        let phdrs = h.program_headers(LE, e).expect("program headers");
        let loads: Vec<_> = phdrs.iter().filter(|p| p.p_type(LE) == PT_LOAD).collect();
        assert!(!loads.is_empty());
        let entry = h.e_entry(LE);
        let mut entry_ok = false;
        for p in &loads {
            let (vaddr, paddr) = (p.p_vaddr(LE), p.p_paddr(LE));
            let (filesz, memsz) = (p.p_filesz(LE), p.p_memsz(LE));
            assert!(vaddr >= 0x10_0000, "segment below 1 MiB: {vaddr:#x}");
            assert_eq!(paddr, vaddr, "p_paddr != p_vaddr");
            assert!(memsz >= filesz);
            assert!(
                p.data(LE, e).is_ok(),
                "segment data past the end of the file"
            );
            assert!(vaddr + memsz < 16 << 20, "guest should stay small");
            if p.p_flags(LE) & PF_X != 0 && (vaddr..vaddr + filesz).contains(&entry) {
                entry_ok = true;
            }
        }
        assert!(entry_ok, "entry {entry:#x} not in an executable segment");
        assert_eq!(entry, 0x10_0000, "entry is at the start of .text");
        assert!(!TEST_GUEST_NAME.is_empty());
    }

    /// Mnemonics (or prefixes of them) that must not appear: the local
    /// KVM's instruction emulator cannot run them, or they are
    /// nondeterministic, or they touch x87/SSE/AVX state.
    const FORBIDDEN_EXACT: &[&str] = &[
        "int",
        "int1",
        "int3",
        "into",
        "icebp",
        "rdtsc",
        "rdtscp",
        "rdrand",
        "rdseed",
        "rdpid",
        "rdpmc",
        "cpuid",
        "cmpxchg16b",
        "ud0",
        "ud1",
        "ud2",
        "ud2a",
        "ud2b",
        "emms",
        "femms",
        "ldmxcsr",
        "stmxcsr",
        "vzeroupper",
        "vzeroall",
        "wait",
        "(bad)",
        "syscall",
        "sysenter",
        "rdmsr",
        "wrmsr",
    ];
    const FORBIDDEN_PREFIX: &[&str] = &["xsave", "xrstor", "fxsave", "fxrstor"];

    /// The one permitted `ud2`: spin mode's planned exit from CPL3
    /// (start.S), the first instruction after this label. A CPL3 `#UD` is
    /// how the guest returns to CPL0 (on the local PVM KVM a CPL3 `syscall`
    /// or `int` misbehaves, an exception works). Any other `ud2` (gcc's traps)
    /// stays forbidden.
    const PLANNED_UD2_LABEL: &str = "user_exit_ud2";
    const FORBIDDEN_OPERAND: &[&str] = &["%xmm", "%ymm", "%zmm", "%mm", "%st", "%k"];

    /// `objdump -d` mnemonic of a disassembly line, without prefixes.
    fn mnemonic(insn: &str) -> Option<&str> {
        let mut words = insn.split_whitespace();
        loop {
            let w = words.next()?;
            match w {
                "rep" | "repz" | "repe" | "repnz" | "repne" | "lock" | "data16" | "addr32"
                | "cs" | "ds" | "es" | "ss" | "fs" | "gs" | "notrack" | "bnd" | "rex" | "rex.W" => {
                    continue
                }
                _ if w.starts_with("rex.") => continue,
                _ => return Some(w),
            }
        }
    }

    /// `objdump -d` of the guest (`tag` keeps parallel tests' files apart).
    fn disassemble(tag: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("ftvm-testguest-{}-{tag}.elf", std::process::id()));
        std::fs::write(&path, TEST_GUEST_ELF).unwrap();
        let out = Command::new("objdump")
            .arg("-d")
            .arg("--no-show-raw-insn")
            .arg("-M")
            .arg("att-mnemonic")
            .arg(&path)
            .env("LC_ALL", "C")
            .output();
        let _ = std::fs::remove_file(&path);
        let out = out.expect("running objdump (binutils) to disassemble the test guest");
        assert!(
            out.status.success(),
            "objdump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Instruction lines (`"  100000:\tcli"`) of one function, up to the
    /// next label.
    fn function_body<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let head = format!(" <{name}>:");
        let mut lines = text.lines().skip_while(|l| !l.ends_with(&head));
        assert!(lines.next().is_some(), "no function <{name}> in the guest");
        lines
            .take_while(|l| !l.ends_with(">:"))
            .filter_map(|l| l.split_once(":\t").map(|(_, insn)| insn))
            .collect()
    }

    /// Spin mode's loop must make no VM exit at all (that is its point): no
    /// port I/O, `hlt`, `pause`, `cpuid`, `rdtsc`, MSR or control-register
    /// access, no interrupt instruction and no call into other code. Only
    /// this allowlist of plain integer instructions may appear in it.
    #[test]
    fn spin_loop_makes_no_exits() {
        const ALLOWED: &[&str] = &[
            "mov", "movq", "movl", "movabs", "movzbl", "movzwl", "movslq", "lea", "add", "sub",
            "xor", "and", "or", "shl", "shr", "sar", "imul", "inc", "dec", "neg", "not", "cmp",
            "test", "push", "pop", "ret", "nop", "nopl", "nopw", "xchg",
        ];
        let text = disassemble("spin");
        let body = function_body(&text, "spin_body");
        assert!(body.len() > 20, "spin_body looks empty: {body:?}");
        let bad: Vec<_> = body
            .iter()
            .filter(|insn| {
                let m = mnemonic(insn).unwrap_or("");
                let jump = m.starts_with('j') && m != "jmpq" && !insn.contains('*');
                !jump && !ALLOWED.contains(&m)
            })
            .collect();
        assert!(
            bad.is_empty(),
            "spin_body uses instructions outside the allowlist: {bad:?}"
        );
    }

    #[test]
    fn no_forbidden_instructions() {
        let text = disassemble("forbidden");
        let mut count = 0;
        let mut bad = Vec::new();
        let mut planned_ud2 = 0;
        // The label right before the current instruction, if any.
        let mut label: Option<&str> = None;
        for line in text.lines() {
            // Label lines look like "0000000000101090 <user_exit_ud2>:".
            if let Some(l) = line.strip_suffix(">:").and_then(|l| l.split_once(" <")) {
                label = Some(l.1);
                continue;
            }
            // Instruction lines look like "  100000:\tcli" (no raw bytes).
            let Some((addr, insn)) = line.split_once(":\t") else {
                continue;
            };
            if u64::from_str_radix(addr.trim(), 16).is_err() {
                continue;
            }
            let Some(m) = mnemonic(insn) else { continue };
            count += 1;
            let m = m.trim_end_matches(',');
            let at_label = label.take();
            if m == "ud2" && at_label == Some(PLANNED_UD2_LABEL) {
                planned_ud2 += 1;
                continue;
            }
            let base = m.strip_suffix('q').unwrap_or(m);
            // No integer mnemonic starts with 'f'; x87 ones all do.
            let x87 = m.starts_with('f');
            let avx = m.starts_with('v') && m != "verr" && m != "verw";
            if FORBIDDEN_EXACT.contains(&m)
                || FORBIDDEN_EXACT.contains(&base)
                || FORBIDDEN_PREFIX.iter().any(|p| m.starts_with(p))
                || FORBIDDEN_OPERAND.iter().any(|r| insn.contains(r))
                || x87
                || avx
            {
                bad.push(line.to_string());
            }
        }
        assert!(
            count > 200,
            "disassembly looks empty ({count} instructions)"
        );
        assert_eq!(
            planned_ud2, 1,
            "expected exactly one ud2, at <{PLANNED_UD2_LABEL}>"
        );
        assert!(
            bad.is_empty(),
            "forbidden instructions in the test guest:\n{}",
            bad.join("\n")
        );
    }
}
