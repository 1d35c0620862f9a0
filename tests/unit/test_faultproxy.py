"""The fault proxy of the fault tests (tests/faultproxy.py), against a real TCP echo server.

Timing assertions are lower bounds (a held reply cannot arrive early) or generous upper
bounds far from the hold (a released reply arrives long before its deadline).
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: EchoServer = self.server  # type: ignore[assignment]
        try:
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += data
                self.request.sendall(data)
        except ConnectionResetError:  # the proxy resets connections on purpose
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Echo)
        self.lock = threading.Lock()
        self.received = b""

    def got(self) -> bytes:
        with self.lock:
            return self.received


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(f"127.0.0.1:{echo.server_address[1]}") as p:
        yield p


def connect(proxy: FaultProxy, timeout: float = 10) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def recv_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the peer closes; True if it ended with a reset."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        return out, True
    return out, False


def wait_for(cond, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_passes_bytes_through_both_ways_on_many_connections(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    socks = [connect(proxy) for _ in range(3)]
    for s in socks:
        s.sendall(payload)
    for s in socks:
        assert recv_exactly(s, len(payload)) == payload
        s.close()
    wait_for(lambda: proxy.stats()["active"] == 0)
    assert proxy.stats()["connections"] == 3


def test_url_points_at_the_proxy_and_keeps_credentials_and_path(echo: EchoServer) -> None:
    port = echo.server_address[1]
    with FaultProxy(f"redis://:s3cret@127.0.0.1:{port}/7") as p:
        assert p.url == f"redis://:s3cret@127.0.0.1:{p.port}/7"
        assert p.port != port
    with FaultProxy(f"http://127.0.0.1:{port}") as p:
        assert p.url == f"http://127.0.0.1:{p.port}"
    with pytest.raises(ValueError):
        FaultProxy("redis://localhost/0")  # no port: nothing to proxy to
    with pytest.raises(ValueError):
        FaultProxy("not-an-address")


def test_held_reply_reaches_the_server_and_arrives_after_the_hold(
        proxy: FaultProxy, echo: EchoServer) -> None:
    s = connect(proxy)
    proxy.hold_replies(1.0)
    started = time.monotonic()
    s.sendall(b"SET k v")
    assert proxy.wait_held(5), "the reply was never held"
    assert echo.got() == b"SET k v", "the request must reach the server during a reply hold"
    assert proxy.stats()["held_bytes"] == 7
    assert recv_exactly(s, 7) == b"SET k v"
    assert time.monotonic() - started >= 0.9, "a held reply arrived before the hold ended"
    assert proxy.stats()["held_bytes"] == 0
    # after the hold: immediate again (well under the hold that just ended)
    s.sendall(b"again")
    assert recv_exactly(s, 5) == b"again"
    s.close()


def test_release_delivers_held_replies_in_order_at_once(proxy: FaultProxy) -> None:
    s = connect(proxy)
    proxy.hold_replies(60)
    for word in (b"one ", b"two ", b"three"):
        s.sendall(word)
    assert proxy.wait_held(5)
    time.sleep(0.2)  # let the other words queue behind the held one
    started = time.monotonic()
    proxy.release()
    assert recv_exactly(s, 13) == b"one two three"
    assert time.monotonic() - started < 30, "release() did not end the 60 s hold"
    s.close()


def test_held_requests_do_not_reach_the_server_until_released(
        proxy: FaultProxy, echo: EchoServer) -> None:
    s = connect(proxy)
    proxy.hold_requests(60)
    s.sendall(b"ping")
    time.sleep(0.3)
    assert echo.got() == b"", "a held request reached the server"
    proxy.release()
    assert recv_exactly(s, 4) == b"ping"
    s.close()


def test_cut_delivers_part_of_one_reply_then_resets_only_that_connection(
        proxy: FaultProxy) -> None:
    s = connect(proxy)
    proxy.cut(keep=3)
    s.sendall(b"abcdefgh")
    data, _ = recv_until_closed(s)
    assert data == b"abc", f"expected the first 3 bytes of the reply, got {data!r}"
    s.close()
    assert proxy.stats()["cuts"] == 1
    # one-shot: the next connection (and reply) is whole
    t = connect(proxy)
    t.sendall(b"whole reply")
    assert recv_exactly(t, 11) == b"whole reply"
    t.close()


def test_cut_by_default_keeps_half_of_the_reply(proxy: FaultProxy) -> None:
    s = connect(proxy)
    proxy.cut()
    s.sendall(b"0123456789")
    data, _ = recv_until_closed(s)
    assert data == b"01234"
    s.close()


def test_drop_resets_open_connections_and_new_ones_work(proxy: FaultProxy) -> None:
    socks = [connect(proxy) for _ in range(2)]
    for s in socks:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
    proxy.drop()
    for s in socks:
        data, _ = recv_until_closed(s)
        assert data == b""
        s.close()
    wait_for(lambda: proxy.stats()["active"] == 0)
    s = connect(proxy)
    s.sendall(b"after")
    assert recv_exactly(s, 5) == b"after"
    s.close()


def test_refuse_resets_new_connections_until_pass_through(proxy: FaultProxy,
                                                           echo: EchoServer) -> None:
    proxy.refuse()
    data = b""
    try:
        with connect(proxy) as s:
            s.sendall(b"lost")  # may already fail: the proxy resets at once
            data, _ = recv_until_closed(s)
    except ConnectionResetError:
        pass
    assert data == b""
    assert echo.got() == b""
    proxy.pass_through()
    s = connect(proxy)
    s.sendall(b"ok")
    assert recv_exactly(s, 2) == b"ok"
    s.close()


def test_pass_through_clears_holds_and_a_pending_cut(proxy: FaultProxy) -> None:
    proxy.hold_replies(60)
    proxy.cut()
    proxy.pass_through()
    s = connect(proxy)
    s.sendall(b"clean")
    assert recv_exactly(s, 5) == b"clean"
    s.close()


def test_close_stops_listening(echo: EchoServer) -> None:
    p = FaultProxy(f"127.0.0.1:{echo.server_address[1]}").start()
    s = connect(p)
    p.close()
    data, _ = recv_until_closed(s)
    assert data == b""
    s.close()
    with pytest.raises(OSError):
        connect(p, timeout=2).close()


def test_a_hold_armed_for_one_request_holds_its_reply_and_not_the_ones_before(
        proxy: FaultProxy, echo: EchoServer) -> None:
    s = connect(proxy)
    proxy.hold_replies_after(60, b"EVAL", b"name")
    for request in (b"GET name", b"EVAL other"):  # one needle each: not the armed request
        s.sendall(request)
        assert recv_exactly(s, len(request)) == request
    assert not proxy.wait_triggered(0.1)
    s.sendall(b"EVAL name")
    assert proxy.wait_triggered(5) and proxy.wait_held(5), "the armed request's reply was not held"
    assert echo.got().endswith(b"EVAL name"), "the armed request must still reach the server"
    s.settimeout(0.3)
    with pytest.raises(TimeoutError):
        s.recv(100)
    t = connect(proxy)  # the hold covers every connection, as a hold_replies() does
    t.settimeout(0.3)
    t.sendall(b"x")
    with pytest.raises(TimeoutError):
        t.recv(1)
    proxy.release()
    s.settimeout(10)
    t.settimeout(10)
    assert recv_exactly(s, 9) == b"EVAL name"
    assert recv_exactly(t, 1) == b"x"
    s.sendall(b"EVAL name")  # one-shot: released, the trigger is gone
    assert recv_exactly(s, 9) == b"EVAL name"
    with pytest.raises(ValueError):
        proxy.hold_replies_after(1)
    s.close()
    t.close()
