"""`tlkit serve` against hostile and clumsy clients, over loopback only: stalled headers and
bodies, lying and oversized Content-Length, chunked bodies, 1,000 stalled connections,
malformed JSON, a decompression bomb, bursts past the queue, clients that hang up, and
signals with a half-open client. Every test is bounded in time."""

import base64
import http.client
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import DIGITS, png_chunk, png_header_claiming
from tlkit.serve import ModelServer, ServeLimits

IMAGE = sorted((DIGITS / "3").glob("*.png"))[0]
TIMEOUT = 1.0  # the server's header, body and idle timeouts in this file
SLACK = 2.0  # what a loaded machine may add to a timeout
LIMITS = ServeLimits(header_timeout=TIMEOUT, body_timeout=TIMEOUT, idle_timeout=TIMEOUT,
                     max_request_bytes=256 * 1024, max_connections=1500)


@pytest.fixture(scope="module")
def server(digits_export):
    with ModelServer(digits_export, port=0, grpc_port=None, limits=LIMITS) as server:
        yield server


def predict_body(data=None):
    data = IMAGE.read_bytes() if data is None else data
    return json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]}).encode()


def request_bytes(body, path="/v1/models/digits:predict", headers=()):
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
            *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def connect(server):
    return socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)


def read_until_closed(sock, limit=10.0):
    """Everything the server sends until it closes, and the seconds that took."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit)
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"still open after {limit} s; got {data[:200]!r}") from None
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def status_and_error(response):
    """(status, parsed JSON body) of one raw HTTP response."""
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def predict_ok(server, timeout=10):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=timeout)
    try:
        connection.request("POST", "/v1/models/digits:predict", predict_body())
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 200, body
        return body["predictions"][0]["class_names"]
    finally:
        connection.close()


# --- slow and stalled clients -------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, timeout", [
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: a\r\n", "header_timeout"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 100000\r\n\r\n{",
     "body_timeout"),
], ids=["stalled headers", "body shorter than its Content-Length"])
def test_a_stalled_request_gets_a_408_and_is_closed_within_its_timeout(server, request_bytes,
                                                                       timeout):
    with connect(server) as sock:
        sock.sendall(request_bytes)
        response, waited = read_until_closed(sock)
    assert TIMEOUT * 0.9 < waited < TIMEOUT + SLACK
    status, body = status_and_error(response)
    assert status == 408 and timeout in body["error"]


def test_a_slow_drip_of_header_bytes_is_cut_at_the_header_timeout(server):
    """One byte every 0.2 s resets no timer: the budget is for the whole head."""
    with connect(server) as sock:
        started = time.monotonic()
        try:
            for byte in b"GET /v1/models/digits HTTP/1.1\r\nX-Slow: " + b"a" * 50:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > TIMEOUT + SLACK:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        response, _ = read_until_closed(sock)
    assert time.monotonic() - started < TIMEOUT + SLACK + 0.5
    assert response.startswith(b"HTTP/1.1 408 ")


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server):
    with connect(server) as sock:
        sock.sendall(b"GET /v1/models/digits HTTP/1.1\r\n\r\n")
        response, waited = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 200 ") and b"AVAILABLE" in response
    assert TIMEOUT * 0.9 < waited < TIMEOUT + SLACK


def test_an_oversized_content_length_is_refused_before_the_body_is_read(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: "
                     b"999999999999\r\n\r\n")
        response, waited = read_until_closed(sock)
    assert waited < SLACK
    status, body = status_and_error(response)
    assert status == 413 and "over the limit of 262,144 (max_request_bytes)" in body["error"]


def test_a_content_length_shorter_than_the_body_fails_that_request_and_the_leftover(server):
    body = predict_body()
    with connect(server) as sock:
        sock.sendall(request_bytes(body).replace(f"Content-Length: {len(body)}".encode(),
                                                 b"Content-Length: 20"))
        response, _ = read_until_closed(sock)
    first, _, rest = response.partition(b"HTTP/1.1 400 ")[2].partition(b"HTTP/1.1 ")
    assert b"not valid JSON" in first
    assert rest.startswith(b"400 ") and b"Malformed request line" in rest
    assert predict_ok(server)


@pytest.mark.parametrize("head, status, message", [
    (b"GARBAGE\r\n\r\n", 400, "Malformed request line"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "Malformed header line"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400,
     "Content-Length must be a number"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
     b"\r\n", 400, "Conflicting content-length"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: "
     b"chunked\r\n\r\n", 400, "both Content-Length and Transfer-Encoding"),
    (b"POST /v1/models/digits:predict HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "only chunked"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "max_header_bytes"),
])
def test_malformed_heads_are_refused_and_closed(server, head, status, message):
    with connect(server) as sock:
        sock.sendall(head)
        response, waited = read_until_closed(sock)
    got, body = status_and_error(response)
    assert (got, waited < SLACK) == (status, True) and message in body["error"], body


# --- chunked bodies, keep-alive, pipelining -----------------------------------------------

def chunked(body, size=1000):
    parts = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_chunked_bodies_are_read_and_a_bad_or_oversized_one_refused(server):
    body = predict_body()
    head = (b"POST /v1/models/digits:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n")
    with connect(server) as sock:
        data = head + chunked(body, 333)
        for i in range(0, len(data), 700):  # in pieces, as a slow network delivers them
            sock.sendall(data[i:i + 700])
        response, _ = read_until_closed(sock)
    status, answer = status_and_error(response)
    assert status == 200 and answer["predictions"][0]["class_names"] == "3"
    for bad, status, message in [(b"zz\r\n", 400, "Bad chunk size"),
                                 (b"5\r\nhello!!\r\n", 400, "does not end in CRLF"),
                                 (b"1000000\r\n", 413, "max_request_bytes")]:
        with connect(server) as sock:
            sock.sendall(head + bad)
            response, _ = read_until_closed(sock)
        got, answer = status_and_error(response)
        assert got == status and message in answer["error"]


def test_keep_alive_and_pipelined_requests_are_answered_in_order(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    for _ in range(3):
        connection.request("POST", "/v1/models/digits:predict", predict_body())
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Connection") == "keep-alive"
        response.read()
    connection.close()
    with connect(server) as sock:
        sock.sendall(request_bytes(predict_body()) + b"GET /v1/models/cats HTTP/1.1\r\n\r\n"
                     + request_bytes(predict_body(), headers=["Connection: close"]))
        response, _ = read_until_closed(sock)
    statuses = [int(part.split(b" ", 1)[0]) for part in response.split(b"HTTP/1.1 ")[1:]]
    assert statuses == [200, 404, 200]


def test_a_client_that_pipelines_without_reading_cannot_grow_the_send_buffer(server):
    """3,000 pipelined requests and no reading: the server stops reading requests while
    64 KiB of answers wait unsent, and answers all of them once the client reads."""
    count = 3000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.rest_port))
    with sock:
        sock.sendall(b"GET /v1/models/digits HTTP/1.1\r\n\r\n" * count)
        time.sleep(0.5)
        buffered = max(c.transport.get_write_buffer_size() for c in server._http.connections)
        assert buffered < 96 * 1024
        data, deadline = b"", time.monotonic() + 20
        while data.count(b"HTTP/1.1 200 ") < count and time.monotonic() < deadline:
            data += sock.recv(1 << 16)
    assert data.count(b"HTTP/1.1 200 ") == count


def test_expect_100_continue_is_honoured(server):
    body = predict_body()
    with connect(server) as sock:
        sock.sendall(request_bytes(b"", headers=["Expect: 100-continue"]).replace(
            b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
        sock.settimeout(5)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")


# --- bad payloads ---------------------------------------------------------------------------

def bomb_png(side):
    """A real 1-bit PNG of `side` x `side` black pixels: a few KB that would decode to
    `side**2` pixels."""
    import struct

    row = b"\0" + b"\0" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(side // 1000))
    data += packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data)
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("raw, message", [
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'["a list"]', "must be a JSON object"),
    (b'{"instances": [{"b64": "!!!"}]}', "invalid base64"),
    (b'{"instances": [{"b64": "' + base64.b64encode(b"GIF89a broken").rstrip(b"=") + b'"}]}',
     "invalid base64"),
    (b'{"instances": [{"b64": 5}]}', "invalid base64"),
    (b'{"instances": "not a list"}', '"instances" must be a list'),
])
def test_malformed_json_and_base64_get_400s(server, raw, message):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    connection.request("POST", "/v1/models/digits:predict", raw)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 400 and message in body["error"], body


def test_a_decompression_bomb_fails_only_its_own_request(digits_export):
    """A real 10,000 x 10,000 PNG (12 KB) and a PNG that lies about its size, sent at once
    with good images: they share a batch, the bombs get 400s, the others their answers."""
    bomb = bomb_png(10000)
    assert len(bomb) < 50_000
    bodies = [predict_body(), predict_body(bomb), predict_body(),
              predict_body(png_header_claiming(30000, 30000)), predict_body()]
    limits = ServeLimits(max_request_bytes=256 * 1024)
    with ModelServer(digits_export, port=0, grpc_port=None, batch_timeout_ms=300,
                     limits=limits) as server:
        def send(body):
            connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
            connection.request("POST", "/v1/models/digits:predict", body)
            response = connection.getresponse()
            return response.status, json.loads(response.read())

        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(send, bodies))
        stats = server.stats
    assert [status for status, _ in answers] == [200, 400, 200, 400, 200], answers
    assert "10000 x 10000 pixels is over the limit" in answers[1][1]["error"]
    assert "30000 x 30000 pixels is over the limit" in answers[3][1]["error"]
    for _, answer in answers[::2]:
        assert answer["predictions"][0]["class_names"] == "3"
    assert stats.images == 3 and stats.batches <= 5  # halving, not one pass per request


# --- many clients ---------------------------------------------------------------------------

def rss_bytes():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_1000_stalled_connections_cost_no_thread_and_are_closed_in_time(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # both ends of every connection live in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    threads, memory = threading.active_count(), rss_bytes()
    sockets = []
    try:
        started = time.monotonic()
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)
            if i % 3 == 1:
                sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\n")
            elif i % 3 == 2:
                sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\n"
                             b"Content-Length: 50000\r\n\r\n{")
            sockets.append(sock)
        opened = time.monotonic() - started
        answered = time.monotonic()
        assert predict_ok(server) == "3"
        assert time.monotonic() - answered < 1.0, "a normal request waited during the attack"
        assert len(server._http.connections) > 500 or opened > TIMEOUT
        assert threading.active_count() <= threads + 2
        assert rss_bytes() - memory < 100 * 2**20
        selector = selectors.DefaultSelector()
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_ = set(sockets)
        deadline = started + opened + TIMEOUT + SLACK + 1
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, ConnectionResetError):
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    open_.discard(key.fileobj)
        assert not open_, f"{len(open_)} of 1000 stalled connections still open"
        selector.close()
        assert len(server._http.connections) == 0
    finally:
        for sock in sockets:
            sock.close()
    assert predict_ok(server) == "3"


def test_connections_past_max_connections_get_a_503(digits_export):
    limits = ServeLimits(max_connections=4, idle_timeout=5)
    with ModelServer(digits_export, port=0, grpc_port=None, limits=limits) as server:
        held = [connect(server) for _ in range(4)]
        time.sleep(0.2)
        with connect(server) as extra:
            response, _ = read_until_closed(extra)
        for sock in held:
            sock.close()
        time.sleep(0.2)
        assert predict_ok(server) == "3"
    status, body = status_and_error(response)
    assert status == 503 and "4 connections open" in body["error"]


def test_a_burst_past_the_queue_gets_503s_and_the_rest_right_answers(digits_export):
    limits = ServeLimits(max_queued_requests=4)
    with ModelServer(digits_export, port=0, grpc_port=None, batch_timeout_ms=50,
                     max_batch_size=4, limits=limits) as server:
        def send(_):
            connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
            connection.request("POST", "/v1/models/digits:predict", predict_body())
            response = connection.getresponse()
            answer = response.status, json.loads(response.read())
            connection.close()
            return answer

        started = time.monotonic()
        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(send, range(192)))
        elapsed = time.monotonic() - started
        stats = server.stats
        assert predict_ok(server) == "3"
    statuses = [status for status, _ in answers]
    assert set(statuses) == {200, 503} and elapsed < 60
    for status, body in answers:
        if status == 200:
            assert body["predictions"][0]["class_names"] == "3"
        else:
            assert body == {"error": "Resource exhausted: 4 requests are already waiting for "
                                     "the model; try again later."}
    assert stats.refused == statuses.count(503)


def test_a_client_that_hangs_up_early_leaves_no_traceback(digits_export, caplog):
    with ModelServer(digits_export, port=0, grpc_port=None, batch_timeout_ms=200) as server:
        with caplog.at_level("INFO", logger="tlkit.serve"):
            for _ in range(5):
                sock = connect(server)
                sock.sendall(request_bytes(predict_body()))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                sock.close()  # a reset, before the answer
            time.sleep(0.5)
            assert predict_ok(server) == "3"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")
                or r.exc_info], caplog.text


# --- the command, stopped by signals --------------------------------------------------------

PLAIN_INSTALL = ("import sys; sys.modules['tensorflow_serving'] = None; "
                 "from tlkit.cli import main; sys.exit(main())")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_command_stops_within_10_s_of_a_signal_with_a_half_open_client(
        digits_export, signum):
    """SIGINT (Ctrl-C) serves with gRPC; SIGTERM as after a plain install (no tensorflow-serving-api):
    one line says gRPC is off, REST serves. A client holding half a request line and one
    holding half a body are open when the signal comes."""
    plain = signum == signal.SIGTERM
    command = ["-c", PLAIN_INSTALL] if plain else ["-m", "tlkit.cli"]
    process = subprocess.Popen(
        [sys.executable, *command, "serve", "--model", str(digits_export.parent), "--port",
         "0", "--grpc-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        lines = read_startup(process)
        url = next(line.split()[1] for line in lines if line.strip().startswith("REST:"))
        port = int(url.split(":")[2].split("/")[0])
        assert any(line.strip().startswith("gRPC:") for line in lines) != plain
        half_line = socket.create_connection(("127.0.0.1", port), timeout=10)
        half_line.sendall(b"POST /v1/models/digits:pre")
        half_body = socket.create_connection(("127.0.0.1", port), timeout=10)
        half_body.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nContent-Length: 9999"
                          b"\r\n\r\n{")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/models/digits:predict", predict_body())
        assert connection.getresponse().status == 200
        signalled = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=10)
        stopped = time.monotonic() - signalled
    finally:
        process.kill()
        process.wait()
    half_line.close()
    half_body.close()
    assert process.returncode == 0, err
    assert stopped < 10
    assert "Stopped after 1 requests (1 images in 1 forward passes)." in out
    assert "Traceback" not in err, err
    logged = [line for line in err.splitlines() if " rest POST /v1/models/digits:predict 200 "
              "1 image(s) " in line]
    assert len(logged) == 1, err
    warnings = [line for line in err.splitlines() if "gRPC is not served" in line]
    assert len(warnings) == (1 if plain else 0), err


def read_startup(process, limit=120):
    """The command's stdout up to its "Ctrl-C stops." line, read in a thread so a loaded
    machine's slow start cannot hang the test past `limit` seconds."""
    lines, done = [], threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(limit) or not lines or not lines[-1].startswith("Ctrl-C"):
        process.kill()
        raise AssertionError(f"tlkit serve did not start: {lines} {process.stderr.read()}")
    return lines
