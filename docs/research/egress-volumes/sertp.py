#!/usr/bin/env python3
# sertp.py DIR: host->guest and guest->host throughput of the virtio-serial port (agent.sock).
import socket, subprocess, sys, time
D = sys.argv[1]; N = 64 << 20
s = socket.socket(socket.AF_UNIX); s.connect(f"{D}/agent.sock"); time.sleep(0.3)
subprocess.run(["./gsh.py", f"{D}/serial.sock", "(time dd if=/dev/vport0p1 of=/dev/null bs=64k count=1024 iflag=fullblock) > /tmp/ser.txt 2>&1 & true"], check=True)
time.sleep(0.3); buf = b"x" * (1 << 20); t0 = time.time()
for _ in range(64): s.sendall(buf)
t1 = time.time(); time.sleep(1.5)
subprocess.run(["./gsh.py", f"{D}/serial.sock", "cat /tmp/ser.txt"])
print("host->guest: host sent 64 MiB in %.2f s" % (t1 - t0))
subprocess.run(["./gsh.py", f"{D}/serial.sock", "dd if=/dev/zero of=/dev/vport0p1 bs=64k count=1024 2>/dev/null & true"], check=True)
got = 0; t0 = None
while got < N:
    d = s.recv(1 << 20)
    if not d: break
    if t0 is None: t0 = time.time()
    got += len(d)
print("guest->host: %d bytes in %.2f s = %.0f MiB/s" % (got, time.time() - t0, got / (time.time() - t0) / 2**20))
