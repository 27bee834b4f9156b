# Ports and preview URLs through the published SDK 1.0.3, unpatched, each
# checked by its effect on a real HTTP client (curl resolves names under
# `localhost` to loopback itself) or a WebSocket client: the start
# command's page through get_url; an app started later, waited for with
# wait_for_preview; signed URLs, a proxy target's header token, SSE and a
# WebSocket echo; a private machine's traffic token; a revoked grant, an
# expired URL and a token for another machine refused; a closed port and
# a port that never answers answered clearly; another namespace sees
# nothing.
import json
import os
import subprocess
import time

from nullspace import Machine
from nullspace.errors import NotFoundError

def curl(url, *args):
    """(status, body) of a GET through the proxy."""
    r = subprocess.run(
        ["curl", "-sS", "-m", "60", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=90,
    )
    assert r.returncode == 0, (url, r.returncode, r.stderr)
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


def ok(url, *args):
    code, body = curl(url, *args)
    assert code == 200, (url, code, body)
    return body


def refused(url, code, words, *args):
    got, body = curl(url, *args)
    assert got == code, (url, got, body)
    err = json.loads(body)
    assert words in err["error"], (words, err)
    return err


m = Machine.create(template=os.environ["NS_TEMPLATE"])
private = None
try:
    # The start command (busybox httpd on 8080) through get_url.
    index = m.files.read("/srv/index.html")
    host = m.get_host(8080)
    assert host.startswith("8080-") and ".localhost:" in host, host
    url = m.get_url(8080)
    assert ok(url) == index
    # The same page by path, under the API's own address.
    base = os.environ["NULLSPACE_API_URL"].rstrip("/")
    assert ok(f"{base}/preview/{m.id}/8080/") == index

    # An app started later.
    m.commands.run("/bin/ns-guest-fixture 8000 8001", background=True)
    ready = m.wait_for_preview(8000, timeout_secs=60, interval_ms=200)
    assert ready.ready and ready.service_ready and ready.port == 8000, ready
    ready = m.wait_for_preview(8000, kind="http", path="/api/greeting", timeout_secs=30)
    assert ready.ready, ready
    closed = m.wait_for_preview(8002, timeout_secs=2, interval_ms=500)
    assert not closed.ready and closed.error and closed.attempts >= 2, closed

    short = m.create_signed_preview_url(8000, expires_in_seconds=60)
    short_at = time.monotonic()
    signed = m.create_signed_preview_url(8000, expires_in_seconds=600)
    assert signed.grant.port == 8000 and signed.grant.status == "active", signed
    assert "edge_token=" in signed.url and signed.url.startswith("http://8000-"), signed.url
    page = ok(signed.url)
    assert '<h1 id="greeting">' in page, page
    api = signed.url.replace("/?", "/api/greeting?", 1)
    assert ok(api) == "hello from the machine"
    # A sized download arrives whole.
    big = signed.url.replace("/?", "/bytes?n=3000000&", 1)
    r = subprocess.run(["curl", "-sS", "-m", "120", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", big],
                       capture_output=True, text=True, timeout=150)
    assert r.stdout == "200 3000000", (r.stdout, r.stderr)
    # Server-sent events stream (chunked) through the proxy.
    sse = ok(signed.url.replace("/?", "/sse?", 1), "-N")
    assert [l for l in sse.splitlines() if l] == ["data: tick 1", "data: tick 2", "data: tick 3"], sse

    # A WebSocket echo through get_websocket_url.
    from websockets.sync.client import connect
    ws_url = m.get_websocket_url(8000).replace("/?", "/ws?", 1)
    # Python's resolver does not know names under localhost (curl and
    # browsers do): the socket goes to loopback, the URL stays as given.
    import socket
    import urllib.parse
    sock = socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(ws_url).port), timeout=60)
    with connect(ws_url, sock=sock, open_timeout=60) as ws:
        for msg in ["hello", "x" * 100_000]:
            ws.send(msg)
            assert ws.recv(timeout=60) == msg
        ws.send(b"\x00\x01binary")
        assert ws.recv(timeout=60) == b"\x00\x01binary"

    # The grant counts what went through it.
    used = {g.id: g for g in m.list_preview_urls(port=8000)}[signed.grant.id]
    assert used.http_request_count >= 4 and used.bytes_out_count >= 3_000_000, used
    assert used.first_used_at and used.last_used_at, used

    # A proxy in front of the port: the header token, no token in the URL.
    target = m.create_preview_proxy_target(8000, expires_in_seconds=300)
    assert target.token_header_name == "x-nullspace-preview-proxy-token", target
    assert "edge_token" not in target.http_url, target
    assert ok(target.http_url, "-H", f"{target.token_header_name}: {target.http_token}").startswith("<!doctype")

    # Hostile: more connections at once than a machine takes. Each /sse
    # holds its tunnel ~600 ms; the surplus is refused with 503, and the
    # slots come back.
    import concurrent.futures
    sse_url = signed.url.replace("/?", "/sse?", 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=120) as pool:
        codes = list(pool.map(lambda _: curl(sse_url, "-N"), range(120)))
    got = sorted({c for c, _ in codes})
    assert set(got) <= {200, 503} and 200 in got, got
    busy = [b for c, b in codes if c == 503]
    assert all("connections into this machine are open" in json.loads(b)["error"] for b in busy), busy[:1]
    print("concurrent: %d answered, %d refused busy" % (len(codes) - len(busy), len(busy)))
    assert ok(api) == "hello from the machine"

    # Hostile: a guest that floods a stream to a client that stops reading.
    # Flow control holds the guest to what the client took (plus bounded
    # buffers): the grant's byte count and the server's memory stay small.
    import socket as sk
    import urllib.parse as up
    server_pid = int(os.environ["NS_SERVER_PID"])

    def rss_kib():
        with open(f"/proc/{server_pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

    flood = m.create_signed_preview_url(8000, expires_in_seconds=300)
    fu = up.urlsplit(flood.url)
    s = sk.create_connection(("127.0.0.1", fu.port), timeout=60)
    s.setsockopt(sk.SOL_SOCKET, sk.SO_RCVBUF, 65536)
    s.sendall(f"GET /bytes?n=4000000000&{fu.query} HTTP/1.1\r\nHost: {fu.netloc}\r\n\r\n".encode())
    taken = 0
    while taken < 1 << 20:
        taken += len(s.recv(65536))
    before = rss_kib()
    time.sleep(5)
    sent = {g.id: g for g in m.list_preview_urls(port=8000)}[flood.grant.id].bytes_out_count
    grew = rss_kib() - before
    s.close()
    print("flood: client took %d KiB, guest sent %d KiB, server RSS +%d KiB" % (taken >> 10, sent >> 10, grew))
    assert sent < 64 << 20, sent
    assert grew < 64 << 10, grew

    # A closed port and a port that never answers.
    refused(m.get_url(8002), 502, "does not accept connections")
    t = time.monotonic()
    refused(m.get_url(8001), 504, "did not answer within")
    assert time.monotonic() - t < 30
    # Reserved ports.
    try:
        m.get_host(22)
        raise AssertionError("port 22 was accepted")
    except Exception as e:
        assert "reserved for SSH" in str(e), e

    # A private machine: its token, or a grant.
    private = Machine.create(template=os.environ["NS_TEMPLATE"], network={"allow_public_traffic": False})
    token = private.traffic_access_token
    assert token and len(token) == 64, private
    bare = "http://" + private.get_host(8080) + "/"
    refused(bare, 401, "is private")
    assert ok(bare, "-H", f"x-nullspace-traffic-access-token: {token}") == index
    refused(bare, 403, "does not match", "-H", "x-nullspace-traffic-access-token: " + "0" * 64)
    g = private.create_signed_preview_url(8080, expires_in_seconds=300)
    assert ok(g.url) == index
    # The cookie the signed URL set lets the page's next request in.
    jar = "/tmp/ns-preview-jar-%d" % os.getpid()
    ok(g.url, "-c", jar)
    assert ok(bare, "-b", jar) == index
    os.remove(jar)
    # A real browser (headless Chromium) renders a page of the private
    # machine from a signed URL: the page's own fetch passes with the
    # cookie the first answer set, and fills in the heading.
    import tempfile
    private.commands.run("/bin/ns-guest-fixture 8000", background=True)
    assert private.wait_for_preview(8000, timeout_secs=60).ready
    app = private.create_signed_preview_url(8000, expires_in_seconds=300)
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--virtual-time-budget=20000"]
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(chromium + ["--user-data-dir=" + profile, "--dump-dom", app.url],
                           capture_output=True, text=True, timeout=180)
    assert '<h1 id="greeting">hello from the machine</h1>' in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])
    shot = os.environ["NS_SCREENSHOT"]
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run(chromium + ["--user-data-dir=" + profile, "--window-size=800,600",
                                       "--screenshot=" + shot, app.url],
                           capture_output=True, text=True, timeout=180)
    assert os.path.getsize(shot) > 1000, r.stderr[-2000:]
    print("browser: rendered the private machine's page; screenshot", shot)

    # Revoked: refused at once, and listed as revoked.
    rv = private.revoke_preview_url(g.grant.id)
    assert rv.success and rv.grant.status == "revoked", rv
    refused(g.url, 403, "was revoked")
    grants = {x.id: x for x in private.list_preview_urls(port=8080)}
    assert grants[g.grant.id].status == "revoked", grants
    assert all(x.port == 8000 for x in m.list_preview_urls(port=8000))
    # A token for another machine's port.
    other = signed.url.split("edge_token=")[1]
    refused(bare + "?edge_token=" + other, 403, "is for port 8000 of machine " + m.id)
    # A tampered token.
    refused(bare + "?edge_token=" + other[:-4] + "AAAA", 403, "signature does not match")

    # Another namespace sees neither machine nor its grants.
    try:
        Machine.connect(m.id, api_key=os.environ["NS_KEY_B"])
        raise AssertionError("another namespace saw the machine")
    except NotFoundError:
        pass

    # A paused machine with auto_resume wakes for its visitor.
    sleeper = Machine.create(template=os.environ["NS_TEMPLATE"], auto_resume=True)
    try:
        url = sleeper.get_url(8080)
        sleeper.pause()
        assert "hello" in ok(url), "the page after an auto-resume"
        assert Machine.get_info_by_id(sleeper.id).status.value == "running"
    finally:
        sleeper.kill()

    # The 60 s URL has expired by now (the scenario waits out the rest).
    left = 61 - (time.monotonic() - short_at)
    if left > 0:
        time.sleep(left)
    refused(short.url, 403, "expired")
    print("PORTS OK")
finally:
    m.kill()
    if private is not None:
        private.kill()
