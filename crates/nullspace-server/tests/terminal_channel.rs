//! The terminal and watch sockets (`machine_api::pty`) against a real guest
//! (QEMU, TCG here), speaking SDK 1.0.3's frames over a real WebSocket:
//! a shell that echoes, resizes, survives the socket closing and passes on
//! its exit code; a watch that reports create, write and remove.

use futures_util::{SinkExt, StreamExt};
use nullspace_server::guest::Guest;
use nullspace_server::machine_api::pty as terminal_api;
use nullspace_vm::qemu::{BootSpec, QemuVm, QemuVmm};
use nullspace_vm::template::GuestConfig;
use nullspace_vm::{GuestKernel, Vm};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(60);

fn boot() -> QemuVm {
    use nullspace_oci::SourceRef;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nullspace-server-terminal");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let init = nullspace_vm::init_binary::locate_or_build(&workspace).unwrap();
    nullspace_oci::demo::write_layout(&dir.join("layout"), "1").unwrap();
    let image = nullspace_oci::Image::resolve(
        &SourceRef::parse(&format!("oci:{}:1", dir.join("layout").display())).unwrap(),
        &Default::default(),
    )
    .unwrap();
    nullspace_build::import::import(
        &image,
        &dir.join("demo"),
        &nullspace_build::import::ImportOptions::default(),
        &nullspace_oci::layout::NoProgress,
    )
    .unwrap();
    let disk = dir.join("demo/rootfs.ext4");
    nullspace_vm::rootfs::grow(&disk, 256).unwrap();
    let vmm = QemuVmm::new(GuestKernel::find().unwrap(), &init, &dir.join("cache")).unwrap();
    let mut config = GuestConfig::new("nullspace-agent");
    config.env.insert("PATH".into(), "/bin".into());
    config.user = Some("app:app".into());
    config.workdir = Some("/srv".into());
    let spec = BootSpec {
        disk,
        config,
        memory_mb: 512,
        vcpus: 2,
        boot_timeout: Duration::from_secs(90),
        network: false,
        memory_mode: nullspace_vm::MemoryMode::Mapped,
        memory_file: None,
        ceiling: None,
    };
    let mut vm = QemuVm::boot(&vmm, &spec, &nullspace_vm::CancellationToken::new()).unwrap();
    vm.agent().ping(T).unwrap();
    vm
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("socket ended: {other:?}"),
        }
    }
}

