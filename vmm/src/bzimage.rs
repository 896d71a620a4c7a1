//! Extracting the vmlinux ELF from a compressed x86 bzImage.
//!
//! ftvm patches the kernel's code before boot, so it needs the
//! uncompressed vmlinux. A bzImage is a real-mode setup part followed by
//! the protected-mode decompressor, which carries the compressed vmlinux
//! (stripped, with its relocations appended) as its payload. The setup
//! header (boot protocol >= 2.08, see the kernel's
//! Documentation/arch/x86/boot.rst) says where that payload lies, so no
//! scanning for magic bytes is needed. As in arch/x86/boot/compressed,
//! the payload's last 4 bytes are the uncompressed size (little-endian):
//! gzip's own ISIZE field, or a trailer the kernel's build appends for the
//! other formats. The result is checked against it.

use std::io::Read;

/// Offset of `setup_sects` in the setup header.
const SETUP_SECTS: usize = 0x1f1;
/// Offset of the "HdrS" header signature.
const HEADER: usize = 0x202;
/// Offset of the boot protocol version.
const VERSION: usize = 0x206;
/// Offset of `payload_offset` (protocol 2.08+).
const PAYLOAD_OFFSET: usize = 0x248;
/// Offset of `payload_length` (protocol 2.08+).
const PAYLOAD_LENGTH: usize = 0x24c;
/// The first protocol version with `payload_offset`/`payload_length`.
const MIN_VERSION: u16 = 0x0208;

/// Magic of the LZ4 legacy frame the kernel uses (`lz4 -l`).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Each LZ4 legacy block decompresses to at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The most an output buffer is reserved up front from a size trailer.
const MAX_PREALLOC: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    #[error("not a bzImage: {why}")]
    NotBzImage { why: String },
    #[error(
        "bzImage boot protocol {}.{:02} is too old: 2.08 or later is needed for \
         payload_offset/payload_length (version at offset 0x206)",
        version >> 8,
        version & 0xff
    )]
    OldProtocol { version: u16 },
    #[error("bzImage truncated: {what}")]
    Truncated { what: String },
    #[error("bzImage payload is {format}-compressed, which ftvm cannot decompress (supported: gzip, lz4, xz, lzma, zstd); pass the uncompressed vmlinux instead")]
    Unsupported { format: &'static str },
    #[error("bzImage payload at offset {offset:#x} has no known compression magic (first bytes: {head})")]
    UnknownFormat { offset: usize, head: String },
    #[error("decompressing the bzImage's {format} payload failed: {msg}")]
    Decompress { format: &'static str, msg: String },
    #[error(
        "the bzImage's decompressed payload is not an ELF file (no \\x7fELF magic at its start)"
    )]
    NotElf,
}

