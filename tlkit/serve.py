"""`tlkit serve`: a small local model server that speaks TensorFlow Serving's APIs.

For teams without a TF Serving install: one export, served over

- REST (TF Serving's `/v1` API): `GET /v1/models/NAME` (status), `GET
  /v1/models/NAME/metadata` (signatures), `POST /v1/models/NAME:predict` (row `instances`
  or columnar `inputs`, binary values as `{"b64": ...}`) and `POST /v1/models/NAME:classify`
  (top-k `[label, score]` pairs per example); `/versions/N` may be given in every path.
  Errors are `{"error": "..."}` with a 4xx status, as TF Serving answers.
- gRPC: `tensorflow.serving.PredictionService` (`Predict`, `Classify`, `GetModelMetadata`)
  and `tensorflow.serving.ModelService/GetModelStatus`, so TF Serving's own Python client
  (`tensorflow-serving-api`) works against it unchanged.

NAME is the export's model name (the folder above the version). Concurrent requests for one
signature are batched into one forward pass (up to `max_batch_size` images, waiting at most
`batch_timeout_ms` for company); an image the graph refuses fails only its own request.
Every image is checked before it is batched: base64, a format the serving graph decodes, and
its pixel count from the header against the export's `max_pixels`. Each request is logged
on one line (logger `tlkit.serve`).
"""

import base64
import binascii
import io
import json
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from PIL import Image

from tlkit.config import _check_number
from tlkit.errors import ConfigError, TlkitError
from tlkit.export import read_metadata, resolve_export
from tlkit.images import SERVING_FORMATS, header_size

log = logging.getLogger("tlkit.serve")

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_TOP_K = 5
IMAGE_INPUT = "image_bytes"
_SERVING_INSTALL = ("gRPC needs TF Serving's API package: pip install 'tlkit[serve]' "
                    "(tensorflow-serving-api), or pass --no-grpc to serve REST only.")


