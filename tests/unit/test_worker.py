"""The worker's socket wrapper: a response leaves in one send, whatever gunicorn does."""

import socket
import threading

from service.worker import _OneSendPerResponse


class RecordingSocket:
    """Records each system call's bytes; `send` takes at most `max_send` of them."""

    def __init__(self, max_send: int = 1 << 30) -> None:
        self.sent: list[bytes] = []
        self.max_send = max_send

    def send(self, data: bytes) -> int:
        self.sent.append(bytes(data[: self.max_send]))
        return len(self.sent[-1])

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def fileno(self) -> int:
        return 42


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


def test_head_and_body_leave_together():
    raw = RecordingSocket()
    sock = _OneSendPerResponse(raw)
    sock.sendall(HEAD)
    assert raw.sent == []
    sock.sendall(b"{}")
    assert raw.sent == [HEAD + b"{}"]
    sock.flush()
    assert raw.sent == [HEAD + b"{}"], "nothing left to flush"


def test_what_one_send_leaves_behind_goes_with_sendall():
    raw = RecordingSocket(max_send=10)
    sock = _OneSendPerResponse(raw)
    sock.sendall(HEAD)
    sock.sendall(b"{}")
    assert raw.sent == [HEAD[:10], HEAD[10:] + b"{}"]


def test_a_large_response_arrives_whole_over_a_real_socket():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        body = bytes(range(256)) * 8192  # 2 MiB: far more than one send takes
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        received = bytearray()
        reader = threading.Thread(target=lambda: _read(theirs, len(head) + len(body), received))
        reader.start()
        sock = _OneSendPerResponse(ours)
        sock.sendall(head)
        sock.sendall(body)
        reader.join(timeout=30)
        assert bytes(received) == head + body


def _read(sock: socket.socket, size: int, into: bytearray) -> None:
    while len(into) < size:
        chunk = sock.recv(65536)
        if not chunk:
            return
        into += chunk


def test_a_bodyless_response_is_flushed_and_100_continue_is_not_held():
    raw = RecordingSocket()
    sock = _OneSendPerResponse(raw)
    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert raw.sent == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    sock.sendall(HEAD)
    sock.flush()
    assert raw.sent[-1] == HEAD
    assert sock.fileno() == 42, "everything else is the real socket's"


def test_the_date_and_the_constant_environ_are_made_once_a_second_with_the_same_values(monkeypatch):
    import email.utils
    import time

    import gunicorn.http.wsgi
    import gunicorn.util
    from gunicorn.config import Config

    from service import worker

    monkeypatch.setattr(gunicorn.util, "http_date", gunicorn.util.http_date)
    monkeypatch.setattr(gunicorn.http.wsgi, "base_environ", gunicorn.http.wsgi.base_environ)
    cfg = Config()
    worker.cache_per_second_values(cfg)
    before = int(time.time())
    date = gunicorn.util.http_date()
    after = int(time.time())
    assert date in {email.utils.formatdate(s, usegmt=True) for s in (before, after)}
    assert gunicorn.util.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    first, second = gunicorn.http.wsgi.base_environ(cfg), gunicorn.http.wsgi.base_environ(cfg)
    assert first == second and first is not second, "each request gets its own environ to add to"
    assert first["wsgi.errors"] is second["wsgi.errors"], "one error stream wrapper within a second"
    assert first.keys() == worker._ORIGINAL_BASE_ENVIRON(cfg).keys()
    other = Config()
    assert gunicorn.http.wsgi.base_environ(other)["wsgi.errors"] is not first["wsgi.errors"]
