//! Benchmark / manual tool: decode gzip/zstd/tar layers (in parallel
//! threads) into spools and build an ext4 image.
//!
//! Usage: import OUT.img SPOOL_DIR LAYER...

use std::fs::File;
use std::time::Instant;

use nullspace_rootfs::{Limits, RootfsOptions, SpooledLayer, build_rootfs, decode_layer};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: import OUT.img SPOOL_DIR LAYER...");
        std::process::exit(2);
    }
    let out = std::path::Path::new(&args[1]);
    let spool_dir = std::path::Path::new(&args[2]);
    let t0 = Instant::now();
    let layers: Vec<SpooledLayer> = std::thread::scope(|s| {
        let handles: Vec<_> = args[3..]
            .iter()
            .enumerate()
            .map(|(i, path)| {
                s.spawn(move || {
                    let tar_path = spool_dir.join(format!("layer{i}.tar"));
                    let mut spool = File::create(&tar_path).expect("spool");
                    let blob = File::open(path).expect("layer");
                    let index = decode_layer(path, blob, "", &mut spool, &Limits::default())
                        .unwrap_or_else(|e| panic!("{e}"));
                    SpooledLayer {
                        name: path.clone(),
                        tar_path,
                        index,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let t1 = Instant::now();
    let summary =
        build_rootfs(&layers, &RootfsOptions::default(), out).unwrap_or_else(|e| panic!("{e}"));
    let t2 = Instant::now();
    eprintln!(
        "decode {:.2}s, build {:.2}s, total {:.2}s, peak RSS {} MiB\n{summary:?}",
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t2 - t0).as_secs_f64(),
        peak_rss_kib() / 1024
    );
}