class RequestError(TlkitError):
    """A request the server refuses; `status` is its HTTP status."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class ServeStats:
    """Counters since start: requests answered, forward passes run, images predicted."""

    requests: int = 0
    batches: int = 0
    images: int = 0
    largest_batch: int = 0


class ServedModel:
    """One export with its signatures, checked inputs and TF Serving metadata.

    Args:
        path: the export version folder.
        name: the model name clients use (default: the folder above the version).
    """

    def __init__(self, path, name=None):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.name = name or self.path.parent.name
        self.version = int(self.path.name) if self.path.name.isdigit() else 1
        self.class_names = list(self.metadata["class_names"])
        self.max_pixels = int(self.metadata.get("max_pixels", 0)) or None
        saved = tf.saved_model.load(str(self.path))
        self._saved = saved  # keeps the signatures' variables alive
        self.signatures = dict(saved.signatures)
        self.inputs = {key: fn.structured_input_signature[1]
                       for key, fn in self.signatures.items()}
        self.signature_defs = _signature_defs(self.path)

    def check_signature(self, name):
        """The signature called `name` ("" means `serving_default`), or a 400 error."""
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            raise RequestError(f"Serving signature name: {name!r} not found in signature def "
                               f"(the export has {sorted(self.signatures)})")
        return name

    def check_spec(self, name, version):
        """Refuses a request for another model or version (TF Serving's 404)."""
        if name != self.name or version not in (None, self.version):
            wanted = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise RequestError(f"Servable not found for request: {wanted}",
                               HTTPStatus.NOT_FOUND)

    def prepare(self, signature, inputs):
        """Checks a request's arrays against the signature; returns them and their count.

        Args:
            signature: signature name.
            inputs: dict input name -> array (strings as object arrays of bytes).

        Raises:
            RequestError: on missing or extra inputs, wrong shapes or counts, or an image
                that is not a decodable format or is too large.
        """
        specs = self.inputs[signature]
        if set(inputs) != set(specs):
            raise RequestError(f"Signature {signature!r} takes inputs {sorted(specs)}. "
                               f"Received: {sorted(inputs)}")
        arrays, counts = {}, set()
        for key, spec in specs.items():
            array = _as_input_array(inputs[key], spec, key)
            arrays[key] = array
            counts.add(len(array))
        if len(counts) != 1:
            raise RequestError(f"All inputs must have the same number of instances. "
                               f"Received: {dict((k, len(v)) for k, v in arrays.items())}")
        if IMAGE_INPUT in arrays:
            self._check_images(arrays[IMAGE_INPUT])
        count = counts.pop()
        if count == 0:
            raise RequestError("The request has no instances.")
        return arrays, count

    def _check_images(self, images):
        """Refuses non-images and images whose header claims more than `max_pixels`, before
        they can spoil a batch; anything else wrong is the decoder's to find."""
        for index, data in enumerate(images):
            if not data.startswith(SERVING_FORMATS):
                raise RequestError(f"image_bytes[{index}] is not a JPEG, PNG, GIF, BMP or WebP "
                                   f"image ({len(data)} bytes starting {data[:8]!r}).")
        if not self.max_pixels:
            return
        sizes = _header_sizes(tf.constant(images)).numpy()
        for index, (height, width) in enumerate(sizes):
            if height * width > self.max_pixels:
                raise RequestError(f"image_bytes[{index}] is {width}x{height} = "
                                   f"{height * width:,} pixels, over this model's limit of "
                                   f"{self.max_pixels:,}.")

    def run(self, signature, arrays):
        """One forward pass: dict of input arrays -> dict of output arrays."""
        outputs = self.signatures[signature](**{k: tf.constant(v) for k, v in arrays.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    def status(self):
        """TF Serving's `GetModelStatusResponse` as JSON."""
        return {"model_version_status": [{
            "version": str(self.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}

    def metadata_json(self):
        """TF Serving's `GetModelMetadataResponse` (signature_def) as JSON."""
        return {"model_spec": {"name": self.name, "signature_name": "",
                               "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": {
                    key: json_format.MessageToDict(value, preserving_proto_field_name=True)
                    for key, value in self.signature_defs.items()}}}}


@tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
def _header_sizes(images):
    """`(height, width)` per encoded image from its header, by the serving graph's rule."""
    return tf.map_fn(lambda data: tf.stack(header_size(data)), images,
                     fn_output_signature=tf.TensorSpec([2], tf.int64))


def _signature_defs(path):
    """The `SignatureDef` protos of a SavedModel, read from `saved_model.pb`."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    return {key: value for key, value in proto.meta_graphs[0].signature_def.items()
            if not key.startswith("__")}


def _as_input_array(value, spec, key):
    """A request value as the signature input's dtype, with its shape checked."""
    if spec.dtype == tf.string:
        array = np.asarray(value, dtype=object)
        if array.ndim != 1 or not all(isinstance(v, bytes) for v in array):
            raise RequestError(f"Input {key!r} must be a list of binary strings "
                               "(JSON: {\"b64\": \"...\"} per instance).")
        return array
    try:
        array = np.asarray(value, dtype=spec.dtype.as_numpy_dtype)
    except (TypeError, ValueError) as e:
        raise RequestError(f"Input {key!r} must hold {spec.dtype.name} values: {e}") from None
    expected = spec.shape.as_list()
    if array.ndim != len(expected) or any(
            want is not None and got != want for got, want in zip(array.shape[1:], expected[1:])):
        shape = ", ".join("?" if d is None else str(d) for d in expected)
        raise RequestError(f"Input {key!r} must have shape [{shape}]. "
                           f"Received: {list(array.shape)}")
    return array


class Batcher:
    """Joins concurrent requests for one signature into one forward pass.

    A batch closes when it holds `max_batch_size` instances or when its oldest request has
    waited `batch_timeout` seconds. When the model refuses a batch of several requests
    (say, one image is corrupt past its header), each request is run alone, so only the
    faulty one fails.
    """

    def __init__(self, model, max_batch_size=32, batch_timeout=0.002):
        self._model = model
        self._max = max_batch_size
        self._timeout = batch_timeout
        self._pending = []  # (signature, arrays, count, future, arrival)
        self._cond = threading.Condition()
        self._closed = False
        self.stats = ServeStats()
        self._thread = threading.Thread(target=self._loop, name="tlkit-batcher", daemon=True)
        self._thread.start()

    def submit(self, signature, arrays, count):
        """Queues a checked request; returns a future of its output arrays."""
        future = futures.Future()
        with self._cond:
            if self._closed:
                raise RequestError("The server is shutting down.", HTTPStatus.SERVICE_UNAVAILABLE)
            self._pending.append((signature, arrays, count, future, time.monotonic()))
            self._cond.notify()
        return future

    def close(self):
        """Finishes the queued requests, then stops the batching thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _take(self):
        """Waits for a full or timed-out batch of one signature; None when closed."""
        with self._cond:
            while True:
                if not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                signature, _, _, _, arrival = self._pending[0]
                same = [item for item in self._pending if item[0] == signature]
                waited = time.monotonic() - arrival
                if self._closed or waited >= self._timeout or sum(i[2] for i in same) >= self._max:
                    batch, total = [], 0
                    for item in same:
                        if batch and total + item[2] > self._max:
                            break
                        batch.append(item)
                        total += item[2]
                    self._pending = [item for item in self._pending
                                     if not any(item is taken for taken in batch)]
                    return batch
                self._cond.wait(self._timeout - waited)

    def _loop(self):
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch):
        signature = batch[0][0]
        try:
            joined = {key: np.concatenate([item[1][key] for item in batch])
                      for key in batch[0][1]}
            outputs = self._model.run(signature, joined)
        except tf.errors.InvalidArgumentError as e:
            if len(batch) > 1:
                for item in batch:
                    self._run([item])
                return
            batch[0][3].set_exception(RequestError(f"The model cannot take this input: "
                                                   f"{_tf_message(e)}"))
            return
        except Exception as e:  # a server fault: report it to the caller, keep serving
            for item in batch:
                item[3].set_exception(e)
            return
        total = sum(item[2] for item in batch)
        self.stats.batches += 1
        self.stats.images += total
        self.stats.largest_batch = max(self.stats.largest_batch, total)
        start = 0
        for _, _, count, future, _ in batch:
            future.set_result({k: v[start:start + count] for k, v in outputs.items()})
            start += count


def _tf_message(error):
    """The first line of a TensorFlow error, without its graph trace."""
    return str(error.message).strip().splitlines()[0]


# ----------------------------------------------------------------------------------------
# REST: TF Serving's JSON conventions


def _decode_json_value(value, key):
    """JSON -> Python, with `{"b64": ...}` objects decoded to bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, TypeError, ValueError) as e:
                raise RequestError(f"Input {key!r} has invalid base64: {e}") from None
        raise RequestError(f"Input {key!r}: an object value must be {{\"b64\": \"...\"}}. "
                           f"Received keys: {sorted(value)}")
    if isinstance(value, list):
        return [_decode_json_value(v, key) for v in value]
    if isinstance(value, str):
        return value.encode()
    return value


def parse_predict_body(body, input_names):
    """A `:predict` JSON body -> (dict of input values, row format?).

    Accepts TF Serving's row format (`"instances"`: one value per instance for a
    one-input signature, or one object per instance) and columnar format (`"inputs"`).

    Raises:
        RequestError: on a body that is not one of those shapes.
    """
    if ("instances" in body) == ("inputs" in body):
        raise RequestError('The request must have exactly one of "instances" (row format) '
                           'or "inputs" (columnar format).')
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise RequestError('"instances" must be a list.')
        return _rows_to_columns(instances, input_names), True
    inputs = body["inputs"]
    if len(input_names) == 1 and not (isinstance(inputs, dict) and set(inputs) == set(input_names)):
        inputs = {input_names[0]: inputs}
    if not isinstance(inputs, dict):
        raise RequestError(f'"inputs" must be an object keyed by {input_names}.')
    return {k: _decode_json_value(v, k) for k, v in inputs.items()}, False


def _rows_to_columns(instances, input_names):
    columns = {name: [] for name in input_names}
    for index, instance in enumerate(instances):
        named = isinstance(instance, dict) and set(instance) != {"b64"}
        if not named:
            if len(input_names) != 1:
                raise RequestError(f"instances[{index}] must be an object with the inputs "
                                   f"{input_names}.")
            instance = {input_names[0]: instance}
        if set(instance) != set(input_names):
            raise RequestError(f"instances[{index}] must have the inputs {input_names}. "
                               f"Received: {sorted(instance)}")
        for name in input_names:
            columns[name].append(_decode_json_value(instance[name], name))
    return columns


def _json_output(array):
    """An output array as JSON: strings as text, or `{"b64": ...}` when not UTF-8."""
    if array.dtype == object:
        return [_json_string(v) for v in array.tolist()]
    return array.tolist()


def _json_string(value):
    if isinstance(value, list):
        return [_json_string(v) for v in value]
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(value).decode()}


def format_predict_response(outputs, rows):
    """Output arrays -> TF Serving's `{"predictions": [...]}` (rows) or `{"outputs": ...}`."""
    columns = {key: _json_output(value) for key, value in outputs.items()}
    if not rows:
        return {"outputs": columns}
    count = len(next(iter(columns.values())))
    return {"predictions": [{key: column[i] for key, column in columns.items()}
                            for i in range(count)]}


def top_k_pairs(probabilities, class_names, k):
    """`[[label, score], ...]` per row, most probable first (TF Serving's classify result)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[[class_names[j], float(row[j])] for j in ranks]
            for row, ranks in zip(probabilities, order)]


class _RestHandler(BaseHTTPRequestHandler):
    """One REST request; `server.tlkit` is the `ModelServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "tlkit-serve"

    def log_message(self, format, *args):  # one line per request is logged in _answer
        pass

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, handler):
        started = time.perf_counter()
        owner = self.server.tlkit
        images = 0
        try:
            status, payload, images = handler(owner)
        except RequestError as e:
            status, payload = e.status, {"error": str(e)}
        except Exception as e:  # a fault of the server, not of the request
            log.exception("internal error")
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"Internal: {e}"}
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        owner.count_request()
        log.info("rest %s %s %d %d image(s) %.1f ms %s", self.command, self.path, status, images,
                 1000 * (time.perf_counter() - started), self.client_address[0])

    def _route(self, owner):
        """Parses `/v1/models/NAME[/versions/N][/metadata][:verb]`."""
        path = self.path.split("?", 1)[0]
        path, _, verb = path.partition(":")
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "models"]:
            raise RequestError(f"Malformed request: {self.command} {self.path}",
                               HTTPStatus.NOT_FOUND)
        name, rest, version = parts[2], parts[3:], None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            if not rest[1].isdigit():
                raise RequestError(f"Malformed version: {rest[1]!r}", HTTPStatus.NOT_FOUND)
            version, rest = int(rest[1]), rest[2:]
        if rest not in ([], ["metadata"]):
            raise RequestError(f"Malformed request: {self.command} {self.path}",
                               HTTPStatus.NOT_FOUND)
        owner.model.check_spec(name, version)
        return rest, verb

    def _get(self, owner):
        rest, verb = self._route(owner)
        if verb:
            raise RequestError(f"{verb!r} needs POST.", HTTPStatus.METHOD_NOT_ALLOWED)
        return HTTPStatus.OK, (owner.model.metadata_json() if rest else owner.model.status()), 0

    def _post(self, owner):
        rest, verb = self._route(owner)
        if rest or verb not in ("predict", "classify"):
            raise RequestError(f"Malformed request: POST {self.path} (verbs: predict, "
                               "classify)", HTTPStatus.NOT_FOUND)
        body = self._read_json(owner.max_request_bytes)
        if verb == "predict":
            outputs, rows, count = owner.predict_json(body)
            return HTTPStatus.OK, format_predict_response(outputs, rows), count
        results = owner.classify_json(body)
        return HTTPStatus.OK, {"results": results}, len(results)

    def _read_json(self, limit):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError("The request needs a Content-Length header.",
                               HTTPStatus.LENGTH_REQUIRED)
        if int(length) > limit:
            self.close_connection = True
            raise RequestError(f"The request is {int(length):,} bytes, over the limit of "
                               f"{limit:,} (--max-request-bytes).",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"The request body is not valid JSON: {e}") from None


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 resets bursts of concurrent clients


# ----------------------------------------------------------------------------------------
# The server


class ModelServer:
    """Serves one tlkit export over REST and gRPC with TF Serving's APIs.

    Args:
        model_path: an export version folder, or a model folder (its highest version);
            `None` takes the newest export under `export_dir`.
        export_dir: where to look when `model_path` is None.
        name: the model name in URLs and gRPC requests (default: the export's folder name).
        host: address to bind (default loopback only).
        port: REST port (0: any free port; see `rest_port` after `start`).
        grpc_port: gRPC port (0: any free port), or None for no gRPC.
        max_batch_size: most images in one forward pass.
        batch_timeout_ms: longest wait of a request for others to batch with.
        max_request_bytes: largest request body (REST) or message (gRPC) accepted.

    Example:

    >>> with ModelServer("saved_models/digits", port=0, grpc_port=None) as server:
    ...     print(server.rest_url)
    """

    def __init__(self, model_path=None, *, export_dir="saved_models", name=None,
                 host="127.0.0.1", port=8501, grpc_port=8500, max_batch_size=32,
                 batch_timeout_ms=2.0, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES):
        _check_number("port", port, 0, 65535, integer=True)
        if grpc_port is not None:
            _check_number("grpc_port", grpc_port, 0, 65535, integer=True)
        _check_number("max_batch_size", max_batch_size, 1, integer=True)
        _check_number("batch_timeout_ms", batch_timeout_ms, 0)
        _check_number("max_request_bytes", max_request_bytes, 1024, integer=True)
        if grpc_port is not None:
            _grpc_modules()  # fail before loading the model when gRPC cannot run
        self.model = ServedModel(resolve_export(model_path, export_dir), name)
        self.host = host
        self.max_request_bytes = max_request_bytes
        self._ports = (port, grpc_port)
        self._batching = (max_batch_size, batch_timeout_ms / 1000)
        self._lock = threading.Lock()
        self.requests = 0
        self.batcher = None
        self._http = self._grpc = self._http_thread = None
        self.rest_port = self.grpc_port = None

    @property
    def rest_url(self):
        """Base URL of the REST API, e.g. `http://127.0.0.1:8501/v1/models/digits`."""
        return f"http://{self.host}:{self.rest_port}/v1/models/{self.model.name}"

    def start(self):
        """Warms the model up, binds the ports and starts serving in background threads."""
        self.batcher = Batcher(self.model, *self._batching)
        self._warm_up()
        port, grpc_port = self._ports
        try:
            self._http = _ThreadingServer((self.host, port), _RestHandler)
        except OSError as e:
            raise ConfigError(f"Cannot listen on {self.host}:{port} (REST): {e.strerror}. "
                              "Choose another --port.") from None
        self._http.tlkit = self
        self.rest_port = self._http.server_address[1]
        if grpc_port is not None:
            self._grpc, self.grpc_port = _start_grpc(self, grpc_port)
        self._http_thread = threading.Thread(target=self._http.serve_forever,
                                             name="tlkit-rest", daemon=True)
        self._http_thread.start()
        return self

    def stop(self):
        """Stops accepting requests, answers the ones in flight, and shuts down."""
        if self._grpc is not None:
            self._grpc.stop(grace=5).wait()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.batcher is not None:
            self.batcher.close()

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
        """`ServeStats`: requests answered, forward passes, images, largest batch."""
        stats = self.batcher.stats
        return ServeStats(self.requests, stats.batches, stats.images, stats.largest_batch)

    def run(self, signature, inputs):
        """Checks and batches one request; returns (output arrays, instance count)."""
        signature = self.model.check_signature(signature)
        arrays, count = self.model.prepare(signature, inputs)
        return self.batcher.submit(signature, arrays, count).result(), count

    def predict_json(self, body):
        """A REST `:predict` body -> (outputs, row format?, instance count)."""
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        signature = body.get("signature_name", "")
        if not isinstance(signature, str):
            raise RequestError('"signature_name" must be a string.')
        signature = self.model.check_signature(signature)
        inputs, rows = parse_predict_body(body, sorted(self.model.inputs[signature]))
        outputs, count = self.run(signature, inputs)
        return outputs, rows, count

    def classify_json(self, body):
        """A REST `:classify` body (`examples` or `instances` of images, optional `top_k`)
        -> top-k `[label, score]` pairs per example."""
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        examples = body.get("examples", body.get("instances"))
        if not isinstance(examples, list):
            raise RequestError('A classify request needs "examples": a list of '
                               '{"image_bytes": {"b64": "..."}} objects.')
        top_k = body.get("top_k", DEFAULT_TOP_K)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RequestError(f'"top_k" must be a positive integer. Received: {top_k!r}')
        columns = _rows_to_columns(examples, [IMAGE_INPUT])
        return self.classify(columns[IMAGE_INPUT], top_k)

    def classify(self, images, top_k=DEFAULT_TOP_K):
        """Encoded images -> top-k `[label, score]` pairs each."""
        outputs, _ = self.run(DEFAULT_SIGNATURE, {IMAGE_INPUT: images})
        k = min(top_k, len(self.model.class_names))
        return top_k_pairs(outputs["probabilities"], self.model.class_names, k)

    def _warm_up(self):
        """Runs each serving path once, so the first client does not pay for tracing."""
        blank = io.BytesIO()
        Image.new("RGB", (8, 8), (128, 128, 128)).save(blank, format="PNG")
        self.run(DEFAULT_SIGNATURE, {IMAGE_INPUT: [blank.getvalue()]})
        self.batcher.stats = ServeStats()


# ----------------------------------------------------------------------------------------
# gRPC: TF Serving's PredictionService and ModelService


def _grpc_modules():
    """TF Serving's generated gRPC modules, or a ConfigError saying how to get them."""
    try:
        import grpc
        from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                             get_model_status_pb2, model_service_pb2_grpc,
                                             predict_pb2, prediction_service_pb2_grpc)
    except ImportError:
        raise ConfigError(_SERVING_INSTALL) from None
    return (grpc, classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
            model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)


def _start_grpc(owner, port):
    """Starts the gRPC server for `owner`; returns it and its bound port."""
    (grpc, classification_pb2, metadata_pb2, status_pb2, model_service_grpc, predict_pb2,
     prediction_grpc) = _grpc_modules()
    model = owner.model
    limit = owner.max_request_bytes

    def spec(request):
        """Checks a request's ModelSpec; returns its signature name."""
        version = request.model_spec.version.value if request.model_spec.HasField(
            "version") else None
        model.check_spec(request.model_spec.name, version)
        return request.model_spec.signature_name

    def answer(context, where, work):
        started = time.perf_counter()
        code, images = grpc.StatusCode.OK, 0
        try:
            response, images = work()
            return response
        except RequestError as e:
            code = (grpc.StatusCode.NOT_FOUND if e.status == HTTPStatus.NOT_FOUND
                    else grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(e))
        finally:
            owner.count_request()
            log.info("grpc %s %s %d image(s) %.1f ms %s", where, code.name, images,
                     1000 * (time.perf_counter() - started), context.peer())

    def fill_spec(response, signature):
        response.model_spec.name = model.name
        response.model_spec.version.value = model.version
        response.model_spec.signature_name = signature

    class PredictionService(prediction_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            def work():
                signature = model.check_signature(spec(request))
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                outputs, count = owner.run(signature, inputs)
                unknown = set(request.output_filter) - set(outputs)
                if unknown:
                    raise RequestError(f"output_filter names unknown outputs {sorted(unknown)}"
                                       f" (the signature has {sorted(outputs)})")
                response = predict_pb2.PredictResponse()
                fill_spec(response, signature)
                for key, value in outputs.items():
                    if not request.output_filter or key in request.output_filter:
                        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
                return response, count

            return answer(context, "Predict", work)

        def Classify(self, request, context):
            def work():
                spec(request)
                images = []
                for index, example in enumerate(request.input.example_list.examples):
                    feature = example.features.feature.get(IMAGE_INPUT)
                    if feature is None or len(feature.bytes_list.value) != 1:
                        raise RequestError(f"examples[{index}] needs one bytes value in its "
                                           f"{IMAGE_INPUT!r} feature.")
                    images.append(feature.bytes_list.value[0])
                response = classification_pb2.ClassificationResponse()
                fill_spec(response, DEFAULT_SIGNATURE)
                for pairs in owner.classify(images):
                    classes = response.result.classifications.add()
                    for label, score in pairs:
                        classes.classes.add(label=label, score=score)
                return response, len(images)

            return answer(context, "Classify", work)

        def GetModelMetadata(self, request, context):
            def work():
                spec(request)
                if list(request.metadata_field) != ["signature_def"]:
                    raise RequestError("metadata_field must be ['signature_def']. Received: "
                                       f"{list(request.metadata_field)}")
                response = metadata_pb2.GetModelMetadataResponse()
                fill_spec(response, "")
                signatures = metadata_pb2.SignatureDefMap()
                for key, value in model.signature_defs.items():
                    signatures.signature_def[key].CopyFrom(value)
                response.metadata["signature_def"].Pack(signatures)
                return response, 0

            return answer(context, "GetModelMetadata", work)

    class ModelService(model_service_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            def work():
                spec(request)
                response = status_pb2.GetModelStatusResponse()
                status = response.model_version_status.add()
                status.version = model.version
                status.state = status_pb2.ModelVersionStatus.AVAILABLE
                return response, 0

            return answer(context, "GetModelStatus", work)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="tlkit-grpc"),
                         options=[("grpc.max_receive_message_length", limit),
                                  ("grpc.max_send_message_length", 4 * limit)])
    prediction_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_service_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    bound = server.add_insecure_port(f"{owner.host}:{port}")
    if bound == 0:
        raise ConfigError(f"Cannot listen on {owner.host}:{port} (gRPC). Choose another "
                          "--grpc-port.")
    server.start()
    return server, bound
