"""The benchmark's counting S3 proxy (bench.s3proxy): what it counts, and that it relays
every HTTP/1.1 framing an S3 client or server uses byte for byte. The upstream here is a
real HTTP server on loopback (http.server); tests/integration/test_bench_s3proxy.py runs
the same proxy in front of SeaweedFS with botocore."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench import s3proxy
from bench.s3proxy import ProtocolError, classify, diff_counters, parse_head


@pytest.mark.parametrize(
    ("method", "target", "op"),
    [
        ("GET", "/bucket/blocks/ab/cd/key_1", "GET"),
        ("GET", "/bucket/key?partNumber=1", "GET"),
        ("PUT", "/bucket/key", "PUT"),
        ("PUT", "/bucket/key?partNumber=2&uploadId=x", "PUT"),
        ("HEAD", "/bucket/key", "HEAD"),
        ("DELETE", "/bucket/key", "DELETE"),
        ("POST", "/bucket?delete", "DELETE"),
        ("POST", "/bucket/key?uploads", "POST"),
        ("GET", "/bucket?list-type=2&prefix=a/", "LIST"),
        ("GET", "/bucket/", "LIST"),
        ("GET", "/bucket?location", "OTHER"),
        ("PUT", "/bucket", "OTHER"),
        ("HEAD", "/bucket", "OTHER"),
        ("GET", "/", "OTHER"),
        ("GET", "http://127.0.0.1:9000/bucket/key", "GET"),
    ],
)
def test_requests_are_classified_by_s3_operation(method, target, op):
    assert classify(method, target) == op


def test_heads_parse_with_lower_case_names_and_joined_repeats():
    h = parse_head(b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert h.is_request and h.start[:2] == ["PUT", "/b/k"]
    assert h.content_length == 12 and h.header("x-a") == "1, 2" and not h.chunked
    r = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    assert not r.is_request and r.status == 200 and r.chunked and r.wants_close
    assert parse_head(b"HTTP/1.0 200 OK\r\n\r\n").wants_close


@pytest.mark.parametrize(
    "raw",
    [b"GARBAGE\r\n\r\n", b"GET /x\r\n\r\n", b"HTTP/1.1 OK fine\r\n\r\n",
     b"GET / HTTP/1.1\r\nno colon\r\n\r\n"],  # fmt: skip
)
def test_malformed_heads_are_protocol_errors(raw):
    with pytest.raises(ProtocolError):
        parse_head(raw)


def test_a_negative_or_garbled_content_length_is_a_protocol_error():
    for value in (b"-1", b"ten"):
        with pytest.raises(ProtocolError):
            _ = parse_head(b"PUT / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n").content_length


def test_counter_differences_are_per_listener_and_skip_idle_classes():
    before = {"a": {"GET": {"requests": 2, "bytes_sent": 0, "bytes_received": 10, "errors": 0}}}
    after = {
        "a": {"GET": {"requests": 5, "bytes_sent": 0, "bytes_received": 40, "errors": 1},
              "PUT": {"requests": 1, "bytes_sent": 7, "bytes_received": 0, "errors": 0}},
        "b": {"GET": {"requests": 9, "bytes_sent": 0, "bytes_received": 9, "errors": 0}},
    }  # fmt: skip
    d = diff_counters(before, after, "a")
    assert d["total"] == {"requests": 4, "bytes_sent": 7, "bytes_received": 30, "errors": 1}
    assert list(d["by_op"]) == ["GET", "PUT"]
    assert diff_counters(after, after, "a") == {"total": {"requests": 0, "bytes_sent": 0, "bytes_received": 0,
                                                          "errors": 0}, "by_op": {}}  # fmt: skip


# --------------------------------------------------------------------------- relaying

BIG = bytes(range(256)) * 8192  # 2 MiB: more than one splice


class Upstream(BaseHTTPRequestHandler):
    """Answers like an object store: bodies by Content-Length or chunked, HEAD, 404."""

    protocol_version = "HTTP/1.1"
    store: dict[str, bytes] = {}

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reply(self, status: int, body: bytes = b"", chunked: bool = False) -> None:
        self.send_response(status)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 300_000):
                part = body[i : i + 300_000]
                self.wfile.write(f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\nX-Trailer: t\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        self.store[self.path] = self._body()
        self._reply(200)

    def do_GET(self):  # noqa: N802
        if self.path not in self.store:
            self._reply(404, b"<Error>NoSuchKey</Error>")
            return
        self._reply(200, self.store[self.path], chunked="chunked" in self.path)

    def do_HEAD(self):  # noqa: N802
        self._reply(200 if self.path in self.store else 404, self.store.get(self.path, b""))


@pytest.fixture
def proxy() -> Iterator[s3proxy.Proxy]:
    Upstream.store = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    p = s3proxy.Proxy(("127.0.0.1", server.server_address[1]), ["a", "b"])
    p.start()
    yield p
    p.stop()
    server.shutdown()
    server.server_close()


def _conn(p: s3proxy.Proxy, listener: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", p.ports[listener], timeout=10)


def test_bodies_pass_unchanged_over_one_kept_alive_connection_and_are_counted(proxy):
    c = _conn(proxy, "a")
    c.request("PUT", "/bkt/big", body=BIG)
    assert c.getresponse().read() == b""
    c.request("PUT", "/bkt/chunked", body=iter([BIG[:1000], BIG[1000:]]), encode_chunked=True)
    r = c.getresponse()
    assert r.status == 200 and r.read() == b""
    c.request("PUT", "/bkt/expect", body=b"x" * 5000, headers={"Expect": "100-continue"})
    assert c.getresponse().read() == b""
    c.request("GET", "/bkt/big")
    assert c.getresponse().read() == BIG
    c.request("GET", "/bkt/chunked")
    assert c.getresponse().read() == BIG  # relayed chunked, with extensions and a trailer
    c.request("HEAD", "/bkt/big")
    r = c.getresponse()
    assert r.status == 200 and r.getheader("Content-Length") == str(len(BIG)) and r.read() == b""
    c.request("GET", "/bkt/missing")
    r = c.getresponse()
    assert r.status == 404 and b"NoSuchKey" in r.read()
    c.close()
    assert Upstream.store["/bkt/chunked"] == BIG and Upstream.store["/bkt/expect"] == b"x" * 5000

    counts = _settled(proxy)
    assert counts["a"]["PUT"] == {"requests": 3, "bytes_sent": 2 * len(BIG) + 5000, "bytes_received": 0,
                                  "errors": 0}  # fmt: skip
    assert counts["a"]["GET"] == {"requests": 3, "bytes_sent": 0,
                                  "bytes_received": 2 * len(BIG) + len(b"<Error>NoSuchKey</Error>"),
                                  "errors": 1}  # fmt: skip
    assert counts["a"]["HEAD"]["requests"] == 1 and counts["a"]["HEAD"]["bytes_received"] == 0
    assert counts["b"] == {}  # the other listener's client made no request


def _settled(proxy, quiet: float = 0.2, limit: float = 5.0):
    """The counters once they stop changing: an exchange is counted right after its last
    byte reached the client, so a client can be done a moment before it is counted."""
    last, since, deadline = proxy.counters.snapshot(), time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = proxy.counters.snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def test_each_listener_counts_only_its_own_clients(proxy):
    for listener, n in (("a", 2), ("b", 3)):
        c = _conn(proxy, listener)
        for i in range(n):
            c.request("PUT", f"/bkt/{listener}{i}", body=b"12345")
            c.getresponse().read()
        c.close()
    counts = _settled(proxy)
    assert counts["a"]["PUT"]["requests"] == 2 and counts["b"]["PUT"]["requests"] == 3
    assert counts["b"]["PUT"]["bytes_sent"] == 15


def test_the_control_port_serves_the_counters_as_json(proxy):
    c = _conn(proxy, "a")
    c.request("PUT", "/bkt/k", body=b"abc")
    c.getresponse().read()
    c.close()
    _settled(proxy)
    got = s3proxy.fetch_counters(proxy.control.server_address[1])
    assert got["a"]["PUT"]["bytes_sent"] == 3 and got["b"] == {}
