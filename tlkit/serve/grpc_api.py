"""TF Serving's gRPC API for one export: `PredictionService` (`Predict`, `Classify`,
`GetModelMetadata`) and `ModelService.GetModelStatus`, with TF Serving's generated modules
(`tensorflow-serving-api`), so its own Python client works unchanged.

Limits: messages up to `max_request_bytes`, at most `max_concurrent_rpcs` calls in progress
(more get `RESOURCE_EXHAUSTED` from gRPC itself), a full batch queue answers
`RESOURCE_EXHAUSTED` too. Each call is logged on one line with its status code; a fault of
the server is logged as an error with its traceback and answered `INTERNAL`.
"""

import asyncio
import logging
import threading
import time
from http import HTTPStatus
from types import ModuleType
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tlkit.serve.model import (DEFAULT_SIGNATURE, DEFAULT_TOP_K, IMAGE_INPUT, AsyncResults,
                               RequestError, top_k_pairs)

log = logging.getLogger("tlkit.serve")

INSTALL_HINT = ("gRPC is not served: it needs TF Serving's API package "
                "(pip install 'tlkit[serve]'); serving REST only.")


def grpc_modules():
    """TF Serving's generated gRPC modules, or None when `tensorflow-serving-api` is not
    installed.

    Returns:
        A `GrpcModules`, or None.
    """
    try:
        import grpc
        from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                             get_model_status_pb2, model_service_pb2_grpc,
                                             predict_pb2, prediction_service_pb2_grpc)
    except ImportError:
        return None
    return GrpcModules(grpc, classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                       model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)


class GrpcModules(NamedTuple):
    """`grpc` and TF Serving's generated modules that the services use, imported by
    `grpc_modules()` only: this module imports without them."""

    grpc: ModuleType
    classification_pb2: ModuleType
    metadata_pb2: ModuleType
    status_pb2: ModuleType
    model_service_grpc: ModuleType
    predict_pb2: ModuleType
    prediction_grpc: ModuleType


