"""`ModelServer`: one export behind REST (always) and gRPC (when its package is installed),
with the limits that keep it up (`ServeLimits`)."""

import io
import logging
import sys
import threading
from dataclasses import dataclass, fields

from PIL import Image

from tlkit.config import DEFAULT_MAX_REQUEST_BYTES, ServeConfig
from tlkit.errors import ConfigError
from tlkit.export import resolve_export
from tlkit.serve.grpc_api import INSTALL_HINT, GrpcServer, grpc_modules
from tlkit.serve.http import HttpServer
from tlkit.serve.model import DEFAULT_SIGNATURE, IMAGE_INPUT, Batcher, ServedModel, ServeStats
from tlkit.serve.rest import RestApi
from tlkit.validation import check_number

log = logging.getLogger("tlkit.serve")

_SPARE_FILES = 256  # descriptors beyond max_connections: the model, gRPC, logs
_SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while another waits


class _ShortSwitches:
    """Python's GIL switch interval at `_SWITCH_INTERVAL` while any server of this process
    runs, and as it was once the last one stops. A batching thread back from a forward pass
    waits for the GIL while the event loops parse requests; Python's default 5 ms would leave
    the model idle that long (REST at 16 clients: 259 -> 382 requests/s)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._servers = 0
        self._saved = None

    def acquire(self):
        with self._lock:
            if not self._servers:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, _SWITCH_INTERVAL))
            self._servers += 1

    def release(self):
        with self._lock:
            self._servers -= 1
            if not self._servers:
                sys.setswitchinterval(self._saved)


_SHORT_SWITCHES = _ShortSwitches()


@dataclass(frozen=True)
class ServeLimits:
    """What one client, or many, may take of the server. Timeouts are in seconds.

    Example:

    >>> ServeLimits(header_timeout=2, max_connections=500)
    """

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # largest REST body or gRPC message
    max_header_bytes: int = 64 * 1024  # request line and headers of a REST request
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    idle_timeout: float = 15.0  # a keep-alive connection waiting for its next request
    max_connections: int = 2048  # open REST connections; more get a 503 and are closed
    max_queued_requests: int = 256  # requests waiting for the model; more get a 503
    max_concurrent_rpcs: int = 64  # gRPC calls in progress; more get RESOURCE_EXHAUSTED
    shutdown_grace: float = 3.0  # time requests in flight get to finish on stop

    def __post_init__(self):
        integers = {"max_request_bytes": 1024, "max_header_bytes": 1024,
                    "max_connections": 1, "max_queued_requests": 1, "max_concurrent_rpcs": 1}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in integers:
                check_number(field.name, value, integers[field.name], integer=True)
            else:
                check_number(field.name, value, 0, 3600, low_open=True)


_DEFAULTS = ServeConfig()


class ModelServer:
    """Serves one tlkit export over REST and gRPC with TF Serving's APIs.

    REST always runs; gRPC runs when `grpc_port` is given and `tensorflow-serving-api` is
    installed (otherwise one warning says so, and `grpc_port` stays None after `start`).

    Args:
        model_path: an export version folder, or a model folder (its highest version);
            `None` takes the newest export under `export_dir`.
        export_dir: where to look when `model_path` is None.
        name: the model name in URLs and gRPC requests (default: the export's folder name).
        host: address to bind (default loopback only).
        port: REST port (0: any free port; see `rest_port` after `start`).
        grpc_port: gRPC port (0: any free port), or None for no gRPC.
        max_batch_size: most images in one forward pass.
        batch_timeout_ms: longest wait of a request, when the model is idle, for others to
            batch with (0: none; requests that arrive during a forward pass form the next
            batch).
        limits: a `ServeLimits` (default: `ServeLimits()`).

    The defaults are `tlkit.config.ServeConfig`'s, which `tlkit serve` shows.

    Example:

    >>> with ModelServer("saved_models/digits", port=0, grpc_port=None) as server:
    ...     print(server.rest_url)
    """

    def __init__(self, model_path=None, *, export_dir="saved_models", name=_DEFAULTS.name,
                 host=_DEFAULTS.host, port=_DEFAULTS.port, grpc_port=_DEFAULTS.grpc_port,
                 max_batch_size=_DEFAULTS.max_batch_size,
                 batch_timeout_ms=_DEFAULTS.batch_timeout_ms, limits=None):
        ServeConfig(name=name, host=host, port=port, grpc_port=grpc_port,
                    max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms)  # checks
        limits = ServeLimits() if limits is None else limits
        if not isinstance(limits, ServeLimits):
            raise ConfigError(f"`limits` must be a ServeLimits. Received: limits={limits!r}")
        self.model = ServedModel(resolve_export(model_path, export_dir), name)
        self.host = host
        self.limits = limits
        self._ports = (port, grpc_port)
        self._batching = (max_batch_size, batch_timeout_ms / 1000, limits.max_queued_requests)
        self._lock = threading.Lock()
        self._short_switches = False  # this server holds Python's short switch interval
        self.requests = 0
        self.batcher = None
        self._rest = self._http = self._grpc = None
        self.rest_port = self.grpc_port = None

    @property
    def rest_url(self):
        """Base URL of the REST API, e.g. `http://127.0.0.1:8501/v1/models/digits`."""
        return f"http://{self.host}:{self.rest_port}/v1/models/{self.model.name}"

    def start(self):
        """Warms the model up, binds the ports and starts serving in background threads.

        Raises:
            ConfigError: if a port cannot be bound.
        """
        port, grpc_port = self._ports
        modules = grpc_modules() if grpc_port is not None else None
        if grpc_port is not None and modules is None:
            log.warning(INSTALL_HINT)
        _allow_open_files(self.limits.max_connections + _SPARE_FILES)
        _SHORT_SWITCHES.acquire()
        self._short_switches = True
        self.batcher = Batcher(self.model, *self._batching)
        self._warm_up()
        self._rest = RestApi(self)
        self._http = HttpServer(self._rest, self.host, port, self.limits)
        try:
            self._http.start()
        except OSError as e:
            self.stop()
            raise ConfigError(f"Cannot listen on {self.host}:{port} (REST): {e.strerror}. "
                              "Choose another `port`.") from None
        self.rest_port = self._http.port
        if modules is not None:
            self._grpc = GrpcServer(self, grpc_port, modules)
            self.grpc_port = self._grpc.start()
            if self.grpc_port is None:
                self.stop()
                raise ConfigError(f"Cannot listen on {self.host}:{grpc_port} (gRPC). Choose "
                                  "another `grpc_port`.")
        return self

    def stop(self):
        """Stops accepting requests, gives the ones in flight `limits.shutdown_grace`
        seconds to be answered, then closes every connection and the batching thread."""
        stopping = [threading.Thread(target=part.stop, name="tlkit-stop")
                    for part in (self._grpc, self._http) if part is not None]
        for thread in stopping:  # both at once, so the graces overlap
            thread.start()
        for thread in stopping:
            thread.join()
        if self._rest is not None:
            self._rest.close()
        if self.batcher is not None:
            self.batcher.close()
        if self._short_switches:
            _SHORT_SWITCHES.release()
            self._short_switches = False
        self._grpc = self._http = self._rest = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def count_request(self):
        """Counts one answered request (for `stats`)."""
        with self._lock:
            self.requests += 1

    @property
    def stats(self):
        """`ServeStats`: requests answered, forward passes, images, largest batch, and
        requests refused for a full queue."""
        stats = self.batcher.stats
        return ServeStats(self.requests, stats.batches, stats.images, stats.largest_batch,
                          stats.refused)

    def run(self, signature, inputs, timeout=None):
        """Checks and batches one request; returns (output arrays, instance count).

        Raises:
            RequestError: for a request the model refuses, or a full queue.
        """
        signature = self.model.check_signature(signature)
        arrays, count = self.model.prepare(signature, inputs)
        return self.batcher.submit(signature, arrays, count).result(timeout), count

    def _warm_up(self):
        """Runs each serving path once, so the first client does not pay for tracing."""
        blank = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(blank, format="PNG")
        self.run(DEFAULT_SIGNATURE, {IMAGE_INPUT: [blank.getvalue()]})
        self.batcher.stats = ServeStats()


def _allow_open_files(wanted):
    """Raises this process's soft limit on open files towards `wanted` (each connection is
    one); warns when the hard limit is lower."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning("The process may open %d files, fewer than max_connections needs (%d); "
                    "connections past that are refused.", target, wanted)

