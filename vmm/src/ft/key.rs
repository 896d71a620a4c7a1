//! The cluster key: 32 random bytes that every FT role (witness, primary,
//! backup) and client (`ftvm console`, `ftvm status`) holds. It is the
//! pre-shared key of every connection's Noise handshake (`secure.rs`): only
//! holders of the key complete a handshake, so a stranger on the network
//! can neither read nor speak any FT protocol.
//!
//! On disk: 64 hex digits and a newline, in a file only its owner may
//! access (mode 0600), made by `ftvm keygen --out FILE`, which never
//! overwrites a file.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Length of the key in bytes (Noise's PSK length).
pub const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no cluster key: FT commands need --key FILE, the key shared by the witness, primary, backup, console and status; make one with `ftvm keygen --out FILE` and give every one of them the same file")]
    Missing,
    #[error("cannot read the cluster key {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("the cluster key {path} can be read or written by other users (mode {mode:04o}); it must be private: chmod 600 {path}")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is not an ftvm cluster key: expected 64 hex digits (32 bytes), as `ftvm keygen --out FILE` writes")]
    Format { path: PathBuf },
    #[error("{path} already exists; ftvm keygen never overwrites a key (remove it first, or pick another --out)")]
    Exists { path: PathBuf },
    #[error("cannot write the cluster key {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("cannot get random bytes for a key: {0}")]
    Random(String),
}

/// The cluster key. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<ClusterKey, KeyError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(ClusterKey(k))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ClusterKey {
        ClusterKey(bytes)
    }

    pub(super) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// `--key FILE` of an FT command: missing, unreadable, malformed and
    /// exposed (group/other permission bits) keys are refused with a
    /// message that says what to do.
    pub fn from_arg(path: Option<&Path>) -> Result<ClusterKey, KeyError> {
        Self::load(path.ok_or(KeyError::Missing)?)
    }

    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let read = |err| KeyError::Read { path: path.to_path_buf(), err };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_file() && mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.to_path_buf(), mode });
        }
        // A key file is 65 bytes; reading a little more tells "too long".
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(path).map_err(read)?, 256), &mut text)
            .map_err(read)?;
        Self::parse(&text).ok_or_else(|| KeyError::Format { path: path.to_path_buf() })
    }

    fn parse(text: &[u8]) -> Option<ClusterKey> {
        let text = std::str::from_utf8(text).ok()?.trim();
        if text.len() != 2 * KEY_LEN {
            return None;
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(ClusterKey(k))
    }

    /// Writes the key to a new file, mode 0600 from the start (never a
    /// moment readable by others); an existing file is left alone.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.to_path_buf() }
            } else {
                KeyError::Write { path: path.to_path_buf(), err }
            }
        })?;
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_all(format!("{hex}\n").as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|err| KeyError::Write { path: path.to_path_buf(), err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftvm-key-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn generate_write_load_round_trip() {
        let d = dir("rt");
        let p = d.join("k");
        let k = ClusterKey::generate().unwrap();
        assert_ne!(k, ClusterKey::generate().unwrap(), "two keys alike");
        k.write_new(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&p).unwrap().len(), 65);
        assert_eq!(ClusterKey::load(&p).unwrap(), k);
        assert!(matches!(k.write_new(&p), Err(KeyError::Exists { .. })), "overwrote a key");
        assert_eq!(ClusterKey::load(&p).unwrap(), k, "the existing key changed");
        assert_eq!(format!("{k:?}"), "ClusterKey(..)");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn bad_key_files_are_refused_with_a_reason() {
        let d = dir("bad");
        let write = |name: &str, text: &str, mode: u32| {
            let p = d.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let good = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\n";
        assert!(ClusterKey::load(&write("ok", good, 0o600)).is_ok());
        assert!(ClusterKey::load(&write("ro", good, 0o400)).is_ok());
        let e = ClusterKey::load(&write("world", good, 0o644)).unwrap_err();
        assert!(matches!(e, KeyError::Exposed { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(matches!(ClusterKey::load(&write("group", good, 0o640)), Err(KeyError::Exposed { .. })));
        for (name, text) in [("short", "0011\n"), ("long", &format!("{good}00")[..]), ("nothex", &good.replace('a', "g")[..]), ("empty", "")] {
            let e = ClusterKey::load(&write(name, text, 0o600)).unwrap_err();
            assert!(matches!(e, KeyError::Format { .. }), "{name}: {e}");
            assert!(e.to_string().contains("ftvm keygen"), "{e}");
        }
        let e = ClusterKey::load(&d.join("absent")).unwrap_err();
        assert!(matches!(e, KeyError::Read { .. }), "{e}");
        let e = ClusterKey::from_arg(None).unwrap_err();
        assert!(e.to_string().contains("ftvm keygen --out FILE"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }
}
