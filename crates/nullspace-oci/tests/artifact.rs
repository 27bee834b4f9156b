//! Files as an OCI 1.1 artifact, against a real registry
//! (`docker-registry`): round trip, sparseness, determinism, dedup,
//! corruption, hostile documents, an unreachable registry.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nullspace_oci::artifact::{self, ArtifactError, FileSpec, PushSpec, Pushed, RegistryOptions};
use nullspace_oci::digest::sparse::sha256_file;
use nullspace_testkit::registry::{Auth, PASSWORD, Registry, USER};

const TYPE: &str = "application/vnd.nullspace.test.v1";
/// Small chunks, so small files have many.
const CHUNK: u64 = 64 << 10;

fn opts() -> RegistryOptions {
    RegistryOptions {
        connect_timeout: Duration::from_secs(3),
        read_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn opts_for(reg: &Registry) -> RegistryOptions {
    let mut o = opts();
    if reg.auth != Auth::None {
        o.credentials = Some(nullspace_oci::auth::Credentials {
            username: USER.into(),
            password: PASSWORD.into(),
        });
    }
    o
}

/// A deterministic pseudo-random byte pattern.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `dir` with: `big` (sparse: 1 MiB + 5 bytes, holes and data, a data
/// extent holding a run of zeros), `small` (100 bytes), `empty`.
fn make_files(dir: &Path) -> Vec<FileSpec> {
    std::fs::create_dir_all(dir).unwrap();
    let big = std::fs::File::create(dir.join("big")).unwrap();
    big.set_len((1 << 20) + 5).unwrap();
    big.write_all_at(&pattern(1, 10_000), 0).unwrap();
    big.write_all_at(&pattern(2, 70_000), 300_000).unwrap();
    // Written zeros: allocated, but a zero chunk by content.
    big.write_all_at(&vec![0u8; CHUNK as usize], 8 * CHUNK)
        .unwrap();
    big.write_all_at(b"tail!", 1 << 20).unwrap();
    drop(big);
    std::fs::write(dir.join("small"), pattern(3, 100)).unwrap();
    std::fs::write(dir.join("empty"), b"").unwrap();
    specs(dir, &["big", "small", "empty"])
}

fn specs(dir: &Path, names: &[&str]) -> Vec<FileSpec> {
    names
        .iter()
        .map(|n| {
            let p = dir.join(n);
            FileSpec {
                name: n.to_string(),
                size: std::fs::metadata(&p).unwrap().len(),
                sha256: sha256_file(&p).unwrap(),
            }
        })
        .collect()
}

fn push(
    reg: &Registry,
    tag: &str,
    dir: &Path,
    files: &[FileSpec],
    payload: &serde_json::Value,
) -> Result<Pushed, ArtifactError> {
    let annotations = BTreeMap::from([
        ("dev.nullspace.test.b".to_string(), "2".to_string()),
        ("dev.nullspace.test.a".to_string(), "1".to_string()),
    ]);
    let spec = PushSpec {
        dir,
        files,
        artifact_type: TYPE,
        payload,
        annotations: &annotations,
    };
    artifact::push_with_chunk_size(
        &format!("{}/arts/t:{tag}", reg.addr),
        &spec,
        &opts_for(reg),
        CHUNK,
    )
}

fn never() -> bool {
    false
}

fn partial(into: &Path) -> PathBuf {
    PathBuf::from(format!("{}.partial", into.display()))
}

#[test]
fn round_trip_keeps_bytes_and_holes_with_token_auth() {
    let reg = Registry::start(Auth::Token);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    let payload = serde_json::json!({"b": [1, 2], "a": {"z": 1, "y": "x"}});
    let pushed = push(&reg, "1", &src, &files, &payload).unwrap();
    // big: 17 chunks of 64 KiB (the last 5 bytes); data in chunks 0, 4, 5, 16.
    assert_eq!(pushed.chunks, 4 + 1, "{pushed:?}");
    assert_eq!(pushed.zero_chunks, 17 - 4, "{pushed:?}");
    assert!(pushed.reference.ends_with(&pushed.digest.to_string()));
    assert_eq!(pushed.uploaded_blobs, 4 + 1 + 1, "chunks, small, config");

    for src_ref in [format!("{}/arts/t:1", reg.addr), pushed.reference.clone()] {
        let into = tmp.path().join(format!("out-{}", src_ref.len()));
        let pulled = artifact::pull(&src_ref, &into, &opts_for(&reg), TYPE, &never).unwrap();
        assert_eq!(pulled.digest, pushed.digest);
        assert_eq!(pulled.payload, payload);
        assert_eq!(pulled.files, files);
        for f in &files {
            let a = std::fs::read(src.join(&f.name)).unwrap();
            let b = std::fs::read(into.join(&f.name)).unwrap();
            assert!(a == b, "{} differs", f.name);
            assert_eq!(sha256_file(&into.join(&f.name)).unwrap(), f.sha256);
        }
        let md = std::fs::metadata(into.join("big")).unwrap();
        let allocated = md.blocks() * 512;
        assert!(
            allocated < md.len() / 4,
            "pulled big file is not sparse: {allocated} of {} bytes allocated",
            md.len()
        );
        assert!(!partial(&into).exists());
    }
    let (digest, p) = artifact::inspect(&pushed.reference, &opts_for(&reg)).unwrap();
    assert_eq!((digest, p), (pushed.digest, payload));
}

#[test]
fn same_files_give_the_same_digest_and_upload_nothing_twice() {
    let reg = Registry::start(Auth::Basic);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    let payload = serde_json::json!({"x": 1, "a": [true, null]});
    let first = push(&reg, "1", &src, &files, &payload).unwrap();
    assert!(first.uploaded_blobs > 0);
    let again = push(&reg, "2", &src, &files, &payload).unwrap();
    assert_eq!(again.digest, first.digest);
    assert_eq!(
        (again.uploaded_blobs, again.uploaded_bytes),
        (0, 0),
        "a second push uploaded blobs"
    );
    // A dense copy of the sparse file: same content, same artifact.
    let dense = tmp.path().join("dense");
    std::fs::create_dir(&dense).unwrap();
    for f in &files {
        std::fs::write(
            dense.join(&f.name),
            std::fs::read(src.join(&f.name)).unwrap(),
        )
        .unwrap();
    }
    let md = std::fs::metadata(dense.join("big")).unwrap();
    assert!(md.blocks() * 512 >= md.len(), "the copy is not dense");
    let d = push(&reg, "3", &dense, &files, &payload).unwrap();
    assert_eq!(d.digest, first.digest);
    // Key order in the payload does not matter; its content does.
    let reordered = serde_json::from_str(r#"{"a": [true, null], "x": 1}"#).unwrap();
    let r = push(&reg, "4", &src, &files, &reordered).unwrap();
    assert_eq!(r.digest, first.digest);
    let changed = serde_json::json!({"x": 2, "a": [true, null]});
    let c = push(&reg, "5", &src, &files, &changed).unwrap();
    assert_ne!(c.digest, first.digest);
    assert_eq!(c.uploaded_blobs, 1, "only the config is new");
}

#[test]
fn push_refuses_a_wrong_checksum_and_bad_destinations() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut files = make_files(&src);
    files[0].sha256 = "0".repeat(64);
    let e = push(&reg, "1", &src, &files, &serde_json::json!({})).unwrap_err();
    assert!(
        matches!(e, ArtifactError::Invalid { .. }) && e.to_string().contains("file big: sha256"),
        "{e}"
    );
    let files = specs(&src, &["small"]);
    let payload = serde_json::json!({});
    let annotations = BTreeMap::new();
    let spec = PushSpec {
        dir: &src,
        files: &files,
        artifact_type: TYPE,
        payload: &payload,
        annotations: &annotations,
    };
    for dest in [
        format!("{}/arts/t", reg.addr),
        format!("{}/arts/t@sha256:{}", reg.addr, "0".repeat(64)),
    ] {
        let e = artifact::push(&dest, &spec, &opts()).unwrap_err();
        assert!(matches!(e, ArtifactError::Usage { .. }), "{dest}: {e}");
    }
    let bad = [FileSpec {
        name: "../small".into(),
        ..files[0].clone()
    }];
    let spec = PushSpec {
        files: &bad,
        ..spec
    };
    let e = artifact::push(&format!("{}/arts/t:1", reg.addr), &spec, &opts()).unwrap_err();
    assert!(e.to_string().contains("plain file name"), "{e}");
}

// ------------------------------------------------ raw registry access

/// One HTTP/1.0 request to the registry; (status, headers, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = vec![];
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, out[split + 4..].to_vec())
}

