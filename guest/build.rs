//! Builds ftvm's built-in test guest (guest/testguest/) with the machine's
//! gcc into `$OUT_DIR/testguest.elf`, which `src/lib.rs` embeds.
//!
//! No cross toolchain and no crates: a stock x86-64 Linux gcc (plus
//! binutils) is all this needs, so a plain `cargo build` works on a fresh
//! machine. The output is reproducible: no build id, no debug info, sources
//! named by relative path, and a fixed source order.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Flags for every compile step.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-nostdinc",
    "-fno-builtin",
    "-fno-stack-protector",
    "-fno-stack-clash-protection",
    "-fno-pic",
    "-fno-pie",
    "-fno-common",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    // gcc must not turn our memset/memcpy loops into calls to themselves.
    "-fno-tree-loop-distribute-patterns",
    // At -O2 gcc replaces provably-null dereferences with ud2; never emit it.
    "-fno-isolate-erroneous-paths-dereference",
    "-fno-jump-tables",
    // No executed alignment padding: the emulator then sees fewer odd NOPs.
    "-falign-loops=1",
    "-falign-jumps=1",
    "-falign-labels=1",
    "-m64",
    "-mcmodel=small",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-mno-sse",
    "-mno-mmx",
    "-mno-80387",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Werror",
    "-Wa,--noexecstack",
];

/// Flags for the link step.
const LDFLAGS: &[&str] = &[
    "-nostdlib",
    "-static",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--no-dynamic-linker",
    "-Wl,--fatal-warnings",
];

fn fail(msg: &str) -> ! {
    eprintln!("error: building the ftvm test guest: {msg}");
    exit(1);
}

fn run(cc: &OsString, dir: &Path, args: &[OsString]) {
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let out = Command::new(cc)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| {
            fail(&format!(
                "could not run `{}`: {e}. The test guest is compiled with the host's gcc \
                 (Debian/Ubuntu: `apt-get install gcc`; override with FTVM_GUEST_CC)",
                cc.to_string_lossy()
            ))
        });
    if !out.status.success() {
        fail(&format!(
            "`{} {}` failed ({}):\n{}{}",
            cc.to_string_lossy(),
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Warnings are errors (-Werror); anything else printed is worth seeing.
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning={line}");
    }
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src_dir = manifest.join("testguest");
    let cc = env::var_os("FTVM_GUEST_CC").unwrap_or_else(|| OsString::from("gcc"));
    println!("cargo:rerun-if-env-changed=FTVM_GUEST_CC");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src_dir.display());

    let mut names: Vec<String> = fs::read_dir(&src_dir)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", src_dir.display())))
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".c") || n.ends_with(".S") || n.ends_with(".h") || n == "link.ld")
        .collect();
    names.sort();
    for n in &names {
        println!("cargo:rerun-if-changed={}", src_dir.join(n).display());
    }
    if !names.iter().any(|n| n == "link.ld") {
        fail(&format!("{} is missing", src_dir.join("link.ld").display()));
    }

    // start.S first, so the entry is first in .text (link.ld also KEEPs
    // .text.entry first); then the C files in name order.
    let mut sources: Vec<&String> = names.iter().filter(|n| n.ends_with(".S")).collect();
    sources.sort_by_key(|n| (n.as_str() != "start.S", n.as_str()));
    sources.extend(names.iter().filter(|n| n.ends_with(".c")));
    if sources.is_empty() {
        fail(&format!("no .c or .S sources in {}", src_dir.display()));
    }

    let obj_dir = out_dir.join("testguest-obj");
    fs::create_dir_all(&obj_dir)
        .unwrap_or_else(|e| fail(&format!("creating {}: {e}", obj_dir.display())));

    // Compile each source from inside src_dir under its bare name, so no
    // absolute path ends up in the objects (their FILE symbols).
    let mut objects = Vec::new();
    for src in &sources {
        let obj = obj_dir.join(format!("{src}.o"));
        let mut args: Vec<OsString> = CFLAGS.iter().map(OsString::from).collect();
        args.push("-c".into());
        args.push(src.as_str().into());
        args.push("-o".into());
        args.push(obj.clone().into_os_string());
        run(&cc, &src_dir, &args);
        objects.push(obj);
    }

    let elf = out_dir.join("testguest.elf");
    let mut args: Vec<OsString> = CFLAGS.iter().map(OsString::from).collect();
    args.extend(LDFLAGS.iter().map(OsString::from));
    args.push("-T".into());
    args.push("link.ld".into());
    args.push("-o".into());
    args.push(elf.clone().into_os_string());
    args.extend(objects.into_iter().map(PathBuf::into_os_string));
    run(&cc, &src_dir, &args);
}
