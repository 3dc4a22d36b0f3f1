"""A small HTTP/1.1 server on asyncio, built to stay up in front of hostile clients.

One event-loop thread serves every connection, so a stalled client costs a socket and a few
kilobytes, never a thread. Each connection is in one of four states, each with its own limit:

- idle (keep-alive, before a request's first byte): closed after `idle_timeout`;
- reading the request line and headers: `header_timeout` from the first byte, at most
  `max_header_bytes`, else 408 or 431 and closed;
- reading the body (`Content-Length` or chunked): `body_timeout` from the end of the headers,
  at most `max_request_bytes`, else 408 or 413 and closed;
- busy: the request is being answered; reading is paused until the answer is written, so
  pipelined requests wait their turn, and stays paused while answers pile up unread in
  the send buffer (a client that asks without reading cannot grow it without bound).

At most `max_connections` are open (more get a 503 and are closed), and the bodies held in
memory at once are bounded too. A client that hangs up early is dropped quietly. Errors
are answered in TF Serving's shape, `{"error": "..."}`.
"""

import asyncio
import json
import logging
import re
import threading
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger("tlkit.serve")

_IDLE, _HEAD, _BODY, _BUSY = "idle", "head", "body", "busy"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_MAX_CHUNK_LINE = 1024
_DIGITS = re.compile(r"[0-9]{1,15}")
_HEX = re.compile(rb"[0-9a-fA-F]{1,15}")
_ABORT_AFTER_CLOSE = 1.0  # seconds a closed connection may take to flush before it is cut


@dataclass(frozen=True)
class HttpRequest:
    """One parsed request; `headers` has lower-case names."""

    method: str
    target: str
    headers: dict
    body: bytes
    peer: str


class HttpError(Exception):
    """A request the HTTP layer refuses before the application sees it."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def response_bytes(status, body, content_type="application/json", keep_alive=True,
                   extra_headers=()):
    """An HTTP/1.1 response: status line, headers and body, as one buffer."""
    lines = [f"HTTP/1.1 {int(status)} {_REASONS.get(int(status), 'Unknown')}",
             f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             "Connection: " + ("keep-alive" if keep_alive else "close"), *extra_headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error_bytes(status, message, keep_alive=False):
    """TF Serving's `{"error": message}` body in a response."""
    return response_bytes(status, json.dumps({"error": message}).encode(),
                          keep_alive=keep_alive)