/// Whether these bytes look like a bzImage ("HdrS" at 0x202).
pub fn is_bzimage(b: &[u8]) -> bool {
    b.get(HEADER..HEADER + 4) == Some(b"HdrS")
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The compression formats the kernel can build a bzImage with, by magic.
const FORMATS: &[(&[u8], &str)] = &[
    (&[0x1f, 0x8b], "gzip"),
    (b"BZh", "bzip2"),
    (&[0x5d, 0x00, 0x00], "lzma"),
    (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], "xz"),
    (&[0x89, 0x4c, 0x5a, 0x4f], "lzo"),
    (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
];

/// The vmlinux ELF inside a bzImage, and the name of its compression.
pub fn extract_vmlinux(b: &[u8]) -> Result<(Vec<u8>, &'static str), BzImageError> {
    if !is_bzimage(b) {
        return Err(BzImageError::NotBzImage {
            why: format!("no \"HdrS\" signature at offset {HEADER:#x}"),
        });
    }
    let version = le16(b, VERSION);
    if version < MIN_VERSION {
        return Err(BzImageError::OldProtocol { version });
    }
    if b.len() < PAYLOAD_LENGTH + 4 {
        return Err(BzImageError::Truncated {
            what: format!(
                "the setup header needs {:#x} bytes but the file has {:#x}",
                PAYLOAD_LENGTH + 4,
                b.len()
            ),
        });
    }
    let setup_sects = match b[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let pm_start = (setup_sects + 1) * 512;
    let start = pm_start + le32(b, PAYLOAD_OFFSET) as usize;
    let len = le32(b, PAYLOAD_LENGTH) as usize;
    if start + len > b.len() {
        return Err(BzImageError::Truncated {
            what: format!(
                "payload at offset {start:#x} ({pm_start:#x} + payload_offset) of {len:#x} bytes \
                 ends at {:#x}, past the end of the file at {:#x}",
                start + len,
                b.len()
            ),
        });
    }
    let payload = &b[start..start + len];
    let Some(&(_, format)) = FORMATS.iter().find(|(m, _)| payload.starts_with(m)) else {
        let head: Vec<String> = payload.iter().take(8).map(|x| format!("{x:02x}")).collect();
        return Err(BzImageError::UnknownFormat {
            offset: start,
            head: head.join(" "),
        });
    };
    if matches!(format, "bzip2" | "lzo") {
        return Err(BzImageError::Unsupported { format });
    }
    if len < 8 {
        return Err(BzImageError::Truncated {
            what: format!("{format} payload at offset {start:#x} is only {len} bytes"),
        });
    }
    let size = le32(payload, len - 4);
    // Everything but gzip has the size appended after its own stream.
    let stream = if format == "gzip" {
        payload
    } else {
        &payload[..len - 4]
    };
    let mut out = Vec::with_capacity((size as usize).min(MAX_PREALLOC));
    let err = |msg: String| BzImageError::Decompress { format, msg };
    match format {
        "gzip" => read_all(flate2::read::GzDecoder::new(stream), &mut out),
        "lz4" => unlz4_legacy(stream, start, &mut out),
        "xz" => read_all(lzma_rust2::XzReader::new(stream, false), &mut out),
        "lzma" => lzma_rust2::LzmaReader::new_mem_limit(stream, u32::MAX, None)
            .map_err(|e| e.to_string())
            .and_then(|r| read_all(r, &mut out)),
        "zstd" => ruzstd::decoding::StreamingDecoder::new(stream)
            .map_err(|e| e.to_string())
            .and_then(|r| read_all(r, &mut out)),
        _ => unreachable!("{format} is rejected above"),
    }
    .map_err(err)?;
    if out.len() as u32 != size {
        return Err(err(format!(
            "got {:#x} bytes, but the size at offset {:#x} says {size:#x}",
            out.len(),
            start + len - 4
        )));
    }
    if !crate::elf::has_magic(&out) {
        return Err(BzImageError::NotElf);
    }
    Ok((out, format))
}

fn read_all(mut r: impl Read, out: &mut Vec<u8>) -> Result<(), String> {
    r.read_to_end(out).map(|_| ()).map_err(|e| e.to_string())
}

/// LZ4's worst-case compressed size of `n` bytes.
fn lz4_compress_bound(n: usize) -> usize {
    n + n / 255 + 16
}

/// Decodes an LZ4 legacy frame the way the kernel's lib/decompress_unlz4.c
/// does: the magic, then [u32 LE compressed size][block] until the input
/// ends (or a zero size); a repeated magic starts a concatenated frame.
/// Each block decompresses to at most 8 MiB.
/// `base` is the stream's offset in the file, for error messages.
fn unlz4_legacy(s: &[u8], base: usize, out: &mut Vec<u8>) -> Result<(), String> {
    let mut pos = 4; // The caller matched the magic.
    while s.len() - pos >= 4 {
        let n = le32(s, pos);
        if n == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        if n == 0 {
            break;
        }
        let n = n as usize;
        let at = base + pos;
        pos += 4;
        if n > lz4_compress_bound(LZ4_LEGACY_BLOCK) || n > s.len() - pos {
            return Err(format!(
                "block at offset {at:#x} claims {n:#x} compressed bytes, but {:#x} remain \
                 (and a block holds at most {:#x})",
                s.len() - pos,
                lz4_compress_bound(LZ4_LEGACY_BLOCK)
            ));
        }
        let done = out.len();
        out.resize(done + LZ4_LEGACY_BLOCK, 0);
        let got = lz4_flex::block::decompress_into(&s[pos..pos + n], &mut out[done..])
            .map_err(|e| format!("block at offset {at:#x}: {e}"))?;
        out.truncate(done + got);
        pos += n;
    }
    // Like the kernel, fewer than 4 bytes left or a zero size is the end
    // (padding); the caller's size check catches a stream cut short.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    /// A vmlinux stand-in: ELF magic, then compressible but varied bytes.
    fn fake_vmlinux(len: usize) -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01".to_vec();
        v.extend((0..len - v.len()).map(|i| ((i / 7) ^ (i % 251)) as u8));
        v
    }

    /// A minimal bzImage carrying `payload` (setup_sects 0, meaning 4).
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 5 * 512 + 0x40];
        b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        b[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
        b[VERSION..VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        b[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&0x40u32.to_le_bytes());
        b[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(b"trailing decompressor code");
        b
    }

    fn with_size(mut z: Vec<u8>, raw: &[u8]) -> Vec<u8> {
        z.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        z
    }

    fn check(payload: Vec<u8>, raw: &[u8], format: &str) {
        let (out, f) = extract_vmlinux(&bzimage(&payload)).unwrap();
        assert_eq!(f, format);
        assert!(out == raw, "{format}: output differs from input");
    }

    #[test]
    fn real_debian_bzimage_matches_extracted_vmlinux() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest/linux/out");
        let read = |name: &str| {
            std::fs::read(dir.join(name)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run scripts/linux-guest.sh to fetch the guest kernel",
                    dir.join(name).display()
                )
            })
        };
        let (bz, want) = (read("bzImage"), read("vmlinux"));
        assert!(is_bzimage(&bz));
        let (got, format) = extract_vmlinux(&bz).unwrap();
        assert_eq!(format, "lz4");
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "extracted vmlinux differs from guest/linux/out/vmlinux"
        );
    }

    #[test]
    fn gzip() {
        let raw = fake_vmlinux(300_000);
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).unwrap();
        check(z.finish().unwrap(), &raw, "gzip");
    }

    #[test]
    fn lz4_legacy_multi_block() {
        let raw = fake_vmlinux(LZ4_LEGACY_BLOCK + 12_345);
        let mut z = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for block in raw.chunks(LZ4_LEGACY_BLOCK) {
            let c = lz4_flex::block::compress(block);
            z.extend_from_slice(&(c.len() as u32).to_le_bytes());
            z.extend_from_slice(&c);
        }
        check(with_size(z.clone(), &raw), &raw, "lz4");
        // A repeated magic (concatenated frame) and zero padding, as the
        // kernel's unlz4 accepts them.
        let mut z2 = z[..4].to_vec();
        z2.extend_from_slice(&z);
        z2.extend_from_slice(&[0; 6]);
        check(with_size(z2, &raw), &raw, "lz4");
        // A block that overruns the payload is an error naming its offset.
        let mut bad = z;
        bad.truncate(bad.len() - 10);
        let e = extract_vmlinux(&bzimage(&with_size(bad, &raw))).unwrap_err();
        assert!(
            matches!(e, BzImageError::Decompress { format: "lz4", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("block at offset 0x"), "{e}");
    }

    #[test]
    fn xz_with_x86_bcj_like_the_kernel() {
        let raw = fake_vmlinux(200_000);
        let mut opts = lzma_rust2::XzOptions::with_preset(1);
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(&raw).unwrap();
        check(with_size(w.finish().unwrap(), &raw), &raw, "xz");
    }

    #[test]
    fn lzma() {
        let raw = fake_vmlinux(100_000);
        let mut o = lzma_rust2::LzmaOptions::with_preset(1);
        o.dict_size = 1 << 20; // Low bytes 0, as the kernel's "5d 00 00" magic assumes.
        let mut w = lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &o, None).unwrap();
        w.write_all(&raw).unwrap();
        check(with_size(w.finish().unwrap(), &raw), &raw, "lzma");
    }

    #[test]
    fn zstd() {
        let raw = fake_vmlinux(250_000);
        let z = ruzstd::encoding::compress_to_vec(
            &raw[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        check(with_size(z, &raw), &raw, "zstd");
    }

    #[test]
    fn unsupported_formats_are_named() {
        for (magic, name) in [
            (&b"BZh91AY&SY"[..], "bzip2"),
            (&[0x89, 0x4c, 0x5a, 0x4f, 0, 0, 0, 0, 0][..], "lzo"),
        ] {
            let e = extract_vmlinux(&bzimage(magic)).unwrap_err();
            assert!(
                matches!(e, BzImageError::Unsupported { format } if format == name),
                "{e}"
            );
            assert!(e.to_string().contains(name));
        }
        let e = extract_vmlinux(&bzimage(b"\x00\x01\x02\x03\x04\x05\x06\x07")).unwrap_err();
        assert!(
            matches!(e, BzImageError::UnknownFormat { offset: 0xa40, .. }),
            "{e}"
        );
    }

    #[test]
    fn not_a_bzimage() {
        let elf = fake_vmlinux(4096);
        assert!(!is_bzimage(&elf));
        assert!(!is_bzimage(b"HdrS"));
        let e = extract_vmlinux(&elf).unwrap_err();
        assert!(matches!(e, BzImageError::NotBzImage { .. }), "{e}");
        assert!(e.to_string().contains("0x202"), "{e}");
    }

    #[test]
    fn old_protocol() {
        let mut b = bzimage(&[0x1f, 0x8b, 0, 0, 0, 0, 0, 0]);
        b[VERSION..VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        let e = extract_vmlinux(&b).unwrap_err();
        assert!(
            matches!(e, BzImageError::OldProtocol { version: 0x0206 }),
            "{e}"
        );
        assert!(e.to_string().contains("2.06"), "{e}");
    }

    #[test]
    fn truncated_header_and_payload() {
        let raw = fake_vmlinux(10_000);
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).unwrap();
        let b = bzimage(&z.finish().unwrap());
        let e = extract_vmlinux(&b[..0x220]).unwrap_err();
        assert!(matches!(e, BzImageError::Truncated { .. }), "{e}");
        // The payload runs past the end of the file.
        let cut = 5 * 512 + 0x40 + 100;
        let e = extract_vmlinux(&b[..cut]).unwrap_err();
        assert!(matches!(e, BzImageError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("0xa40"), "{e}");
        // payload_length too short: the gzip stream is cut inside.
        let mut short = b.clone();
        short[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&100u32.to_le_bytes());
        let e = extract_vmlinux(&short).unwrap_err();
        assert!(
            matches!(e, BzImageError::Decompress { format: "gzip", .. }),
            "{e}"
        );
    }

    #[test]
    fn payload_that_is_not_elf() {
        let raw = vec![0x55u8; 5000];
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(&raw).unwrap();
        let e = extract_vmlinux(&bzimage(&z.finish().unwrap())).unwrap_err();
        assert!(matches!(e, BzImageError::NotElf), "{e}");
    }

    #[test]
    fn wrong_size_trailer() {
        let raw = fake_vmlinux(5000);
        let z = ruzstd::encoding::compress_to_vec(
            &raw[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let mut p = with_size(z, &raw);
        let n = p.len();
        p[n - 4] ^= 1;
        let e = extract_vmlinux(&bzimage(&p)).unwrap_err();
        assert!(e.to_string().contains("says"), "{e}");
    }
}