fn get_manifest(reg: &Registry, tag: &str) -> serde_json::Value {
    let (st, _, body) = http(
        &reg.addr,
        "GET",
        &format!("/v2/arts/t/manifests/{tag}"),
        "x/x",
        b"",
    );
    assert_eq!(st, 200);
    serde_json::from_slice(&body).unwrap()
}

fn get_blob(reg: &Registry, digest: &str) -> Vec<u8> {
    let (st, _, body) = http(
        &reg.addr,
        "GET",
        &format!("/v2/arts/t/blobs/{digest}"),
        "x/x",
        b"",
    );
    assert_eq!(st, 200, "GET blob {digest}");
    body
}

fn put_blob(reg: &Registry, data: &[u8]) -> String {
    let digest = nullspace_oci::Digest::sha256_of(data).to_string();
    let (st, head, _) = http(&reg.addr, "POST", "/v2/arts/t/blobs/uploads/", "x/x", b"");
    assert_eq!(st, 202, "{head}");
    let loc = head
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .unwrap()
        .trim()
        .to_string();
    let path = match loc.find("/v2/") {
        Some(i) => loc[i..].to_string(),
        None => loc,
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let (st, head, _) = http(
        &reg.addr,
        "PUT",
        &format!("{path}{sep}digest={digest}"),
        "application/octet-stream",
        data,
    );
    assert_eq!(st, 201, "{head}");
    digest
}

/// Pushes `tag`: the manifest of `from` with its config changed by `f`.
fn push_hostile(reg: &Registry, from: &str, tag: &str, f: impl Fn(&mut serde_json::Value)) {
    let mut m = get_manifest(reg, from);
    let mut config: serde_json::Value =
        serde_json::from_slice(&get_blob(reg, m["config"]["digest"].as_str().unwrap())).unwrap();
    f(&mut config);
    let bytes = serde_json::to_vec(&config).unwrap();
    let digest = put_blob(reg, &bytes);
    m["config"]["digest"] = digest.into();
    m["config"]["size"] = bytes.len().into();
    let (st, head, _) = http(
        &reg.addr,
        "PUT",
        &format!("/v2/arts/t/manifests/{tag}"),
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&m).unwrap(),
    );
    assert_eq!(st, 201, "{head}");
}

