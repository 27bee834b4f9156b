#!/usr/bin/env python3
# gsh.py SOCK 'command' [timeout]: run a command in the guest's serial shell, print its output.
import socket, sys, time, uuid, re
sock, cmd = sys.argv[1], sys.argv[2]
to = float(sys.argv[3]) if len(sys.argv) > 3 else 30
s = socket.socket(socket.AF_UNIX); s.connect(sock); s.settimeout(0.2)
m = uuid.uuid4().hex[:8]
s.sendall(f"echo BEGIN-{m}-X; {cmd}; echo END-{m}-$?\n".encode())
buf = b""; t0 = time.time()
while time.time() - t0 < to:
    try:
        d = s.recv(65536)
        if not d: break
        buf += d
    except socket.timeout:
        pass
    txt = buf.decode(errors="replace")
    e = re.search(f"END-{m}-(\\d+)", txt); b = txt.rfind(f"BEGIN-{m}-X\r\n") if e else -1
    if e and b >= 0:
        sys.stdout.write(txt[b+len(f"BEGIN-{m}-X\r\n"):e.start()].replace("\r", ""))
        print("[rc=%s %.2fs]" % (e.group(1), time.time()-t0)); sys.exit(0)
print(buf.decode(errors="replace")); print("[TIMEOUT]"); sys.exit(1)
