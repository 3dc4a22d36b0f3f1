"""TF Serving's gRPC API for one export: `PredictionService` (`Predict`, `Classify`,
`GetModelMetadata`) and `ModelService.GetModelStatus`, with TF Serving's generated modules
(`tensorflow-serving-api`), so its own Python client works unchanged.

Limits: messages up to `max_request_bytes`, at most `max_concurrent_rpcs` calls in progress
(more get `RESOURCE_EXHAUSTED` from gRPC itself), a full batch queue answers
`RESOURCE_EXHAUSTED` too. Each call is logged on one line with its status code; a fault of
the server is logged as an error with its traceback and answered `INTERNAL`.
"""

import logging
import time
from concurrent import futures
from http import HTTPStatus

import tensorflow as tf

from tlkit.serve.model import DEFAULT_SIGNATURE, IMAGE_INPUT, RequestError

log = logging.getLogger("tlkit.serve")

INSTALL_HINT = ("gRPC is not served: it needs TF Serving's API package "
                "(pip install 'tlkit[serve]'); serving REST only.")


def grpc_modules():
    """TF Serving's generated gRPC modules, or None when `tensorflow-serving-api` is not
    installed."""
    try:
        import grpc
        from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                             get_model_status_pb2, model_service_pb2_grpc,
                                             predict_pb2, prediction_service_pb2_grpc)
    except ImportError:
        return None
    return (grpc, classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
            model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)


def start_grpc(owner, port, modules):
    """Starts the gRPC server for the `ModelServer` `owner` on `port`.

    Args:
        owner: the `ModelServer` (its model, batcher, host and limits).
        port: the port to bind (0: any free port).
        modules: what `grpc_modules()` returned.

    Returns:
        `(server, bound port)`, or `(None, None)` if the port cannot be bound.
    """
    (grpc, classification_pb2, metadata_pb2, status_pb2, model_service_grpc, predict_pb2,
     prediction_grpc) = modules
    model = owner.model
    limits = owner.limits

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
            code = _CODES.get(e.status, "INVALID_ARGUMENT")
            code = getattr(grpc.StatusCode, code)
            context.abort(code, str(e))
        except Exception:  # a fault of the server, not of the request
            code = grpc.StatusCode.INTERNAL
            log.exception("grpc %s internal error", where)
            context.abort(code, "Internal server error; see the server's log.")
        finally:
            owner.count_request()
            log.log(logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
                    "grpc %s %s %d image(s) %.1f ms %s", where, code.name, images,
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

    server = grpc.server(
        futures.ThreadPoolExecutor(limits.max_concurrent_rpcs, thread_name_prefix="tlkit-grpc"),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", limits.max_request_bytes),
                 ("grpc.max_send_message_length", 4 * limits.max_request_bytes),
                 ("grpc.so_reuseport", 0)])
    prediction_grpc.add_PredictionServiceServicer_to_server(PredictionService(), server)
    model_service_grpc.add_ModelServiceServicer_to_server(ModelService(), server)
    try:
        bound = server.add_insecure_port(f"{owner.host}:{port}")
    except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
        bound = 0
    if bound == 0:
        return None, None
    server.start()
    return server, bound


_CODES = {HTTPStatus.NOT_FOUND: "NOT_FOUND", HTTPStatus.SERVICE_UNAVAILABLE: "RESOURCE_EXHAUSTED"}

