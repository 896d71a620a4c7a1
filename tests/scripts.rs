//! The shell scripts' package resolution (scripts/lib/apt.sh), run against
//! fake `apt-cache`, `apt-get`, `dpkg-deb` and `sudo` placed first on PATH:
//! no root, network or KVM. The fakes model stale package lists: apt-cache
//! answers from `lists`, which `apt-get update` replaces with `lists.fresh`;
//! `apt-get download` succeeds only for what both the lists and the mirror
//! (`mirror`) have, as the real one does.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// apt-cache: `show [--no-all-versions] PKG` and `depends PKG` from the
/// lists, whose lines are "package version [dependency...]".
const APT_CACHE: &str = r#"#!/bin/sh
cmd=$1; shift
[ "$1" = --no-all-versions ] && shift
line=$(grep "^$1 " "$FAKE/lists") || { echo "E: No packages found" >&2; exit 100; }
set -- $line
case $cmd in
    show) printf 'Package: %s\nVersion: %s\n\n' "$1" "$2" ;;
    depends) pkg=$1; shift 2; echo "$pkg"; for d; do echo "  Depends: $d"; done ;;
    *) exit 100 ;;
esac
"#;

/// apt-get: `update` (recorded in `updates`) and `download [OPTIONS] PKG=VER`
/// (every call recorded in `calls`).
const APT_GET: &str = r#"#!/bin/sh
echo "$*" >>"$FAKE/calls"
case $1 in
    update) echo update >>"$FAKE/updates"; cp "$FAKE/lists.fresh" "$FAKE/lists" ;;
    download)
        for a; do spec=$a; done
        pkg=${spec%%=*} ver=${spec#*=}
        grep -q "^$pkg $ver\( \|\$\)" "$FAKE/lists" || { echo "E: Version '$ver' for '$pkg' was not found" >&2; exit 100; }
        grep -qx "$pkg $ver" "$FAKE/mirror" || { echo "E: Failed to fetch $pkg $ver  404  Not Found" >&2; exit 100; }
        printf 'Package: %s\nVersion: %s\n' "$pkg" "$ver" >"$(echo "${pkg}_${ver}_amd64.deb" | sed 's/:/%3a/g')" ;;
    *) exit 100 ;;
esac
"#;

/// dpkg-deb: `-f DEB FIELD` of the fake .deb files apt-get writes.
const DPKG_DEB: &str = r#"#!/bin/sh
[ "$1" = -f ] || exit 2
sed -n "s/^$3: //p" "$2"
"#;

const SUDO: &str = "#!/bin/sh\nexec \"$@\"\n";