class GrpcServer:
    """The gRPC services of a `ModelServer` (`owner`) on grpc.aio, on an event loop in a
    thread of its own: a call waiting for its batch costs no thread.

    Args:
        owner: the `ModelServer` (its model, batcher, host and limits).
        port: the port to bind (0: any free port).
        modules: what `grpc_modules()` returned.
    """

    def __init__(self, owner, port, modules):
        self._owner = owner
        self._modules = modules
        self._address = f"{owner.host}:{port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tlkit-grpc",
                                        daemon=True)
        self._server = None
        self.port = None

    def start(self):
        """Binds the port and starts serving; returns the bound port, or None if the port
        cannot be bound."""
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self.port

    async def _start(self):
        limits, modules = self._owner.limits, self._modules
        server = modules.grpc.aio.server(
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                     ("grpc.max_send_message_length", 4 * limits.max_request_bytes),
                     ("grpc.so_reuseport", 0)])
        results = AsyncResults(self._loop)
        modules.prediction_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self._owner, modules, results), server)
        modules.model_service_grpc.add_ModelServiceServicer_to_server(
            ModelService(self._owner, modules, results), server)
        try:
            bound = server.add_insecure_port(self._address)
        except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
            bound = 0
        if bound == 0:
            return None
        await server.start()
        self._server = server
        return bound

    def stop(self):
        """Stops taking calls, gives the ones in progress `limits.shutdown_grace` seconds,
        cancels the rest and stops the loop."""
        grace = self._owner.limits.shutdown_grace
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(
                grace + 5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


class _Service:
    """What both services share: checking a request's ModelSpec, running a batch, and
    answering a call with its status code and its log line.

    The services are plain classes with the method names of TF Serving's generated
    `*Servicer` bases (which only add UNIMPLEMENTED defaults): the generated
    `add_*Servicer_to_server` functions register any object with those names, so this module
    needs `tensorflow-serving-api` only when a server starts.

    Args:
        owner: the `ModelServer` (its model and batcher; it counts the answered calls).
        modules: the `GrpcModules` of `grpc_modules()`.
        results: the `AsyncResults` of the server's event loop.
    """

    def __init__(self, owner, modules, results):
        self._owner = owner
        self._model = owner.model
        self._modules = modules
        self._results = results

    def _signature(self, request):
        """Checks a request's ModelSpec; returns its signature name."""
        spec = request.model_spec
        self._model.check_spec(spec.name,
                               spec.version.value if spec.HasField("version") else None)
        return spec.signature_name

    async def _run(self, signature, inputs):
        """Checks and batches one call's inputs; returns (output arrays, image count)."""
        signature = self._model.check_signature(signature)
        arrays, count = self._model.prepare(signature, inputs)
        future = self._owner.batcher.submit(signature, arrays, count)
        return await self._results.wrap(future), count

    async def _answer(self, context, where, work):
        """Awaits `work` (a coroutine of (response, image count)) and returns its response;
        aborts the call with a request's error code, or INTERNAL (logged with its traceback)
        for a fault of the server; logs the call on one line with its code."""
        grpc = self._modules.grpc
        started = time.perf_counter()
        code, images = grpc.StatusCode.OK, 0
        try:
            response, images = await work
            return response
        except RequestError as e:
            code = getattr(grpc.StatusCode, _CODES.get(e.status, "INVALID_ARGUMENT"))
            await context.abort(code, str(e))
        except Exception:  # a fault of the server, not of the request
            code = grpc.StatusCode.INTERNAL
            log.exception("grpc %s internal error", where)
            await context.abort(code, "Internal server error; see the server's log.")
        finally:
            self._owner.count_request()
            log.log(logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
                    "grpc %s %s %d image(s) %.1f ms %s", where, code.name, images,
                    1000 * (time.perf_counter() - started), context.peer())

    def _fill_spec(self, response, signature):
        response.model_spec.name = self._model.name
        response.model_spec.version.value = self._model.version
        response.model_spec.signature_name = signature

    def _unimplemented(self, request, context):
        """A method tlkit does not serve, answered as the generated `*Servicer` bases answer
        it: UNIMPLEMENTED."""
        context.set_code(self._modules.grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")


class PredictionService(_Service):
    """`tensorflow.serving.PredictionService`: `Predict`, `Classify` and `GetModelMetadata`
    (`Regress` and `MultiInference` answer UNIMPLEMENTED).

    Args:
        owner: the `ModelServer` (its model and batcher; it counts the answered calls).
        modules: the `GrpcModules` of `grpc_modules()`.
        results: the `AsyncResults` of the server's event loop.
    """

    Regress = MultiInference = _Service._unimplemented

    async def Predict(self, request, context):
        """Runs a signature on the request's input tensors; answers its output tensors
        (those of `output_filter`, when given)."""
        return await self._answer(context, "Predict", self._predict(request))

    async def Classify(self, request, context):
        """Answers the top-k (label, score) pairs of each example's `image_bytes`."""
        return await self._answer(context, "Classify", self._classify(request))

    async def GetModelMetadata(self, request, context):
        """Answers the export's signature defs (`metadata_field` must be
        `['signature_def']`)."""
        return await self._answer(context, "GetModelMetadata", self._metadata(request))

    async def _predict(self, request):
        signature = self._model.check_signature(self._signature(request))
        inputs = {key: tf.make_ndarray(value) for key, value in request.inputs.items()}
        outputs, count = await self._run(signature, inputs)
        unknown = set(request.output_filter) - set(outputs)
        if unknown:
            raise RequestError(f"output_filter names unknown outputs {sorted(unknown)}"
                               f" (the signature has {sorted(outputs)})")
        response = self._modules.predict_pb2.PredictResponse()
        self._fill_spec(response, signature)
        for key, value in outputs.items():
            if not request.output_filter or key in request.output_filter:
                _fill_tensor(response.outputs[key], value)
        return response, count

    async def _classify(self, request):
        self._signature(request)
        images = []
        for index, example in enumerate(request.input.example_list.examples):
            feature = example.features.feature.get(IMAGE_INPUT)
            if feature is None or len(feature.bytes_list.value) != 1:
                raise RequestError(f"examples[{index}] needs one bytes value in its "
                                   f"{IMAGE_INPUT!r} feature.")
            images.append(feature.bytes_list.value[0])
        outputs, _ = await self._run(DEFAULT_SIGNATURE, {IMAGE_INPUT: images})
        names = self._model.class_names
        response = self._modules.classification_pb2.ClassificationResponse()
        self._fill_spec(response, DEFAULT_SIGNATURE)
        for pairs in top_k_pairs(outputs["probabilities"], names,
                                 min(DEFAULT_TOP_K, len(names))):
            classes = response.result.classifications.add()
            for label, score in pairs:
                classes.classes.add(label=label, score=score)
        return response, len(images)

    async def _metadata(self, request):
        self._signature(request)
        if list(request.metadata_field) != ["signature_def"]:
            raise RequestError("metadata_field must be ['signature_def']. Received: "
                               f"{list(request.metadata_field)}")
        metadata_pb2 = self._modules.metadata_pb2
        response = metadata_pb2.GetModelMetadataResponse()
        self._fill_spec(response, "")
        signatures = metadata_pb2.SignatureDefMap()
        for key, value in self._model.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signatures)
        return response, 0


class ModelService(_Service):
    """`tensorflow.serving.ModelService`: `GetModelStatus` (`HandleReloadConfigRequest`
    answers UNIMPLEMENTED).

    Args:
        owner: the `ModelServer` (its model and batcher; it counts the answered calls).
        modules: the `GrpcModules` of `grpc_modules()`.
        results: the `AsyncResults` of the server's event loop.
    """

    HandleReloadConfigRequest = _Service._unimplemented

    async def GetModelStatus(self, request, context):
        """Answers the one version served, AVAILABLE."""
        return await self._answer(context, "GetModelStatus", self._status(request))

    async def _status(self, request):
        self._signature(request)
        status_pb2 = self._modules.status_pb2
        response = status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = self._model.version
        status.state = status_pb2.ModelVersionStatus.AVAILABLE
        return response, 0


def _fill_tensor(proto, array):
    """Writes a numpy output array into a TensorProto, as `tf.make_tensor_proto` would, at a
    fraction of its cost per call (that cost was a third of a small model's gRPC time)."""
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.dtype == object:
        proto.dtype = tf.string.as_datatype_enum
        proto.string_val.extend(array.ravel().tolist())
    else:
        proto.dtype = tf.as_dtype(array.dtype).as_datatype_enum
        proto.tensor_content = np.ascontiguousarray(array).tobytes()


_CODES = {HTTPStatus.NOT_FOUND: "NOT_FOUND", HTTPStatus.SERVICE_UNAVAILABLE: "RESOURCE_EXHAUSTED"}