#[test]
fn a_corrupt_chunk_fails_the_pull_and_leaves_nothing() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    push(&reg, "1", &src, &files, &serde_json::json!({})).unwrap();
    let m = get_manifest(&reg, "1");
    // The second layer: big's chunk 4 (offset 262144).
    let layer = &m["layers"][1];
    assert_eq!(layer["annotations"]["dev.nullspace.offset"], "262144");
    let path = reg.blob_data_path(layer["digest"].as_str().unwrap());
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let into = tmp.path().join("out");
    let e = artifact::pull(
        &format!("{}/arts/t:1", reg.addr),
        &into,
        &opts(),
        TYPE,
        &never,
    )
    .unwrap_err();
    assert!(matches!(e, ArtifactError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("chunk 4 of big: digest"), "{e}");
    assert!(!into.exists() && !partial(&into).exists());

    // A stale staging directory is replaced, and a cancelled pull also
    // leaves nothing.
    std::fs::create_dir(partial(&into)).unwrap();
    std::fs::write(partial(&into).join("junk"), b"x").unwrap();
    let e = artifact::pull(
        &format!("{}/arts/t:1", reg.addr),
        &into,
        &opts(),
        TYPE,
        &|| true,
    )
    .unwrap_err();
    assert!(matches!(e, ArtifactError::Cancelled { .. }), "{e}");
    assert!(!into.exists() && !partial(&into).exists());
}