/// What the test runs: the library, sourced by a bash like the scripts'.
const HARNESS: &str = r#"set -euo pipefail
install -m 755 "$FAKE"/src/* "$FAKE/bin/"
log() { echo "log: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }
. "$ROOT/scripts/lib/apt.sh"
"#;

const KERNEL: &str = r#"apt_download_resolving debs --dep-of linux-image-cloud-amd64 'linux-image-[^ ]*-cloud-amd64'
echo "kernel $APT_PKG $APT_VER $APT_DEB"
"#;
const BUSYBOX: &str = r#"apt_download_resolving debs busybox-static
echo "busybox $APT_PKG $APT_VER $APT_DEB"
"#;

const STALE: &str =
    "linux-image-cloud-amd64 6.1.160-1 initramfs-tools linux-image-6.1.0-56-cloud-amd64
linux-image-6.1.0-56-cloud-amd64 6.1.160-1
busybox-static 1:1.35.0-4
";
const FRESH: &str =
    "linux-image-cloud-amd64 6.1.170-1 initramfs-tools linux-image-6.1.0-57-cloud-amd64
linux-image-6.1.0-57-cloud-amd64 6.1.170-1
busybox-static 1:1.35.0-4+deb12u1
";
/// The mirror: only what the fresh lists name.
const MIRROR: &str = "linux-image-6.1.0-57-cloud-amd64 6.1.170-1
busybox-static 1:1.35.0-4+deb12u1
";

const NEW_KERNEL: &str = "kernel linux-image-6.1.0-57-cloud-amd64 6.1.170-1 debs/linux-image-6.1.0-57-cloud-amd64_6.1.170-1_amd64.deb";
const NEW_BUSYBOX: &str =
    "busybox busybox-static 1:1.35.0-4+deb12u1 debs/busybox-static_1%3a1.35.0-4+deb12u1_amd64.deb";

/// A temporary directory with the fakes, removed on drop.
struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new(name: &str, lists: &str, fresh: &str, mirror: &str) -> Fake {
        let dir = std::env::temp_dir().join(format!("ftvm-scripts-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for d in ["src", "bin", "debs"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        // Written here without the execute bit; the harness installs them
        // into bin/ (a file this multi-threaded process has just written may
        // still be open in a child forked meanwhile: ETXTBSY on exec).
        for (n, text) in [
            ("apt-cache", APT_CACHE),
            ("apt-get", APT_GET),
            ("dpkg-deb", DPKG_DEB),
            ("sudo", SUDO),
        ] {
            fs::write(dir.join("src").join(n), text).unwrap();
        }
        fs::write(dir.join("lists"), lists).unwrap();
        fs::write(dir.join("lists.fresh"), fresh).unwrap();
        fs::write(dir.join("mirror"), mirror).unwrap();
        Fake { dir }
    }

    /// Runs `script` after sourcing the library, in the fake's directory:
    /// whether it succeeded, its stdout and its stderr.
    fn run(&self, script: &str) -> (bool, String, String) {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let o = Command::new("bash")
            .arg("-c")
            .arg(format!("{HARNESS}{script}"))
            .current_dir(&self.dir)
            .env("PATH", path)
            .env("FAKE", &self.dir)
            .env("ROOT", root())
            .output()
            .expect("running bash");
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        );
        (o.status.success(), out, err)
    }

    /// Runs `script`, which must succeed; its stdout lines.
    fn run_ok(&self, script: &str) -> Vec<String> {
        let (ok, out, err) = self.run(script);
        assert!(ok, "failed:\nstdout:\n{out}\nstderr:\n{err}");
        out.lines().map(str::to_owned).collect()
    }

    /// Runs `script`, which must fail with a last line "error: ..." that
    /// contains `what`; its stdout lines.
    fn run_err(&self, script: &str, what: &str) -> Vec<String> {
        let (ok, out, err) = self.run(script);
        assert!(!ok, "succeeded:\nstdout:\n{out}\nstderr:\n{err}");
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(what),
            "the error does not name {what}:\n{err}"
        );
        out.lines().map(str::to_owned).collect()
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn updates(&self) -> usize {
        self.read("updates").lines().count()
    }

    fn debs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.join("debs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Stale lists name a kernel package (and versions) the mirror no longer has:
/// the download fails, the lists are updated once, and the kernel's name and
/// version are resolved again; the second package then needs no update.
#[test]
fn stale_lists_are_updated_once_and_resolved_again() {
    let f = Fake::new("stale", STALE, FRESH, MIRROR);
    assert_eq!(
        f.run_ok(&format!("{KERNEL}{BUSYBOX}")),
        [NEW_KERNEL, NEW_BUSYBOX]
    );
    let calls = f.read("calls");
    assert_eq!(
        f.updates(),
        1,
        "apt-get update runs exactly once; calls:\n{calls}"
    );
    assert!(
        calls
            .lines()
            .next()
            .unwrap_or("")
            .ends_with("linux-image-6.1.0-56-cloud-amd64=6.1.160-1"),
        "the first download is of what the stale lists name; calls:\n{calls}"
    );
    assert_eq!(
        f.debs(),
        [
            "busybox-static_1%3a1.35.0-4+deb12u1_amd64.deb",
            "linux-image-6.1.0-57-cloud-amd64_6.1.170-1_amd64.deb"
        ]
    );
    let deb = f.read("debs/linux-image-6.1.0-57-cloud-amd64_6.1.170-1_amd64.deb");
    assert!(deb.contains("Version: 6.1.170-1\n"), "{deb}");
}

/// No lists at all (a fresh machine): nothing resolves until the update.
#[test]
fn missing_lists_are_updated_then_resolved() {
    let f = Fake::new("empty", "", FRESH, MIRROR);
    assert_eq!(
        f.run_ok(&format!("{KERNEL}{BUSYBOX}")),
        [NEW_KERNEL, NEW_BUSYBOX]
    );
    assert_eq!(f.updates(), 1);
}

/// Even the fresh lists name a package the mirror cannot give: one update,
/// then a non-zero exit with an error naming the package, and no .deb.
#[test]
fn download_failing_after_update_is_an_error_naming_the_package() {
    let f = Fake::new("fail", STALE, FRESH, "busybox-static 1:1.35.0-4+deb12u1\n");
    let out = f.run_err(
        &format!("{KERNEL}{BUSYBOX}"),
        "linux-image-6.1.0-57-cloud-amd64=6.1.170-1",
    );
    assert_eq!(
        out,
        Vec::<String>::new(),
        "nothing after the failed download ran"
    );
    assert_eq!(f.updates(), 1, "one update, not a loop");
    assert_eq!(f.debs(), Vec::<String>::new());
}

/// The lists were updated for an earlier package in this run: a later
/// package that fails does not update them again, and the error names it.
#[test]
fn lists_are_updated_at_most_once_per_run() {
    let f = Fake::new(
        "once",
        STALE,
        FRESH,
        "linux-image-6.1.0-57-cloud-amd64 6.1.170-1\n",
    );
    let out = f.run_err(
        &format!("{KERNEL}{BUSYBOX}"),
        "busybox-static=1:1.35.0-4+deb12u1",
    );
    assert_eq!(out, [NEW_KERNEL]);
    assert_eq!(f.updates(), 1, "calls:\n{}", f.read("calls"));
}

/// A .deb of the resolved version already in the directory is used as it
/// is: no download, no update (works offline).
#[test]
fn cached_deb_of_the_resolved_version_is_reused() {
    let f = Fake::new("cached", STALE, FRESH, "");
    let deb = "linux-image-6.1.0-56-cloud-amd64_6.1.160-1_amd64.deb";
    let control = "Package: linux-image-6.1.0-56-cloud-amd64\nVersion: 6.1.160-1\n";
    fs::write(f.dir.join("debs").join(deb), control).unwrap();
    assert_eq!(
        f.run_ok(KERNEL),
        [format!(
            "kernel linux-image-6.1.0-56-cloud-amd64 6.1.160-1 debs/{deb}"
        )]
    );
    assert_eq!(f.read("calls"), "", "no apt-get call at all");
}
