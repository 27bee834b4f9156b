//! Compression sniffing (gzip, zstd, plain tar): the raw input is decoded
//! as whatever its magic bytes say, and a plain tar that decodes is then
//! gzipped and zstd-compressed: both must decode to the same index (same
//! entries, same diff_id) with the compression named.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use nullspace_rootfs::{Compression, LayerIndex, Limits, decode_layer};

fn decode(blob: &[u8]) -> Option<LayerIndex> {
    let limits = Limits {
        max_layer_bytes: 64 << 20,
        max_total_bytes: 64 << 20,
        ..Limits::default()
    };
    let mut spool = tempfile::tempfile().expect("spool");
    let media = "application/vnd.oci.image.layer.v1.tar+gzip";
    decode_layer("layer", blob, media, &mut spool, &limits).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(index) = decode(data) else {
        return;
    };
    let named = match index.compression {
        Compression::Gzip => data.starts_with(&[0x1f, 0x8b]),
        Compression::Zstd => {
            data.len() >= 4
                && (data[..4] == [0x28, 0xb5, 0x2f, 0xfd] || data[1..4] == [0x2a, 0x4d, 0x18])
        }
        Compression::None => !data.starts_with(&[0x1f, 0x8b]),
    };
    assert!(
        named,
        "{:?} for magic {:02x?}",
        index.compression,
        &data[..data.len().min(4)]
    );
    if index.compression != Compression::None {
        return;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(data, 1).unwrap();
    for (blob, kind) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let again = decode(&blob).unwrap_or_else(|| panic!("{kind:?} of a decodable tar fails"));
        assert_eq!(again.compression, kind);
        assert_eq!(again.diff_id, index.diff_id);
        assert_eq!(again.uncompressed_size, index.uncompressed_size);
        assert_eq!(again.entries, index.entries);
    }
});