#[test]
fn wrong_type_existing_target_and_hostile_configs_are_refused() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    push(&reg, "1", &src, &files, &serde_json::json!({})).unwrap();
    let r = |tag: &str| format!("{}/arts/t:{tag}", reg.addr);
    let into = tmp.path().join("out");

    let e = artifact::pull(&r("1"), &into, &opts(), "application/x-other", &never).unwrap_err();
    assert!(e.to_string().contains("artifactType"), "{e}");
    assert!(!into.exists() && !partial(&into).exists());

    std::fs::create_dir(&into).unwrap();
    let e = artifact::pull(&r("1"), &into, &opts(), TYPE, &never).unwrap_err();
    assert!(matches!(e, ArtifactError::Exists { .. }), "{e}");
    std::fs::remove_dir(&into).unwrap();

    push_hostile(&reg, "1", "slash", |c| c["files"][0]["name"] = "a/b".into());
    push_hostile(&reg, "1", "dotdot", |c| c["files"][0]["name"] = "..".into());
    push_hostile(&reg, "1", "overlap", |c| {
        c["files"][0]["chunks"][1]["offset"] = 0.into();
    });
    push_hostile(&reg, "1", "huge", |c| {
        c["files"][0]["size"] = (1u64 << 41).into();
    });
    push_hostile(&reg, "1", "short", |c| {
        c["files"][0]["size"] = 1.into();
    });
    for (tag, want) in [
        ("slash", "not a plain file name"),
        ("dotdot", "not a plain file name"),
        ("overlap", "overlap"),
        ("huge", "over the limit"),
        ("short", "chunks listed"),
    ] {
        let e = artifact::pull(&r(tag), &into, &opts(), TYPE, &never).unwrap_err();
        assert!(
            matches!(e, ArtifactError::Invalid { .. }) && e.to_string().contains(want),
            "{tag}: {e}"
        );
        assert!(!into.exists() && !partial(&into).exists(), "{tag}");
        assert!(!tmp.path().join("b").exists());
    }
}

