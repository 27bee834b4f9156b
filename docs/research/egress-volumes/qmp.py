#!/usr/bin/env python3
# qmp.py SOCK '{"execute":...}' ...: run QMP commands, print replies.
import socket, sys, json, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
f.readline(); f.write('{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
for c in sys.argv[2:]:
    t0 = time.time(); f.write(c + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "event" in r: continue
        print(json.dumps(r)[:2000], "(%.1f ms)" % ((time.time()-t0)*1000)); break
