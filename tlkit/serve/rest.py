"""TF Serving's REST API for one export, and the page to try the model, on `tlkit.serve.http`.

Small bodies are parsed on the event loop; large ones (over `INLINE_BYTES`) in a worker
thread, so a 32 MiB request does not hold up everyone else's answers.
"""

import asyncio
import html
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from importlib import resources

from tlkit.serve.model import (DEFAULT_SIGNATURE, DEFAULT_TOP_K, IMAGE_INPUT, AsyncResults,
                               RequestError, format_predict_response, parse_predict_body,
                               rows_to_columns, top_k_pairs)

log = logging.getLogger("tlkit.serve")

INLINE_BYTES = 256 * 1024
_JSON = "application/json"


class RestApi:
    """The request handler of `HttpServer` for a `ModelServer` (`owner`)."""

    def __init__(self, owner):
        self.owner = owner
        self.model = owner.model
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="tlkit-rest-json")
        page = resources.files("tlkit.serve").joinpath("page.html").read_text()
        self._page = page.replace("__TLKIT_MODEL__", html.escape(self.model.name)).encode()
        self._wakeups = None

    def close(self):
        """Stops the worker threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, request):
        started = time.perf_counter()
        images = 0
        content_type = _JSON
        try:
            if request.method == "GET" and request.target.split("?", 1)[0] in ("/", ""):
                status, payload, content_type = HTTPStatus.OK, self._page, "text/html; charset=utf-8"
            elif request.method == "GET":
                status, payload = HTTPStatus.OK, self._get(request)
            elif request.method == "POST":
                payload, images = await self._post(request)
                status = HTTPStatus.OK
            else:
                raise RequestError(f"Method {request.method} is not allowed (GET or POST).",
                                   HTTPStatus.METHOD_NOT_ALLOWED)
        except RequestError as e:
            status, payload = e.status, json.dumps({"error": str(e)}).encode()
        self.owner.count_request()
        log.info("rest %s %s %d %d image(s) %.1f ms %s", request.method, request.target[:200],
                 status, images, 1000 * (time.perf_counter() - started), request.peer)
        return status, payload, content_type

    def _route(self, method, target):
        """Parses `/v1/models/NAME[/versions/N][/metadata|/card][:verb]`."""
        path = target.split("?", 1)[0]
        path, _, verb = path.partition(":")
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "models"]:
            raise RequestError(f"Malformed request: {method} {target[:200]}",
                               HTTPStatus.NOT_FOUND)
        name, rest, version = parts[2], parts[3:], None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            if not rest[1].isdigit():
                raise RequestError(f"Malformed version: {rest[1][:20]!r}", HTTPStatus.NOT_FOUND)
            version, rest = int(rest[1]), rest[2:]
        if rest not in ([], ["metadata"], ["card"]):
            raise RequestError(f"Malformed request: {method} {target[:200]}",
                               HTTPStatus.NOT_FOUND)
        self.model.check_spec(name, version)
        return rest, verb

    def _get(self, request):
        rest, verb = self._route(request.method, request.target)
        if verb:
            raise RequestError(f"{verb[:20]!r} needs POST.", HTTPStatus.METHOD_NOT_ALLOWED)
        payload = {(): self.model.status, ("metadata",): self.model.metadata_json,
                   ("card",): self.model.card_json}[tuple(rest)]()
        return json.dumps(payload).encode()

    async def _post(self, request):
        rest, verb = self._route(request.method, request.target)
        if rest or verb not in ("predict", "classify"):
            raise RequestError(f"Malformed request: POST {request.target[:200]} (verbs: "
                               "predict, classify)", HTTPStatus.NOT_FOUND)
        prepare = self._prepare_predict if verb == "predict" else self._prepare_classify
        large = len(request.body) > INLINE_BYTES
        loop = asyncio.get_running_loop()
        try:
            if large:
                signature, arrays, count, finish = await loop.run_in_executor(
                    self._pool, prepare, request.body)
            else:
                signature, arrays, count, finish = prepare(request.body)
        except RecursionError:
            raise RequestError("The request body is nested too deeply.") from None
        if self._wakeups is None:
            self._wakeups = AsyncResults(loop)
        outputs = await self._wakeups.wrap(self.owner.batcher.submit(signature, arrays, count))
        if large or count > 64:
            return await loop.run_in_executor(self._pool, finish, outputs), count
        return finish(outputs), count

    def _prepare_predict(self, raw):
        """A `:predict` body -> (signature, arrays, count, outputs -> response body)."""
        body = _object(raw)
        signature = body.get("signature_name", "")
        if not isinstance(signature, str):
            raise RequestError('"signature_name" must be a string.')
        signature = self.model.check_signature(signature)
        inputs, rows = parse_predict_body(body, sorted(self.model.inputs[signature]))
        arrays, count = self.model.prepare(signature, inputs)
        return signature, arrays, count, lambda outputs: json.dumps(
            format_predict_response(outputs, rows)).encode()

    def _prepare_classify(self, raw):
        """A `:classify` body (`examples` or `instances` of images, optional `top_k`) -> the
        same, with top-k `[label, score]` pairs per example as the answer."""
        body = _object(raw)
        examples = body.get("examples", body.get("instances"))
        if not isinstance(examples, list):
            raise RequestError('A classify request needs "examples": a list of '
                               '{"image_bytes": {"b64": "..."}} objects.')
        top_k = body.get("top_k", DEFAULT_TOP_K)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RequestError(f'"top_k" must be a positive integer. Received: {top_k!r}')
        columns = rows_to_columns(examples, [IMAGE_INPUT])
        arrays, count = self.model.prepare(DEFAULT_SIGNATURE, columns)
        names = self.model.class_names
        k = min(top_k, len(names))
        return DEFAULT_SIGNATURE, arrays, count, lambda outputs: json.dumps(
            {"results": top_k_pairs(outputs["probabilities"], names, k)}).encode()


def _object(raw):
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    return body
