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
    NotAKernel { name: String, why: crate::elf::ElfProblem },
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
        if crate::bzimage::is_bzimage(b) {
            return Err(KernelError::BzImage { name: self.name.clone() });
        }
        // linux-loader checks little of the file, so validate it first: a
        // clear error for anything that is not a 64-bit x86-64 ELF.
        crate::elf::Elf::parse(&self.name, b)
            .and_then(|e| e.check_load_segments())
            .map_err(|e| KernelError::NotAKernel { name: e.name, why: e.problem })?;
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
        assert!(e.contains("not an ELF file (found bytes 68 65 6c 6c"), "{e}");
        let k = KernelImage::from_bytes("empty".into(), vec![]);
        let e = k.load(&mem()).unwrap_err().to_string();
        assert_eq!(e, "empty is not a guest kernel: the file is empty");
        let mut elf32 = ftvm_guest::TEST_GUEST_ELF.to_vec();
        elf32[4] = 1;
        let k = KernelImage::from_bytes("e32".into(), elf32);
        let e = k.load(&mem()).unwrap_err().to_string();
        assert!(e.starts_with("e32 is not a guest kernel: 32-bit ELF"), "{e}");
        let mut arm = ftvm_guest::TEST_GUEST_ELF.to_vec();
        arm[0x12..0x14].copy_from_slice(&object::elf::EM_AARCH64.to_le_bytes());
        let k = KernelImage::from_bytes("arm".into(), arm);
        let e = k.load(&mem()).unwrap_err().to_string();
        assert!(e.starts_with("arm is not a guest kernel: not x86-64"), "{e}");
        let k = KernelImage::from_bytes("short".into(), ftvm_guest::TEST_GUEST_ELF[..100].to_vec());
        let e = k.load(&mem()).unwrap_err().to_string();
        assert!(e.starts_with("short is not a guest kernel: truncated program header table"), "{e}");
        let k = KernelImage::from_bytes("cut".into(), ftvm_guest::TEST_GUEST_ELF[..0x2000].to_vec());
        let e = k.load(&mem()).unwrap_err().to_string();
        assert!(e.starts_with("cut is not a guest kernel: loadable segment 0 (offset 0x1000, "), "{e}");
    }
}
