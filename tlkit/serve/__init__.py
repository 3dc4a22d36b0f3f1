"""`tlkit serve`: a local model server that speaks TensorFlow Serving's APIs.

For teams without a TF Serving install: one export, served over

- REST (TF Serving's `/v1` API): `GET /v1/models/NAME` (status), `GET
  /v1/models/NAME/metadata` (signatures), `POST /v1/models/NAME:predict` (row `instances`
  or columnar `inputs`, binary values as `{"b64": ...}`) and `POST /v1/models/NAME:classify`
  (top-k `[label, score]` pairs per example); `/versions/N` may be given in every path.
  Errors are `{"error": "..."}` with a 4xx status (503 when the server is full), as TF
  Serving answers. tlkit adds `GET /v1/models/NAME/card` (the export's `tlkit.json` and
  model card) and `GET /`, a page to try the model in a browser with the same API.
- gRPC, when `tensorflow-serving-api` is installed: `tensorflow.serving.PredictionService`
  (`Predict`, `Classify`, `GetModelMetadata`) and `ModelService/GetModelStatus`, so TF
  Serving's own Python client works against it unchanged.

NAME is the export's model name (the folder above the version). Concurrent requests for one
signature are batched into one forward pass (up to `max_batch_size` images, waiting at most
`batch_timeout_ms` for company); an image the graph refuses fails only its own request.
Every image is checked before its forward pass: base64, a format the serving graph decodes,
and its pixel count from the header against the export's `max_pixels`. Slow, stalled and
greedy clients meet the timeouts and bounds of `ServeLimits`. Each request is logged on one
line (logger `tlkit.serve`).

Modules: `model` (the export, batching, TF Serving's JSON), `http` (the asyncio HTTP/1.1
server), `rest` (the REST routes), `grpc_api` (the gRPC services), `server` (`ModelServer`).
"""

from tlkit.serve.model import (Batcher, RequestError, ServedModel, ServeStats,
                               format_predict_response, parse_predict_body, top_k_pairs)
from tlkit.serve.server import DEFAULT_MAX_REQUEST_BYTES, ModelServer, ServeLimits

__all__ = ["Batcher", "DEFAULT_MAX_REQUEST_BYTES", "ModelServer", "RequestError",
           "ServeLimits", "ServeStats", "ServedModel", "format_predict_response",
           "parse_predict_body", "top_k_pairs"]
