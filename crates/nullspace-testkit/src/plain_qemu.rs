//! Booting an exported disk under plain QEMU (TCG, a `pc` machine, no
//! nullspace) and waiting for its HTTP server through a host forward.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// QEMU ended with the test, whatever happens.
struct Qemu(Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Boots `disk` under plain QEMU with a host forward to the guest's port
/// 8080 and waits for an answer holding `needle` to GET `path`.
pub fn boot_and_get(disk: &Path, format: &str, console: &Path, path: &str, needle: &str) -> String {
    let port = free_port();
    let t = Instant::now();
    let _q = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format={format}", disk.display()))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:8080"
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(a) = get(port, path).filter(|a| a.contains(needle)) {
            eprintln!("[timing] boot to an HTTP answer: {:?}", t.elapsed());
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through the host forward; console:\n{}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
}
