"""The worker's socket wrapper: a response leaves in one send, whatever gunicorn does."""

from service.worker import _OneSendPerResponse


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

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


def test_a_bodyless_response_is_flushed_and_100_continue_is_not_held():
    raw = RecordingSocket()
    sock = _OneSendPerResponse(raw)
    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert raw.sent == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    sock.sendall(HEAD)
    sock.flush()
    assert raw.sent[-1] == HEAD
    assert sock.fileno() == 42, "everything else is the real socket's"