/// Reads `pty_output` frames until the screen holds `needle`; the screen.
async fn screen_until(ws: &mut Ws, screen: &mut String, needle: &str) {
    use base64::Engine as _;
    let t = Instant::now();
    while !screen.contains(needle) {
        assert!(t.elapsed() < T, "no {needle:?}; screen {screen:?}");
        let f = recv(ws).await;
        assert_eq!(f["type"], "pty_output", "{f}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(f["data_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(f["data"], String::from_utf8_lossy(&bytes).as_ref());
        screen.push_str(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn sdk_frames_drive_a_terminal_and_a_watch() {
    let mut vm = boot();
    let guest = Guest::new(vm.dir().join("agent.sock"), Some(vm.agent().clone()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        use axum::extract::ws::WebSocketUpgrade;
        use axum::routing::get;
        let (g1, g2) = (guest.clone(), guest.clone());
        let app = axum::Router::new()
            .route(
                "/pty",
                get(move |ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(move |s| terminal_api::pty_channel(s, g1))
                }),
            )
            .route(
                "/watch",
                get(move |ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(move |s| terminal_api::watch_channel(s, g2, None))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let url = |p: &str| format!("ws://{addr}{p}");

        // pty_start, typed input, the window size, resize.
        let (mut ws, _) = tokio_tungstenite::connect_async(url("/pty")).await.unwrap();
        send(&mut ws, json!({"type": "pty_start", "id": "pty_1", "cols": 80, "rows": 24})).await;
        let started = recv(&mut ws).await;
        assert_eq!(started["type"], "pty_started", "{started}");
        assert_eq!(started["id"], "pty_1");
        let sid = started["session_id"].as_str().unwrap().to_string();
        let pid = started["pid"].as_u64().unwrap();
        let mut screen = String::new();
        send(&mut ws, json!({"type": "pty_input", "id": "pty_1", "session_id": sid, "data": "stty size; echo hi-$((1+1))\n"})).await;
        screen_until(&mut ws, &mut screen, "hi-2").await;
        assert!(screen.contains("24 80"), "{screen:?}");
        send(&mut ws, json!({"type": "pty_resize", "id": "pty_1", "session_id": sid, "cols": 100, "rows": 40})).await;
        use base64::Engine as _;
        let typed = base64::engine::general_purpose::STANDARD.encode("stty size\n");
        send(&mut ws, json!({"type": "pty_input", "id": "pty_1", "session_id": sid, "data_base64": typed})).await;
        screen_until(&mut ws, &mut screen, "40 100").await;
        // The routes' answers.
        let listed = terminal_api::list(&guest).await.unwrap();
        assert!(listed.iter().any(|s| s.session_id == sid && s.pid as u64 == pid && s.cols == 100));
        let info = terminal_api::resize(&guest, &sid, 90, 30).await.unwrap();
        assert_eq!((info.cols, info.rows), (90, 30));
        assert_eq!(terminal_api::get(&guest, &sid).await.unwrap().rows, 30);
        let missing = terminal_api::get(&guest, "pty_0000000000000000").await.unwrap_err();
        assert!(missing.to_string().contains("pty_0000000000000000"), "{missing}");
        // The socket closes; the session goes on and is reattached by id.
        ws.close(None).await.unwrap();
        drop(ws);
        let (mut ws, _) = tokio_tungstenite::connect_async(url("/pty")).await.unwrap();
        send(&mut ws, json!({"type": "pty_connect", "id": "pty_2", "session_id": sid})).await;
        let again = recv(&mut ws).await;
        assert_eq!((again["type"].as_str(), again["pid"].as_u64()), (Some("pty_started"), Some(pid)));
        let mut replay = String::new();
        screen_until(&mut ws, &mut replay, "hi-2").await;
        send(&mut ws, json!({"type": "pty_input", "id": "pty_2", "session_id": sid, "data": "exit 5\n"})).await;
        let exited = loop {
            let f = recv(&mut ws).await;
            if f["type"] != "pty_output" {
                break f;
            }
        };
        assert_eq!(exited, json!({"type": "pty_exited", "id": "pty_2", "session_id": sid, "exit_code": 5}));
        assert!(!terminal_api::list(&guest).await.unwrap().iter().any(|s| s.session_id == sid));
        // Bad frames get error frames naming the problem.
        let (mut ws, _) = tokio_tungstenite::connect_async(url("/pty")).await.unwrap();
        send(&mut ws, json!({"type": "pty_start", "id": "x", "cols": 0, "rows": 24})).await;
        let e = recv(&mut ws).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("invalid_request")), "{e}");
        send(&mut ws, json!({"type": "pty_connect", "id": "y", "session_id": "pty_nope"})).await;
        let e = recv(&mut ws).await;
        assert!(e["message"].as_str().unwrap().contains("pty_nope"), "{e}");

        // file_watch: create, write, remove.
        let (mut ws, _) = tokio_tungstenite::connect_async(url("/watch")).await.unwrap();
        send(&mut ws, json!({"type": "file_watch", "id": "watch_1", "path": "/tmp", "user": null, "recursive": false, "timeout_secs": null})).await;
        assert_eq!(recv(&mut ws).await, json!({"type": "file_watch_started", "id": "watch_1"}));
        let agent = guest.clone();
        let _ = agent
            .run(
                nullspace_server::guest::Command {
                    shell: Some("echo x > /tmp/f1 && rm /tmp/f1".into()),
                    ..Default::default()
                },
                1024,
                None,
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let f = recv(&mut ws).await;
            assert_eq!((f["type"].as_str(), f["id"].as_str()), (Some("file_event"), Some("watch_1")), "{f}");
            assert_eq!((f["name"].as_str(), f["path"].as_str()), (Some("f1"), Some("/tmp/f1")));
            seen.push(f["event"].as_str().unwrap().to_string());
        }
        assert_eq!(seen, ["create", "write", "remove"]);
        send(&mut ws, json!({"type": "file_watch", "id": "watch_2", "path": "/tmp/none"})).await;
        let e = recv(&mut ws).await;
        assert_eq!((e["type"].as_str(), e["id"].as_str()), (Some("error"), Some("watch_2")), "{e}");
        assert!(e["message"].as_str().unwrap().contains("/tmp/none"), "{e}");
    });
    drop(vm);
}
