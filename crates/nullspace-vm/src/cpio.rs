//! A minimal newc ("070701") cpio writer, enough for an initramfs.

use std::io::{self, Write};

pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.out.write_all(&[0; 4][..pad4(110 + name.len() + 1)])?;
        self.out.write_all(data)?;
        self.out.write_all(&[0; 4][..pad4(data.len())])?;
        Ok(())
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, 0o040000 | perm, &[], (0, 0))
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100000 | perm, data, (0, 0))
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020000 | perm, &[], (major, minor))
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpio_lists() {
        let mut w = super::CpioWriter::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.cpio");
        std::fs::write(&p, &bytes).unwrap();
        if let Ok(out) = std::process::Command::new("cpio")
            .args(["-it", "-F"])
            .arg(&p)
            .output()
            && out.status.success()
        {
            let list = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                list.lines().collect::<Vec<_>>(),
                ["dev", "dev/console", "init"]
            );
        }
    }
}
