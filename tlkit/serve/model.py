"""The model side of `tlkit serve`: one export, its checked inputs, request batching, and
TF Serving's JSON conventions. Shared by the REST and the gRPC front ends."""

import base64
import binascii
import collections
import re
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import json_format

from tlkit.errors import TlkitError
from tlkit.export import MODEL_CARD_FILE, read_metadata
from tlkit.images import SERVING_FORMATS

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_TOP_K = 5
IMAGE_INPUT = "image_bytes"


class RequestError(TlkitError):
    """A request the server refuses; `status` is its HTTP status."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass
class ServeStats:
    """Counters since start: requests answered, forward passes run, images predicted, and
    requests refused because the queue was full."""

    requests: int = 0
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    refused: int = 0


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
        saved = tf.saved_model.load(str(self.path))
        self._saved = saved  # keeps the signatures' variables alive
        self.signatures = dict(saved.signatures)
        self.inputs = {key: fn.structured_input_signature[1]
                       for key, fn in self.signatures.items()}
        self.signature_defs = _signature_defs(self.path)
        card = self.path / "assets" / MODEL_CARD_FILE
        self.model_card = card.read_text() if card.is_file() else None

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
        """Refuses what is not an image before it can spoil a batch; anything else wrong,
        such as a header that claims more than the export's `max_pixels`, is the serving
        graph's to find (it checks the header before it decodes)."""
        for index, data in enumerate(images):
            if not data.startswith(SERVING_FORMATS):
                raise RequestError(f"image_bytes[{index}] is not a JPEG, PNG, GIF, BMP or WebP "
                                   f"image ({len(data)} bytes starting {data[:8]!r}).")

    def run(self, signature, arrays):
        """One forward pass: dict of input arrays -> dict of output arrays."""
        outputs = self.signatures[signature](**{k: tf.constant(v) for k, v in arrays.items()})
        return {k: v.numpy() for k, v in outputs.items()}

    def status(self):
        """TF Serving's `GetModelStatusResponse` as JSON."""
        return {"model_version_status": [{
            "version": str(self.version), "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]}

    def card_json(self):
        """The export's own description for people: `tlkit.json` and the model card."""
        return {"name": self.name, "version": self.version, "metadata": self.metadata,
                "model_card": self.model_card}

    def metadata_json(self):
        """TF Serving's `GetModelMetadataResponse` (signature_def) as JSON."""
        return {"model_spec": {"name": self.name, "signature_name": "",
                               "version": str(self.version)},
                "metadata": {"signature_def": {"signature_def": {
                    key: json_format.MessageToDict(value, preserving_proto_field_name=True)
                    for key, value in self.signature_defs.items()}}}}


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
    waited `batch_timeout` seconds. When the model refuses a batch of several requests (an
    image corrupt past its header, or a decompression bomb), the batch is halved until the
    faulty requests stand alone, so only they fail, and a bad image costs about
    2 log2(batch) passes rather than one per request. At most `max_queued` requests wait;
    more are refused with a 503.
    """

    def __init__(self, model, max_batch_size=32, batch_timeout=0.0, max_queued=256):
        self._model = model
        self._max = max_batch_size
        self._timeout = batch_timeout
        self._max_queued = max_queued
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
            if len(self._pending) >= self._max_queued:
                self.stats.refused += 1
                raise RequestError(f"Resource exhausted: {self._max_queued} requests are "
                                   "already waiting for the model; try again later.",
                                   HTTPStatus.SERVICE_UNAVAILABLE)
            self._pending.append((signature, arrays, count, future, time.monotonic()))
            self._cond.notify()
        return future

    def close(self):
        """Finishes the queued requests, then stops the batching thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
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
                    taken, total = [], 0
                    for item in same:
                        if taken and total + item[2] > self._max:
                            break
                        taken.append(item)
                        total += item[2]
                    self._pending = [item for item in self._pending
                                     if not any(item is t for t in taken)]
                    # a request whose caller gave up (cancelled its future) is dropped here
                    batch = [item for item in taken if item[3].set_running_or_notify_cancel()]
                    if batch:
                        return batch
                    continue
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
                self._run(batch[:len(batch) // 2])
                self._run(batch[len(batch) // 2:])
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


class AsyncResults:
    """Hands the `Batcher`'s finished futures to an asyncio event loop with one wake-up per
    batch rather than one per request: each wake-up writes to the loop's self-pipe, on the
    batcher thread's way to the next forward pass.

    Args:
        loop: the event loop whose coroutines await the results.
    """

    def __init__(self, loop):
        self._loop = loop
        self._done = collections.deque()
        self._scheduled = False

    def wrap(self, future):
        """An asyncio future that takes the result of the concurrent `future`."""
        waiter = self._loop.create_future()
        future.add_done_callback(lambda done: self._finished(waiter, done))
        return waiter

    def _finished(self, waiter, future):
        self._done.append((waiter, future))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed on shutdown: nobody waits any more
                pass

    def _drain(self):
        self._scheduled = False
        while self._done:
            waiter, future = self._done.popleft()
            if waiter.cancelled():
                continue
            error = future.exception()
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(future.result())


def _tf_message(error):
    """The line of a TensorFlow error that says what went wrong, without its graph trace."""
    lines = [line for line in str(error.message).splitlines()
             if line.strip() and not line.startswith((" ", "\t", "Graph execution error",
                                                       "Detected at node", "<stack traces"))]
    text = lines[0] if lines else str(error.message).strip()
    asserted = re.fullmatch(r"assertion failed: \[(.*)\]", text)
    return asserted.group(1) if asserted else text


# ----------------------------------------------------------------------------------------
# REST: TF Serving's JSON conventions


def _b64decode(text):
    """Strict base64 -> bytes (binascii's strict mode where there is one: 3.11 and later;
    `b64decode(validate=True)` checks with a regular expression, a fifth of the cost of a
    small model's request)."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(text, strict_mode=True)
    return base64.b64decode(text, validate=True)


def _decode_json_value(value, key):
    """JSON -> Python, with `{"b64": ...}` objects decoded to bytes."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            try:
                return _b64decode(value["b64"])
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
        return rows_to_columns(instances, input_names), True
    inputs = body["inputs"]
    if len(input_names) == 1 and not (isinstance(inputs, dict) and set(inputs) == set(input_names)):
        inputs = {input_names[0]: inputs}
    if not isinstance(inputs, dict):
        raise RequestError(f'"inputs" must be an object keyed by {input_names}.')
    return {k: _decode_json_value(v, k) for k, v in inputs.items()}, False


def rows_to_columns(instances, input_names):
    """TF Serving's row format (a list of instances) -> dict input name -> list of values."""
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


