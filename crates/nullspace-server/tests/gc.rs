//! The collector on a data directory laid out as the server lays it out
//! (artifact manifests naming rootfs and snapshots, snapshot files naming
//! content-addressed artifacts, machine records naming the template
//! snapshot their disk sits on), without booting VMs: what a ready build
//! of a live template, a live build or a live machine uses stays; what
//! only deleted templates or ended machines used goes.

use nullspace_model::machine::MachineStatus;
use std::path::{Path, PathBuf};

use nullspace_server::{Config, gc};
use nullspace_store::artifacts::Leased;
use nullspace_store::{BuildRow, MachineRow};
use serde_json::json;

struct Built {
    manifest: PathBuf,
    rootfs: PathBuf,
    snapshot: PathBuf,
    kernel: PathBuf,
}

async fn ready_build(
    state: &nullspace_server::Shared,
    data: &Path,
    template: &str,
    id: &str,
) -> Built {
    let art = |d: &nullspace_digest::Digest| state.artifacts.path(d);
    let w = state.artifacts.writing().unwrap();
    let (rootfs, _) = w.put(format!("rootfs of {id}").as_bytes()).unwrap();
    let (kernel, _) = w.put(format!("kernel of {id}").as_bytes()).unwrap();
    let snapshot = data.join("artifacts/snapshots").join(format!("{id}.1"));
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(snapshot.join("memory"), vec![7u8; 4096]).unwrap();
    std::fs::write(
        snapshot.join("snapshot.json"),
        json!({"format": 1, "kernel": kernel.to_string()}).to_string(),
    )
    .unwrap();
    let manifest = json!({
        "rootfs": rootfs.to_string(), "rootfs_size": 1, "env": {}, "user": null, "workdir": null,
        "start_cmd": null, "readiness": null, "image": {}, "oci": {},
        "snapshot": snapshot.display().to_string(),
    });
    let (m, _) = w.put(manifest.to_string().as_bytes()).unwrap();
    drop(w);
    state
        .store
        .insert_build(&BuildRow {
            id: id.into(),
            namespace: "team-a".into(),
            template_id: template.into(),
            status: "ready".into(),
            source_type: "oci_import".into(),
            backend: "native".into(),
            created_at: 1,
            record: json!({"artifact_ids": [m.to_string()]}).to_string(),
            definition: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    Built {
        manifest: art(&m),
        rootfs: art(&rootfs),
        snapshot,
        kernel: art(&kernel),
    }
}

fn all_exist(b: &Built) -> [bool; 4] {
    [&b.manifest, &b.rootfs, &b.snapshot, &b.kernel].map(|p| p.exists())
}

#[tokio::test]
async fn collects_only_what_nothing_references() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let state = nullspace_server::open_store(Config::new(data.clone()))
        .await
        .unwrap();
    let t = |name: &'static str| {
        let state = state.clone();
        async move {
            state
                .store
                .ensure_template("team-a", name, "{}")
                .await
                .unwrap()
        }
    };
    let (keep_t, gone_t, used_t) = (t("keep").await, t("gone").await, t("used").await);
    let keep = ready_build(&state, &data, &keep_t, "tb_keep").await;
    let gone = ready_build(&state, &data, &gone_t, "tb_gone").await;
    let used = ready_build(&state, &data, &used_t, "tb_used").await;
    // A running machine restored from `used` keeps its snapshot after the
    // template goes; a destroyed one restored from `gone` keeps nothing.
    let machine = |id: &str, status: MachineStatus, b: &Built| MachineRow {
        id: id.into(),
        namespace: "team-a".into(),
        node_id: "node_a".into(),
        status,
        template_id: "tmpl".into(),
        base_snapshot: String::new(),
        created_at: 1,
        updated_at: 1,
        deadline_at: 0,
        // A whole record, as the server writes it (an unreadable one
        // fails the mark instead of keeping nothing).
        record: json!({
            "id": id, "flavor": "machine", "template": "t", "template_id": "tmpl",
            "build_id": "tb", "vcpus": 1, "memory_mb": 256, "created_at": 1,
            "timeout_ms": 1000, "timeout_action": "destroy",
            "template_dir": b.snapshot.display().to_string(),
            "base_dir": b.snapshot.display().to_string(),
        })
        .to_string(),
    };
    for m in [
        machine("mch_live", MachineStatus::Running, &used),
        machine("mch_ended", MachineStatus::Destroyed, &gone),
    ] {
        state.store.insert_machine_once(&m, None).await.unwrap();
    }
    // A build in progress: its snapshot directory has no manifest yet.
    state
        .store
        .insert_build(&BuildRow {
            id: "tb_live".into(),
            namespace: "team-a".into(),
            template_id: keep_t.clone(),
            status: "building".into(),
            source_type: "oci_import".into(),
            backend: "native".into(),
            record: "{}".into(),
            definition: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Machine snapshots: a recorded one stays; one a take is writing (its
    // marker held) stays; a crash's leftover (no row, marker not held) goes.
    let msnaps = data.join("snapshots");
    let recorded = msnaps.join("snap_recorded");
    let taking = msnaps.join("snap_taking");
    let crashed = msnaps.join("snap_crashed");
    for d in [&recorded, &taking, &crashed] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("memory"), b"m").unwrap();
    }
    std::fs::write(msnaps.join("snap_crashed.taking"), b"").unwrap();
    let held =
        nullspace_store::inflight::InFlight::hold(&msnaps.join("snap_taking.taking")).unwrap();
    state
        .store
        .insert_snapshot(&nullspace_store::SnapshotRow {
            id: "snap_recorded".into(),
            namespace: "team-a".into(),
            machine_id: "mch_live".into(),
            node_id: "node_a".into(),
            parent_id: String::new(),
            created_at: 1,
            record: "{}".into(),
        })
        .await
        .unwrap();
    let live_snapshot = data.join("artifacts/snapshots/tb_live.1");
    std::fs::create_dir_all(&live_snapshot).unwrap();
    // What the live build stored and leased (no record names it yet) stays;
    // a lease of a build that ended keeps nothing.
    let w = state.artifacts.writing().unwrap();
    let (leased, _) = w.put(&b"rootfs of tb_live"[..]).unwrap();
    assert!(
        w.lease("tb_live", &Leased::Artifact(leased.clone()))
            .unwrap()
    );
    let (stale, _) = w.put(&b"rootfs of a build that failed"[..]).unwrap();
    assert!(
        w.lease("tb_failed", &Leased::Artifact(stale.clone()))
            .unwrap()
    );
    drop(w);
    assert!(state.store.delete_template(&gone_t).await.unwrap());
    assert!(state.store.delete_template(&used_t).await.unwrap());

    let policy = gc::Policy::default();
    let dry = gc::collect(&state, &policy, true).await.unwrap();
    let listed: Vec<&str> = dry.items.iter().map(|i| i.what.as_str()).collect();
    for p in [
        &gone.manifest,
        &gone.rootfs,
        &gone.snapshot,
        &gone.kernel,
        &used.manifest,
        &used.rootfs,
    ] {
        assert!(
            listed.contains(&p.to_str().unwrap()),
            "{p:?} not in {listed:#?}"
        );
    }
    let snap = dry
        .items
        .iter()
        .find(|i| i.what == gone.snapshot.to_str().unwrap())
        .unwrap();
    assert!(snap.bytes >= 4096, "{snap:?}");
    assert_eq!(all_exist(&gone), [true; 4], "a dry run removes nothing");

    let done = gc::collect(&state, &policy, false).await.unwrap();
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(all_exist(&keep), [true; 4], "a live template's artifacts");
    assert_eq!(
        all_exist(&gone),
        [false; 4],
        "a deleted template's artifacts"
    );
    // The live machine's snapshot (and what its files name) stays; the
    // deleted template's manifest and rootfs go.
    assert_eq!(all_exist(&used), [false, false, true, true]);
    assert!(
        live_snapshot.exists(),
        "a running build's snapshot directory"
    );
    assert!(state.artifacts.contains(&leased), "a live build's lease");
    assert!(recorded.exists() && taking.exists(), "{:#?}", done.items);
    assert!(!crashed.exists() && !msnaps.join("snap_crashed.taking").exists());
    assert!(!state.artifacts.contains(&stale), "an ended build's lease");
    let leases = state.artifacts.leases().unwrap();
    assert_eq!(leases.keys().collect::<Vec<_>>(), ["tb_live"]);
    let again = gc::collect(&state, &policy, false).await.unwrap();
    assert!(again.items.is_empty(), "{:#?}", again.items);
    // The take ended without a record (it failed): its directory goes now.
    drop(held);
    let last = gc::collect(&state, &policy, false).await.unwrap();
    assert!(!taking.exists(), "{:#?}", last.items);
}
