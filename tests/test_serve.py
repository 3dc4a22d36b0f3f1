"""`tlkit serve` over loopback: TF Serving's REST API, its gRPC API through TF Serving's own
Python client (`tensorflow-serving-api`), batching of concurrent requests, and 4xx errors."""

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

import tlkit
from conftest import DIGITS, png_header_only
from tlkit.errors import ConfigError
from tlkit.serve import ModelServer, ServeLimits

FILES = [f for c in range(10) for f in sorted((DIGITS / str(c)).glob("*.png"))[:4]]  # 40
TIMEOUT = 30


@pytest.fixture(scope="module")
def expected(digits_export):
    """What the export itself says for FILES, through tlkit's own prediction path."""
    return {str(f): p for f, p in zip(FILES, tlkit.load(digits_export).predict(
        FILES, top_k=10))}


@pytest.fixture(scope="module")
def server(digits_export):
    with ModelServer(digits_export, port=0, grpc_port=0, batch_timeout_ms=20) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def b64(path):
    return {"b64": base64.b64encode(path.read_bytes()).decode()}


def call(url, body=None, raw=None):
    """(status, JSON) of a GET (no body) or POST to `url`."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_matches(prediction, probabilities, expected_prediction):
    ranked = sorted(zip(expected_prediction.labels, expected_prediction.probabilities))
    np.testing.assert_allclose(probabilities, [p for _, p in ranked], atol=1e-5)
    assert prediction == expected_prediction.label


# --- REST ----------------------------------------------------------------------------------

def test_status_and_metadata_follow_tf_serving(server):
    status, body = call(server.rest_url)
    assert status == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
        "error_code": "OK", "error_message": ""}}]}
    status, body = call(server.rest_url + "/versions/1/metadata")
    assert status == 200 and body["model_spec"] == {"name": "digits", "signature_name": "",
                                                    "version": "1"}
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_images"} <= set(signatures)
    image_input = signatures["serving_default"]["inputs"]["image_bytes"]
    assert image_input["dtype"] == "DT_STRING"
    assert set(signatures["serving_default"]["outputs"]) == {"probabilities", "class_ids",
                                                             "class_names"}


def test_card_gives_the_exports_metadata_and_model_card(server, digits_export):
    status, body = call(server.rest_url + "/card")
    assert status == 200 and (body["name"], body["version"]) == ("digits", 1)
    assert body["metadata"] == json.loads((digits_export / "assets" / "tlkit.json").read_text())
    assert body["model_card"] == (digits_export / "assets" / "MODEL_CARD.md").read_text()
    status, body = call(server.rest_url + "/versions/2/card")
    assert status == 404 and "Specific(digits, 2)" in body["error"]


def test_predict_row_and_columnar_formats_match_the_export(server, expected):
    files = FILES[:6]
    status, rows = call(server.rest_url + ":predict",
                        {"instances": [{"image_bytes": b64(f)} for f in files]})
    assert status == 200 and len(rows["predictions"]) == len(files)
    for f, row in zip(files, rows["predictions"]):
        assert_matches(row["class_names"], row["probabilities"], expected[str(f)])
        assert row["class_ids"] == int(np.argmax(row["probabilities"]))
    status, columns = call(server.rest_url + "/versions/1:predict",
                           {"signature_name": "serving_default",
                            "inputs": {"image_bytes": [b64(f) for f in files]}})
    assert status == 200
    np.testing.assert_allclose(columns["outputs"]["probabilities"],
                               [row["probabilities"] for row in rows["predictions"]], atol=1e-6)
    # one-input signatures also take bare values, as TF Serving does
    status, bare = call(server.rest_url + ":predict", {"instances": [b64(files[0])]})
    assert status == 200
    (alone,) = bare["predictions"]
    assert (alone["class_names"], alone["class_ids"]) == (
        rows["predictions"][0]["class_names"], rows["predictions"][0]["class_ids"])
    # a batch of one and a batch of six may round differently in the last bits
    np.testing.assert_allclose(alone["probabilities"], rows["predictions"][0]["probabilities"],
                               atol=1e-6)


def test_predict_images_signature_takes_pixel_arrays(server, digits_export):
    images = tlkit.load(digits_export)
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    status, body = call(server.rest_url + ":predict", {"signature_name": "predict_images",
                                                      "instances": pixels.tolist()})
    assert status == 200
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]],
                               images.predict_arrays(pixels), atol=1e-5)


def test_classify_gives_top_k_label_score_pairs(server, expected):
    status, body = call(server.rest_url + ":classify",
                        {"examples": [{"image_bytes": b64(f)} for f in FILES[:3]], "top_k": 3})
    assert status == 200
    for f, pairs in zip(FILES, body["results"]):
        want = expected[str(f)]
        assert [label for label, _ in pairs] == want.labels[:3]
        np.testing.assert_allclose([score for _, score in pairs], want.probabilities[:3],
                                   atol=1e-5)


@pytest.mark.parametrize("path, body, status, message", [
    (":predict", {"instances": [{"image_bytes": {"b64": "not base64!"}}]}, 400,
     "invalid base64"),
    (":predict", {"instances": [{"b64": base64.b64encode(b"plain text").decode()}]}, 400,
     "is not a JPEG, PNG, GIF, BMP or WebP"),
    (":predict", {"instances": [{"b64": base64.b64encode(png_header_only(40000, 40000))
                                 .decode()}]}, 400, "40000 x 40000 pixels is over the limit"),
    (":predict", {"instances": []}, 400, "no instances"),
    (":predict", {"instances": [], "inputs": []}, 400, "exactly one of"),
    (":predict", {"signature_name": "nope", "instances": []}, 400, "'nope' not found"),
    (":predict", {"signature_name": "predict_images", "instances": [[[0.0] * 3] * 5]}, 400,
     "must have shape [?, 16, 16, 3]"),
    (":classify", {"examples": [{"image_bytes": {"b64": ""}}], "top_k": 0}, 400, "top_k"),
    ("/versions/7:predict", {"instances": []}, 404, "Specific(digits, 7)"),
    (":regress", {"instances": []}, 404, "verbs: predict, classify"),
])
def test_bad_requests_get_tf_serving_error_bodies(server, path, body, status, message):
    got, answer = call(server.rest_url + path, body)
    assert got == status
    assert list(answer) == ["error"] and message in answer["error"], answer


def test_bad_json_unknown_models_and_oversized_bodies_are_refused(server, digits_export):
    status, answer = call(server.rest_url + ":predict", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = call(server.rest_url.replace("/digits", "/cats"))
    assert status == 404 and answer["error"] == "Servable not found for request: Latest(cats)"
    with ModelServer(digits_export, port=0, grpc_port=None,
                     limits=ServeLimits(max_request_bytes=4096)) as small:
        status, answer = call(small.rest_url + ":predict", raw=b" " * 5000)
        assert status == 413 and "5,000 bytes, over the limit of 4,096" in answer["error"]


def test_concurrent_requests_are_batched_and_none_is_dropped(server, expected):
    """64 requests of 1-3 images from 16 threads: every answer right, fewer passes than
    requests, within a bounded time."""
    before = server.stats
    jobs = [[FILES[(i + j) % len(FILES)] for j in range(1 + i % 3)] for i in range(64)]

    def send(files):
        return files, call(server.rest_url + ":predict",
                           {"instances": [{"image_bytes": b64(f)} for f in files]})

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, jobs))
    elapsed = time.monotonic() - started
    for files, (status, body) in answers:
        assert status == 200
        for f, row in zip(files, body["predictions"]):
            assert_matches(row["class_names"], row["probabilities"], expected[str(f)])
    after = server.stats
    assert after.requests - before.requests == 64
    assert after.images - before.images == sum(map(len, jobs))
    assert after.batches - before.batches < 64, "concurrent requests were not batched"
    assert after.largest_batch > 3
    assert elapsed < 60


def test_an_image_corrupt_past_its_header_fails_only_its_own_request(digits_export, expected):
    """Sent together, the requests share one batch; the graph refuses the truncated PNG, and
    only that request gets the 400."""
    with ModelServer(digits_export, port=0, grpc_port=None, batch_timeout_ms=300) as server:
        truncated = FILES[0].read_bytes()[:60]
        bodies = [{"instances": [b64(f)]} for f in FILES[:5]]
        bodies.insert(2, {"instances": [{"b64": base64.b64encode(truncated).decode()}]})
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: call(server.rest_url + ":predict", b), bodies))
        statuses = [status for status, _ in answers]
        assert statuses == [200, 200, 400, 200, 200, 200], answers
        good = [answer for status, answer in answers if status == 200]
        for f, answer in zip(FILES[:5], good):
            row = answer["predictions"][0]
            assert_matches(row["class_names"], row["probabilities"], expected[str(f)])


# --- gRPC, with TF Serving's own client ----------------------------------------------------

def predict_request(signature="serving_default", name="digits", **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_grpc_predict_matches_the_export(stub, expected):
    files = FILES[10:14]
    response = stub.Predict(predict_request(image_bytes=[f.read_bytes() for f in files]),
                            TIMEOUT)
    assert response.model_spec.name == "digits" and response.model_spec.version.value == 1
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    names = tf.make_ndarray(response.outputs["class_names"])
    for f, row, name in zip(files, probabilities, names):
        assert_matches(name.decode(), row, expected[str(f)])


def test_grpc_output_filter_and_pixel_signature(stub, digits_export):
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    request = predict_request("predict_images", images=pixels)
    request.output_filter.append("class_ids")
    response = stub.Predict(request, TIMEOUT)
    assert set(response.outputs) == {"class_ids"}
    want = tlkit.load(digits_export).predict_arrays(pixels).argmax(axis=1)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["class_ids"]), want)


def test_grpc_classify_metadata_and_status(server, stub, expected):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "digits"
    for f in FILES[:2]:
        example = request.input.example_list.examples.add()
        example.features.feature["image_bytes"].bytes_list.value.append(f.read_bytes())
    response = stub.Classify(request, TIMEOUT)
    for f, classes in zip(FILES, response.result.classifications):
        assert [c.label for c in classes.classes] == expected[str(f)].labels[:5]

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "digits"
    request.metadata_field.append("signature_def")
    signatures = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(request, TIMEOUT).metadata["signature_def"].Unpack(signatures)
    assert signatures.signature_def["serving_default"].inputs["image_bytes"].dtype == \
        tf.string.as_datatype_enum

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "digits"}), TIMEOUT)
    channel.close()
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


@pytest.mark.parametrize("request_kwargs, code, message", [
    ({"name": "cats", "image_bytes": [b"x"]}, grpc.StatusCode.NOT_FOUND, "Latest(cats)"),
    ({"image_bytes": [b"GIF89a\x10\x00\x10\x00 broken"]}, grpc.StatusCode.INVALID_ARGUMENT,
     "The model cannot take this input: "),
    ({"signature": "nope", "image_bytes": [b"x"]}, grpc.StatusCode.INVALID_ARGUMENT,
     "'nope' not found"),
    ({"images": np.zeros((1, 16, 16, 3), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT,
     "takes inputs ['image_bytes']"),
])
def test_grpc_errors_carry_status_codes(stub, request_kwargs, code, message):
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(predict_request(**request_kwargs), TIMEOUT)
    assert raised.value.code() == code
    assert message in raised.value.details()


def test_grpc_methods_tlkit_does_not_serve_answer_unimplemented(server, stub):
    from tensorflow_serving.apis import inference_pb2, model_management_pb2, regression_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    calls = [(stub.Regress, regression_pb2.RegressionRequest()),
             (stub.MultiInference, inference_pb2.MultiInferenceRequest()),
             (models.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest())]
    for method, request in calls:
        with pytest.raises(grpc.RpcError) as raised:
            method(request, TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


def test_without_the_serving_api_package_rest_serves_and_one_line_says_so(
        digits_export, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)
    with caplog.at_level("WARNING", logger="tlkit.serve"):
        with ModelServer(digits_export, port=0, grpc_port=0) as server:
            assert server.grpc_port is None
            status, body = call(server.rest_url + ":predict", {"instances": [b64(FILES[1])]})
    assert status == 200 and len(body["predictions"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["gRPC is not served: it needs TF Serving's API package "
                        "(pip install 'tlkit[serve]'); serving REST only."]


def test_a_port_in_use_is_a_config_error(server, digits_export):
    with pytest.raises(ConfigError, match=f"Cannot listen on 127.0.0.1:{server.rest_port}"):
        ModelServer(digits_export, port=server.rest_port, grpc_port=None).start()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{server.grpc_port} \\(gRPC\\)"):
        ModelServer(digits_export, port=0, grpc_port=server.grpc_port).start()


def test_grpc_limits_message_size_and_concurrent_calls_and_logs_faults_as_errors(
        digits_export, caplog, monkeypatch):
    limits = ServeLimits(max_request_bytes=4096, max_concurrent_rpcs=2)
    with ModelServer(digits_export, port=0, grpc_port=0, batch_timeout_ms=500,
                     limits=limits) as small:
        channel = grpc.insecure_channel(f"127.0.0.1:{small.grpc_port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request(image_bytes=[b"\x89PNG" + b"\0" * 5000]), TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        def send(_):
            try:
                stub.Predict(predict_request(image_bytes=[FILES[0].read_bytes()]), TIMEOUT)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(send, range(6)))
        assert codes.count("OK") >= 2 and "RESOURCE_EXHAUSTED" in codes, codes

        def broken(signature, arrays):
            raise RuntimeError("the model broke")

        monkeypatch.setattr(small.model, "run", broken)
        with caplog.at_level("INFO", logger="tlkit.serve"):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(predict_request(image_bytes=[FILES[0].read_bytes()]), TIMEOUT)
        channel.close()
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "the model broke" not in raised.value.details()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("ERROR", "grpc Predict internal error") in logged
    assert any(level == "ERROR" and message.startswith("grpc Predict INTERNAL 0 image(s)")
               for level, message in logged), logged
    assert not any("OK" in message.split()[2:3] for _, message in logged), logged


def test_the_switch_interval_is_short_while_any_server_runs(digits_export):
    before = sys.getswitchinterval()
    first = ModelServer(digits_export, port=0, grpc_port=None).start()
    second = ModelServer(digits_export, port=0, grpc_port=None).start()
    try:
        assert sys.getswitchinterval() <= 0.0005
        first.stop()
        assert sys.getswitchinterval() <= 0.0005  # the second still runs
    finally:
        first.stop()
        second.stop()
    assert sys.getswitchinterval() == before