#[test]
fn a_stopped_registry_is_unreachable_within_the_timeout() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    let pushed = push(&reg, "1", &src, &files, &serde_json::json!({})).unwrap();
    let addr = reg.addr.clone();
    drop(reg);
    let into = tmp.path().join("out");
    let t = Instant::now();
    let e = artifact::pull(&pushed.reference, &into, &opts(), TYPE, &never).unwrap_err();
    assert!(matches!(e, ArtifactError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains(&addr), "{e}");
    assert!(!into.exists() && !partial(&into).exists());
    let e = artifact::inspect(&pushed.reference, &opts()).unwrap_err();
    assert!(matches!(e, ArtifactError::Unreachable { .. }), "{e}");
    let annotations = BTreeMap::new();
    let payload = serde_json::json!({});
    let spec = PushSpec {
        dir: &src,
        files: &files,
        artifact_type: TYPE,
        payload: &payload,
        annotations: &annotations,
    };
    let e = artifact::push(&format!("{addr}/arts/t:2"), &spec, &opts()).unwrap_err();
    assert!(matches!(e, ArtifactError::Unreachable { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Throughput of a 512 MiB sparse file holding 100 MiB of data, at the
/// default chunk size: `cargo test -p nullspace-oci --test artifact --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn measure_push_and_pull() {
    for spread in [true, false] {
        measure(spread);
    }
}

/// `spread`: 25 extents of 4 MiB, one every 20 MiB (every 64 MiB chunk
/// holds data); else the same 100 MiB at the start of the file (6 of 8
/// chunks are holes).
fn measure(spread: bool) {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("mem")).unwrap();
    f.set_len(512 << 20).unwrap();
    // Half random, half a compressible pattern.
    for i in 0..25u64 {
        let data = if i % 2 == 0 {
            pattern(i, 4 << 20)
        } else {
            (0..4 << 20).map(|k: u32| (k / 512) as u8).collect()
        };
        let at = if spread {
            i * (20 << 20)
        } else {
            i * (4 << 20)
        };
        f.write_all_at(&data, at).unwrap();
    }
    drop(f);
    let files = specs(&src, &["mem"]);
    let payload = serde_json::json!({});
    let annotations = BTreeMap::new();
    let spec = PushSpec {
        dir: &src,
        files: &files,
        artifact_type: TYPE,
        payload: &payload,
        annotations: &annotations,
    };
    let t = Instant::now();
    let p = artifact::push(&format!("{}/arts/t:1", reg.addr), &spec, &opts()).unwrap();
    let push_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let again = artifact::push(&format!("{}/arts/t:2", reg.addr), &spec, &opts()).unwrap();
    let again_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let into = tmp.path().join("out");
    let pulled = artifact::pull(&p.reference, &into, &opts(), TYPE, &never).unwrap();
    let pull_s = t.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "512 MiB file, 100 MiB data {}: push {push_s:.2} s ({:.0} MiB/s of data, {} chunks, {} zero, {:.1} MiB stored); \
         second push {again_s:.2} s ({} blobs uploaded); pull {pull_s:.2} s ({:.0} MiB/s of data, {:.1} MiB fetched)",
        if spread { "spread" } else { "at the start" },
        100.0 / push_s,
        p.chunks,
        p.zero_chunks,
        mib(p.stored_bytes),
        again.uploaded_blobs,
        100.0 / pull_s,
        mib(pulled.fetched_bytes),
    );
    assert_eq!(sha256_file(&into.join("mem")).unwrap(), files[0].sha256);
}

#[test]
fn a_registry_that_hangs_is_unreachable_after_the_read_timeout() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in listener.incoming() {
            held.push(c);
        }
    });
    let o = RegistryOptions {
        read_timeout: Duration::from_secs(2),
        ..opts()
    };
    let tmp = tempfile::tempdir().unwrap();
    let into = tmp.path().join("out");
    let t = Instant::now();
    let e = artifact::pull(&format!("{addr}/arts/t:1"), &into, &o, TYPE, &never).unwrap_err();
    assert!(matches!(e, ArtifactError::Unreachable { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!into.exists() && !partial(&into).exists());
}

/// Serves `docs` (path → body) over HTTP/1.1 keep-alive; a path in
/// `stall` gets its headers and half its body, then nothing.
fn fake_registry(
    docs: std::collections::HashMap<String, (String, Vec<u8>)>,
    stall: String,
) -> String {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let docs = std::sync::Arc::new(docs);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let docs = docs.clone();
            let stall = stall.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let (status, ct, body) = match docs.get(path) {
                        Some((ct, b)) => ("200 OK", ct.as_str(), b.clone()),
                        None if path == "/v2/" => ("200 OK", "application/json", b"{}".to_vec()),
                        None => ("404 Not Found", "application/json", b"{}".to_vec()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if conn.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    if method == "HEAD" {
                        continue;
                    }
                    if path == stall {
                        let _ = conn.write_all(&body[..body.len() / 2]);
                        std::thread::sleep(Duration::from_secs(60));
                        return;
                    }
                    if conn.write_all(&body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_registry_that_stops_mid_chunk_is_unreachable_after_the_read_timeout() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let files = make_files(&src);
    push(&reg, "1", &src, &files, &serde_json::json!({})).unwrap();
    let m = get_manifest(&reg, "1");
    let mut docs = std::collections::HashMap::new();
    docs.insert(
        "/v2/arts/t/manifests/1".to_string(),
        (
            "application/vnd.oci.image.manifest.v1+json".to_string(),
            serde_json::to_vec(&m).unwrap(),
        ),
    );
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    for d in &blobs {
        docs.insert(
            format!("/v2/arts/t/blobs/{d}"),
            ("application/octet-stream".to_string(), get_blob(&reg, d)),
        );
    }
    // The second chunk stalls after half its bytes.
    let fake = fake_registry(docs, format!("/v2/arts/t/blobs/{}", blobs[2]));
    let o = RegistryOptions {
        read_timeout: Duration::from_secs(2),
        ..opts()
    };
    let into = tmp.path().join("out");
    let t = Instant::now();
    let e = artifact::pull(&format!("{fake}/arts/t:1"), &into, &o, TYPE, &never).unwrap_err();
    assert!(matches!(e, ArtifactError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("chunk 4 of big"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!into.exists() && !partial(&into).exists());
}

#[test]
fn an_artifact_without_layers_round_trips() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    let hole = std::fs::File::create(src.join("hole")).unwrap();
    hole.set_len(3 * CHUNK + 1).unwrap();
    drop(hole);
    for names in [&["empty", "hole"][..], &[][..]] {
        let files = specs(&src, names);
        let payload = serde_json::json!({"names": names});
        let p = push(&reg, "1", &src, &files, &payload).unwrap();
        assert_eq!((p.chunks, p.stored_bytes), (0, 0), "{p:?}");
        let into = tmp.path().join(format!("out{}", names.len()));
        let pulled = artifact::pull(&p.reference, &into, &opts(), TYPE, &never).unwrap();
        assert_eq!((pulled.files, pulled.payload), (files.clone(), payload));
        let names_in: Vec<_> = std::fs::read_dir(&into).unwrap().collect();
        assert_eq!(names_in.len(), names.len());
        for f in &files {
            assert_eq!(sha256_file(&into.join(&f.name)).unwrap(), f.sha256);
            let md = std::fs::metadata(into.join(&f.name)).unwrap();
            assert_eq!((md.len(), md.blocks()), (f.size, 0));
        }
    }
}