class HttpServer:
    """Runs `handler` for every request on an event loop in a thread of its own.

    Args:
        handler: `async handler(request) -> (status, body bytes, content type)`; an
            exception it raises is logged and answered with a 500.
        host, port: where to listen (port 0: any free port).
        limits: the `ServeLimits` to apply.
    """

    def __init__(self, handler, host, port, limits):
        self.handler = handler
        self.limits = limits
        self.connections = set()
        self.buffered_bytes = 0  # bodies held in memory, reserved when their length is known
        self.max_buffered_bytes = 8 * limits.max_request_bytes
        self._address = (host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tlkit-rest",
                                        daemon=True)
        self._server = None
        self.port = None

    def start(self):
        """Binds the port and starts serving; raises OSError if the port cannot be bound."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]

    async def _listen(self):
        return await self._loop.create_server(lambda: _Connection(self), *self._address,
                                              backlog=1024, reuse_address=True)

    def stop(self):
        """Stops listening, lets requests in flight finish for `limits.shutdown_grace`
        seconds, then closes every connection and the loop."""
        if self._server is not None:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(self.limits.shutdown_grace + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self):
        self._server.close()
        for connection in list(self.connections):
            connection.stop_after_answer()
        deadline = self._loop.time() + self.limits.shutdown_grace
        while any(c.state == _BUSY for c in self.connections) and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.abort()


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, applies the limits, writes the answers."""

    def __init__(self, server):
        self.server = server
        self.limits = server.limits
        self.transport = None
        self.peer = "-"
        self.state = _IDLE
        self.buffer = bytearray()
        self.timer = None
        self.head = None  # (method, target, headers, keep_alive) of the request being read
        self.length = None  # expected body length, or None when chunked
        self.reserved = 0  # bytes of self.server.buffered_bytes this connection holds
        self.chunks = None  # chunked body so far: (parts, position in buffer, size)
        self.keep_alive = True
        self.stopping = False
        self.write_paused = False  # answers wait in the transport's buffer for the client

    # --- life cycle --------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else "-"
        if len(self.server.connections) >= self.limits.max_connections:
            log.warning("rest refused a connection from %s: %d connections are open "
                        "(max_connections)", self.peer, len(self.server.connections))
            transport.write(error_bytes(HTTPStatus.SERVICE_UNAVAILABLE, (
                f"Resource exhausted: the server has {self.limits.max_connections} "
                "connections open; try again later.")))
            self._close()
            return
        self.server.connections.add(self)
        self._arm(self.limits.idle_timeout)

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self._disarm()
        self._release()
        self.state = _BUSY  # nothing more is read or answered
        self.buffer = bytearray()

    def stop_after_answer(self):
        """On shutdown: close now if idle, else after the answer in progress."""
        self.stopping = True
        if self.state != _BUSY:
            self._close()

    def abort(self):
        """Cuts the connection without flushing."""
        if self.transport is not None:
            self.transport.abort()

    # --- timers ------------------------------------------------------------------------

    def _arm(self, seconds):
        self._disarm()
        self.timer = self.server._loop.call_later(seconds, self._timed_out)

    def _disarm(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self):
        self.timer = None
        if self.state == _IDLE:
            self._close()
        elif self.state == _HEAD:
            self._refuse(HttpError(HTTPStatus.REQUEST_TIMEOUT, (
                f"The request line and headers did not arrive within "
                f"{self.limits.header_timeout:g} s (header_timeout).")))
        elif self.state == _BODY:
            self._refuse(HttpError(HTTPStatus.REQUEST_TIMEOUT, (
                f"The request body did not arrive within {self.limits.body_timeout:g} s "
                "(body_timeout); Content-Length may claim more than was sent.")))

    # --- reading -----------------------------------------------------------------------

    def data_received(self, data):
        if self.state == _BUSY:
            self.buffer += data
            return
        self.buffer += data
        try:
            self._advance()
        except HttpError as e:
            self._refuse(e)

    def _advance(self):
        """Moves through the states as far as the buffered bytes allow."""
        while self.state != _BUSY:
            if self.state == _IDLE:
                while self.buffer[:2] == b"\r\n":  # RFC 9112: ignore empty lines first
                    del self.buffer[:2]
                if not self.buffer:
                    return
                self.state = _HEAD
                self._arm(self.limits.header_timeout)
            if self.state == _HEAD and not self._read_head():
                return
            if self.state == _BODY:
                body = self._read_body()
                if body is None:
                    return
                self._dispatch(body)

    def _read_head(self):
        if not 65 <= self.buffer[0] <= 90:  # a method starts with A-Z: fail garbage at once
            raise HttpError(HTTPStatus.BAD_REQUEST, "Malformed request line: "
                            f"{bytes(self.buffer[:40])!r}")
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self.limits.max_header_bytes:
                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, (
                    f"The request line and headers exceed {self.limits.max_header_bytes:,} "
                    "bytes (max_header_bytes)."))
            return False
        if end > self.limits.max_header_bytes:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, (
                f"The request line and headers exceed {self.limits.max_header_bytes:,} "
                "bytes (max_header_bytes)."))
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[:end + 4]
        self.head = _parse_head(lines)
        self.keep_alive = self.head[3]
        self.length = self._body_length(self.head[2])
        self.state = _BODY
        if self.length != 0:
            self._arm(self.limits.body_timeout)
            if self.head[2].get("expect", "").lower() == "100-continue" and not self.buffer:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _body_length(self, headers):
        """The declared body length (None: chunked), refusing what cannot be served."""
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise HttpError(HTTPStatus.NOT_IMPLEMENTED,
                                f"Transfer-Encoding {encoding!r} is not supported (only "
                                "chunked).")
            if length is not None:
                raise HttpError(HTTPStatus.BAD_REQUEST, "A request cannot have both "
                                "Content-Length and Transfer-Encoding.")
            self.chunks = ([], 0, 0)
            return None
        if length is None:
            return 0
        if not _DIGITS.fullmatch(length):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of "
                            f"bytes. Received: {length[:40]!r}")
        length = int(length)
        self._reserve(length)
        return length

    def _reserve(self, size):
        """Counts `size` more body bytes against the request and server limits."""
        limit = self.limits.max_request_bytes
        if self.reserved + size > limit:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, (
                f"The request is {self.reserved + size:,} bytes, over the limit of {limit:,} "
                "(max_request_bytes)."))
        if self.server.buffered_bytes + size > self.server.max_buffered_bytes:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, (
                "Resource exhausted: the server holds too many request bodies at once; try "
                "again later."))
        self.reserved += size
        self.server.buffered_bytes += size

    def _release(self):
        self.server.buffered_bytes -= self.reserved
        self.reserved = 0

    def _read_body(self):
        """The whole body once it is buffered, else None."""
        if self.length is not None:
            if len(self.buffer) < self.length:
                return None
            body = bytes(self.buffer[:self.length])
            del self.buffer[:self.length]
            return body
        return self._read_chunks()

    def _read_chunks(self):
        parts, position, size = self.chunks
        buffer = self.buffer
        while True:
            if size == 0:  # at a chunk-size line
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    if len(buffer) - position > _MAX_CHUNK_LINE:
                        raise HttpError(HTTPStatus.BAD_REQUEST, "A chunk-size line is too long.")
                    break
                text = bytes(buffer[position:end]).split(b";", 1)[0].strip()
                if not _HEX.fullmatch(text):
                    raise HttpError(HTTPStatus.BAD_REQUEST, f"Bad chunk size {text[:20]!r}.")
                size = int(text, 16)
                if size == 0:  # the last chunk: trailer lines up to an empty one
                    if buffer[end + 2:end + 4] == b"\r\n":
                        finish = end + 4
                    else:
                        finish = buffer.find(b"\r\n\r\n", end + 2)
                        if finish < 0:
                            if len(buffer) - end > self.limits.max_header_bytes:
                                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                                "The chunked trailer is too long.")
                            break  # read again from this size line when more arrives
                        finish += 4
                    del buffer[:finish]
                    self.chunks = None
                    return b"".join(parts)
                position = end + 2
                self._reserve(size)
            else:  # inside a chunk of `size` bytes plus its CRLF
                if len(buffer) - position < size + 2:
                    break
                if buffer[position + size:position + size + 2] != b"\r\n":
                    raise HttpError(HTTPStatus.BAD_REQUEST, "A chunk does not end in CRLF.")
                parts.append(bytes(buffer[position:position + size]))
                position += size + 2
                size = 0
        del buffer[:position]
        self.chunks = (parts, 0, size)
        return None

    # --- answering ---------------------------------------------------------------------

    def _dispatch(self, body):
        self._disarm()
        self.state = _BUSY
        self.transport.pause_reading()
        method, target, headers, _ = self.head
        request = HttpRequest(method, target, headers, body, self.peer)
        self.server._loop.create_task(self._answer(request))

    async def _answer(self, request):
        try:
            status, body, content_type = await self.server.handler(request)
        except Exception:  # a fault of the server, not of the request
            log.exception("rest internal error on %s %s", request.method, request.target)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            body = json.dumps({"error": "Internal server error; see the server's log."}).encode()
            content_type = "application/json"
        self._release()
        if self.transport.is_closing():
            return  # the client hung up while its request was answered
        keep_alive = self.keep_alive and not self.stopping
        self.transport.write(response_bytes(status, body, content_type, keep_alive))
        if not keep_alive:
            self._close()
            return
        self.state = _IDLE
        self.head = None
        self._arm(self.limits.idle_timeout)
        if not self.write_paused:
            self._read_on()

    def _read_on(self):
        """Takes the next request: from what is buffered (pipelined), then the socket."""
        self.transport.resume_reading()
        if self.buffer:
            try:
                self._advance()
            except HttpError as e:
                self._refuse(e)

    def pause_writing(self):
        """The client reads its answers slower than it asks: read no more requests."""
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        if self.state == _IDLE and not self.transport.is_closing():
            self._read_on()

    def _refuse(self, error):
        """Answers an HTTP-level error and closes the connection."""
        log.info("rest %s %d %s", self.peer, int(error.status), error)
        self._disarm()
        self.state = _BUSY
        self._release()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(error.status, str(error)))
        self._close()

    def _close(self):
        """Closes after flushing; cuts the connection if the client does not read."""
        self._disarm()
        if self.transport.is_closing():
            return
        self.transport.close()
        self.server._loop.call_later(_ABORT_AFTER_CLOSE, self.transport.abort)


def _parse_head(lines):
    """Request line and headers -> (method, target, headers, keep-alive?)."""
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"Malformed request line: {lines[0][:80]!r}")
    method, target, version = parts
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"Malformed header line: {line[:80]!r}")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name in ("content-length", "transfer-encoding", "host") and \
                    headers[name] != value:
                raise HttpError(HTTPStatus.BAD_REQUEST, f"Conflicting {name} headers.")
            headers[name] = headers[name] + ", " + value if name not in (
                "content-length", "host") else value
        else:
            headers[name] = value
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else \
        "keep-alive" in connection
    return method, target, headers, keep_alive
