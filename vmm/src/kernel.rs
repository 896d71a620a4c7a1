//! Loading the guest kernel into memory. The file is read once, hashed (the
//! log header names the guest by that hash) and then loaded from the bytes.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::{elf::Elf, KernelLoader};
use sha2::{Digest, Sha256};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::HIMEM_START;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot read kernel {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{name} is not a guest kernel: {why}")]
    NotAKernel { name: String, why: String },
    #[error("{name}: cannot load ELF guest: {err}")]
    Elf { name: String, err: linux_loader::loader::Error },
    #[error("{name} is a compressed Linux bzImage: boot the uncompressed vmlinux that scripts/linux-guest.sh extracts (guest/linux/out/vmlinux); ftvm patches the kernel's rdtsc instructions before boot, which needs the uncompressed image")]
    BzImage { name: String },
    #[error("{name}: cannot extract the kernel from this bzImage: {err}")]
    Extract { name: String, err: crate::bzimage::BzImageError },
}

/// A kernel file's contents and identity.
pub struct KernelImage {
    pub name: String,
    pub bytes: Vec<u8>,
    pub sha256: [u8; 32],
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl KernelImage {
    pub fn from_file(path: &Path) -> Result<Self, KernelError> {
        let bytes = std::fs::read(path).map_err(|err| KernelError::Read {
            path: path.to_owned(),
            err,
        })?;
        let name = path.display().to_string();
        if crate::bzimage::is_bzimage(&bytes) {
            // ftvm patches the kernel's code before boot, so it needs the
            // uncompressed vmlinux; the log names the guest by the file given.
            let sha256 = sha256(&bytes);
            let (vmlinux, _format) = crate::bzimage::extract_vmlinux(&bytes)
                .map_err(|err| KernelError::Extract { name: name.clone(), err })?;
            return Ok(KernelImage { name, bytes: vmlinux, sha256 });
        }
        Ok(Self::from_bytes(name, bytes))
    }

    pub fn from_bytes(name: String, bytes: Vec<u8>) -> Self {
        let sha256 = sha256(&bytes);
        KernelImage { name, bytes, sha256 }
    }

    /// Loads the image and returns its entry point.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<u64, KernelError> {
        self.load_bytes(mem, &self.bytes).map(|(entry, _)| entry)
    }

    /// Loads `b` (this image, possibly patched); returns the entry point
    /// and the end of the loaded image.
    pub fn load_bytes(&self, mem: &GuestMemoryMmap, b: &[u8]) -> Result<(u64, u64), KernelError> {
        if b.len() >= 0x206 && &b[0x202..0x206] == b"HdrS" {
            return Err(KernelError::BzImage { name: self.name.clone() });
        }
        if b.len() < 4 || &b[..4] != b"\x7fELF" {
            let why = if b.is_empty() {
                "the file is empty".to_string()
            } else {
                format!("no ELF magic at byte 0 (found {:02x?})", &b[..b.len().min(4)])
            };
            return Err(KernelError::NotAKernel { name: self.name.clone(), why });
        }
        if b.len() < 20 || b[4] != 2 || b[5] != 1 || u16::from_le_bytes([b[18], b[19]]) != 62 {
            return Err(KernelError::NotAKernel {
                name: self.name.clone(),
                why: "not a 64-bit little-endian x86-64 ELF".into(),
            });
        }
        let res = Elf::load(
            mem,
            None,
            &mut Cursor::new(b),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|err| KernelError::Elf { name: self.name.clone(), err })?;
        Ok((res.kernel_load.0, res.kernel_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn loads_the_test_guest() {
        let k = KernelImage::from_bytes("t".into(), ftvm_guest::TEST_GUEST_ELF.to_vec());
        let entry = k.load(&mem()).unwrap();
        assert!(entry >= HIMEM_START);
    }

    #[test]
    fn refuses_non_kernels_by_name() {
        let k = KernelImage::from_bytes("notes.txt".into(), b"hello world, not a kernel".to_vec());
        let e = k.load(&mem()).unwrap_err().to_string();
        assert!(e.contains("notes.txt is not a guest kernel"), "{e}");
        let k = KernelImage::from_bytes("empty".into(), vec![]);
        assert!(k.load(&mem()).unwrap_err().to_string().contains("empty"));
        let mut elf32 = ftvm_guest::TEST_GUEST_ELF.to_vec();
        elf32[4] = 1;
        let k = KernelImage::from_bytes("e32".into(), elf32);
        assert!(k.load(&mem()).unwrap_err().to_string().contains("64-bit"));
    }
}
