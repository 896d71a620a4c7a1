//! What guest to run, loaded once for every command: the kernel (a file or
//! the built-in test guest), the initrd, memory and command line, and the
//! log header that names them. A log's header is turned back into the same
//! configuration for replay and for a backup, and refused with a clear
//! message when the files given are not the ones recorded.

use std::path::{Path, PathBuf};

use replay_log::Header;

use crate::kernel::{sha256, KernelError, KernelImage};
use crate::linux;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("cannot read initrd {path}: {err}")]
    ReadInitrd { path: PathBuf, err: std::io::Error },
    #[error("{log} was recorded with kernel '{recorded}' (sha256 {recorded_sha}), but '{given}' has sha256 {given_sha}: pass --kernel with the kernel it was recorded with")]
    WrongKernel { log: String, recorded: String, recorded_sha: String, given: String, given_sha: String },
    #[error("initrd {path} is not the one {log} was recorded with (sha256 differs)")]
    WrongInitrd { log: String, path: PathBuf },
    #[error("{log} was recorded with an initrd: pass --initrd with the same file")]
    MissingInitrd { log: String },
    #[error("{log} was recorded without an initrd, but --initrd {path} was given")]
    ExtraInitrd { log: String, path: PathBuf },
}

/// What the guest is and how it is started.
pub struct GuestConfig {
    pub kernel: KernelImage,
    pub mem_bytes: u64,
    pub cmdline: String,
    /// Initial ramdisk for a Linux guest: (name, contents).
    pub initrd: Option<(String, Vec<u8>)>,
    /// A virtio-net card with this MAC (`--net`), on a PCI bus.
    pub net_mac: Option<[u8; 6]>,
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The kernel at `path`, or the built-in test guest.
pub fn load_kernel(path: Option<&Path>) -> Result<KernelImage, ConfigError> {
    Ok(match path {
        Some(p) => KernelImage::from_file(p)?,
        None => KernelImage::from_bytes(ftvm_guest::TEST_GUEST_NAME.to_string(), ftvm_guest::TEST_GUEST_ELF.to_vec()),
    })
}

fn read_initrd(p: &Path) -> Result<(String, Vec<u8>), ConfigError> {
    let data = std::fs::read(p).map_err(|err| ConfigError::ReadInitrd { path: p.to_owned(), err })?;
    Ok((p.display().to_string(), data))
}

impl GuestConfig {
    /// A new guest from the command line's files.
    pub fn load(kernel: Option<&Path>, initrd: Option<&Path>, mem_bytes: u64, cmdline: &str) -> Result<Self, ConfigError> {
        let kernel = load_kernel(kernel)?;
        let initrd = initrd.map(read_initrd).transpose()?;
        Ok(GuestConfig { kernel, mem_bytes, cmdline: cmdline.to_string(), initrd, net_mac: None })
    }

    /// The guest a log (file or stream, named `log`) was recorded from,
    /// with the kernel and initrd given, which must be the recorded ones.
    pub fn for_log(h: &Header, log: &str, kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Self, ConfigError> {
        let kernel = load_kernel(kernel)?;
        if kernel.sha256 != h.kernel_sha256 {
            return Err(ConfigError::WrongKernel {
                log: log.to_string(),
                recorded: h.kernel_name.clone(),
                recorded_sha: hex(&h.kernel_sha256),
                given: kernel.name.clone(),
                given_sha: hex(&kernel.sha256),
            });
        }
        let initrd = match (initrd, h.initrd_sha256) {
            (None, None) => None,
            (Some(p), Some(sum)) => {
                let (name, data) = read_initrd(p)?;
                if sha256(&data) != sum {
                    return Err(ConfigError::WrongInitrd { log: log.to_string(), path: p.to_owned() });
                }
                Some((name, data))
            }
            (None, Some(_)) => return Err(ConfigError::MissingInitrd { log: log.to_string() }),
            (Some(p), None) => return Err(ConfigError::ExtraInitrd { log: log.to_string(), path: p.to_owned() }),
        };
        Ok(GuestConfig { kernel, mem_bytes: h.mem_bytes, cmdline: h.cmdline.clone(), initrd, net_mac: h.net_mac })
    }

    /// The log header that names this guest.
    pub fn header(&self) -> Header {
        Header {
            kernel_sha256: self.kernel.sha256,
            initrd_sha256: self.initrd.as_ref().map(|(_, d)| sha256(d)),
            mem_bytes: self.mem_bytes,
            cmdline: self.cmdline.clone(),
            ftvm_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_name: self.kernel.name.clone(),
            net_mac: self.net_mac,
        }
    }

    /// The command line the guest sees: for Linux, ftvm's own words first.
    pub fn effective_cmdline(&self) -> String {
        if linux::is_linux_elf(&self.kernel.bytes) {
            // With a card, Linux must probe PCI: `pci=off` goes.
            let base = if self.net_mac.is_some() { linux::LINUX_CMDLINE.replace(" pci=off", "") } else { linux::LINUX_CMDLINE.to_string() };
            format!("{base} {}", self.cmdline).trim().to_string()
        } else {
            self.cmdline.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_header_gives_back_the_same_guest_or_a_clear_refusal() {
        let dir = std::env::temp_dir().join(format!("ftvm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rd = dir.join("initrd");
        std::fs::write(&rd, b"initrd bytes").unwrap();
        let other = dir.join("other");
        std::fs::write(&other, b"other bytes").unwrap();

        let cfg = GuestConfig::load(None, Some(&rd), 64 << 20, "hz=5").unwrap();
        let h = cfg.header();
        let again = GuestConfig::for_log(&h, "x.ftlog", None, Some(&rd)).unwrap();
        assert_eq!(again.header(), h);

        let e = GuestConfig::for_log(&h, "x.ftlog", None, Some(&other)).err().unwrap().to_string();
        assert!(e.contains("not the one x.ftlog was recorded with"), "{e}");
        let e = GuestConfig::for_log(&h, "x.ftlog", None, None).err().unwrap().to_string();
        assert!(e.contains("pass --initrd"), "{e}");
        let e = GuestConfig::for_log(&h, "x.ftlog", Some(&other), Some(&rd)).err().unwrap().to_string();
        assert!(e.contains("pass --kernel") && e.contains("x.ftlog"), "{e}");
        let plain = GuestConfig::load(None, None, 64 << 20, "").unwrap().header();
        let e = GuestConfig::for_log(&plain, "y.ftlog", None, Some(&rd)).err().unwrap().to_string();
        assert!(e.contains("without an initrd"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
