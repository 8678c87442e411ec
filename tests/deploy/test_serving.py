"""`deploy serve`, `deploy triton` and `deploy loadtest`: a real Triton server on a free loopback port.

The end-to-end test is in the default suite (about half a minute): one small export (the tiny official checkpoint at
64 px, ONNX Runtime and OpenVINO, FP32 and INT8), one server for the module, every process stopped by its id.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.cli import main

DATA = Path(__file__).parents[1] / "data" / "official"
TINY = DATA / "tiny_gelu_sp.ckpt"
MODEL = "partialnet_t0"
READY_TIMEOUT_S = 120
HAS_SERVE = all(__import__("importlib").util.find_spec(m) is not None for m in ("pytriton", "tritonclient"))
needs_serve = pytest.mark.skipif(not HAS_SERVE, reason="the serve extra is not installed: pip install -e '.[serve]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "t0"
    rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64", "--output", str(out),
               "--backends", "onnxruntime,openvino", "--int8", "--no-validate", "--no-bench", "-q"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("inputs") / "x.npy"
    np.save(path, x)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    for i, arr in enumerate(load_sample_images().images):
        img = Image.fromarray(arr)
        img.resize((120, 90)).save(folder / f"p{i}.jpg", quality=90)
        img.crop((100, 50, 300, 200)).save(folder / f"p{i}.png")
    return folder


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict | bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _infer_json(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}]}


class Server:
    """`deploy serve` in its own process group; stopped by its process id, never by name."""

    def __init__(self, folder: Path, log_dir: Path, *extra: str):
        self.port, self.grpc_port, self.metrics_port = free_ports(3)
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = log_dir / f"serve-{self.port}.err"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy", "serve", str(folder), "--host", "127.0.0.1", "--port", str(self.port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.err_path, "w"), stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"deploy serve exited {self.proc.returncode}: {self.stderr()}")
            # deploy serve says where it listens just after Triton reports the models ready: ready means both
            if all(_ready(f"{self.url}/v2/models/{m}/ready") for m in (MODEL, MODEL + "_image")) \
                    and "listening on" in self.stderr():
                return
            time.sleep(0.25)
        pytest.fail(f"deploy serve not ready after {READY_TIMEOUT_S} s: {self.stderr()}")

    def stderr(self) -> str:
        return self.err_path.read_text()

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            pytest.fail(f"deploy serve did not exit within {timeout} s of SIGTERM")


def _ready(url: str) -> bool:
    try:
        return _get(url, timeout=2.0)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    s = Server(export_dir, tmp_path_factory.mktemp("logs"), "--backend", "openvino", "--precision", "int8")
    try:
        s.wait_ready()
        yield s
    finally:
        if s.proc.poll() is None:
            s.terminate()


# --------------------------------------------------------------------------- without a server


def test_cli_import_loads_no_serving_or_backend_library():
    code = ("import sys, deploy.cli; deploy.cli.build_parser(); "
            "print(sorted(m for m in ('pytriton', 'tritonclient', 'onnx', 'onnxruntime', 'openvino') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_without_the_extra_is_one_line_saying_how_to_install(export_dir, capsys, monkeypatch):
    import importlib.util

    from deploy.serving import extra

    real = importlib.util.find_spec
    monkeypatch.setattr(extra.importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real(name, *a))
    rc = main(["serve", str(export_dir)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "deploy serve needs the serve extra (nvidia-pytriton not installed)" in err
    assert "pip install -c constraints.txt -e '.[serve]'" in err


def test_port_in_use_is_one_line_before_anything_starts(export_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        grpc, metrics = free_ports(2)
        rc = main(["serve", str(export_dir), "--port", str(port), "--grpc-port", str(grpc), "--metrics-port",
                   str(metrics)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert f"port {port} on 127.0.0.1 (--port) is in use by another process" in err


def test_same_port_twice_is_a_usage_error(export_dir, capsys):
    rc = main(["serve", str(export_dir), "--port", "18000", "--grpc-port", "18000"])
    assert rc == 2 and "--port and --grpc-port are both 18000" in capsys.readouterr().err


def test_tampered_artifact_fails_its_sha256_before_the_server_starts(export_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    with open(copy / "openvino" / "model.int8.xml", "ab") as f:
        f.write(b" ")
    port, grpc, metrics = free_ports(3)
    rc = main(["serve", str(copy), "--backend", "openvino", "--precision", "int8", "--port", str(port),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "model.int8.xml has sha256" in err and "re-export" in err and "listening" not in err


def test_missing_artifact_names_what_the_export_has(export_dir, capsys):
    rc = main(["serve", str(export_dir), "--backend", "openvino", "--precision", "bf16"])
    err = capsys.readouterr().err
    assert rc == 1 and "the export has no openvino/bf16 artifact" in err


@needs_serve
def test_loadtest_without_a_server_is_one_line(inputs, capsys):
    rc = main(["loadtest", f"http://127.0.0.1:{free_port()}", "--data", str(inputs), "--model-name", MODEL])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "cannot reach a Triton server at http://127.0.0.1:" in err


def test_loadtest_url_must_name_a_server(inputs, capsys):
    rc = main(["loadtest", "ftp://127.0.0.1:1", "--data", str(inputs), "--model-name", MODEL])
    assert rc == 2 and "must be http://HOST:PORT" in capsys.readouterr().err


# --------------------------------------------------------------------------- deploy triton


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@needs_serve
def test_triton_repository_configs_parse_against_tritons_model_config(export_dir, tmp_path, capsys):
    repo = tmp_path / "repo"
    rc = main(["triton", str(export_dir), "--output", str(repo), "--backend", "openvino", "--precision", "int8",
               "--max-batch", "16", "--instances", "2"])
    assert rc == 0
    configs = {p.parent.name: _parse_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    assert sorted(configs) == [MODEL, MODEL + "_image", f"{MODEL}_onnxruntime_fp32", f"{MODEL}_onnxruntime_int8",
                               f"{MODEL}_openvino_fp32", f"{MODEL}_openvino_int8"]
    for name, c in configs.items():
        assert c.name == name and (repo / name / "1").is_dir()
        assert [(g.count, g.kind) for g in c.instance_group] == [(2, 2)]  # KIND_CPU is 2 in model_config.proto
        if name == MODEL + "_image":
            assert c.max_batch_size == 0 and c.input[0].name == "image" and c.input[0].data_type == 13  # TYPE_STRING
            assert list(c.output[0].dims) == [-1, 10]
            continue
        assert c.max_batch_size == 16
        assert (c.input[0].name, c.input[0].data_type, list(c.input[0].dims)) == ("input", 11, [3, 64, 64])  # FP32
        assert (c.output[0].name, list(c.output[0].dims)) == ("logits", [10])
        assert list(c.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert c.dynamic_batching.max_queue_delay_microseconds == 500
    assert configs[f"{MODEL}_onnxruntime_int8"].platform == "onnxruntime_onnx"
    assert (repo / f"{MODEL}_onnxruntime_int8" / "1" / "model.onnx").read_bytes() == (export_dir / "model.int8.onnx").read_bytes()
    ov = configs[f"{MODEL}_openvino_int8"]
    assert ov.backend == "openvino" and ov.default_model_filename == "model.xml"
    assert ov.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    assert (repo / f"{MODEL}_openvino_int8" / "1" / "model.bin").read_bytes() == (export_dir / "openvino" / "model.int8.bin").read_bytes()
    py = configs[MODEL]
    assert py.backend == "python" and py.parameters["backend"].string_value == "openvino"
    assert py.parameters["precision"].string_value == "int8"
    assert (repo / MODEL / "1" / "model.py").read_text().count("from deploy.serving.python_model import") == 1
    own = json.loads((repo / MODEL / "1" / "export" / "manifest.json").read_text())
    assert [(a["backend"], a["precision"]) for a in own["artifacts"]] == [("openvino", "int8")]
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(repo)

    rc = main(["triton", str(export_dir), "--output", str(repo)])
    assert rc == 2 and f"{repo} exists; pass --force" in capsys.readouterr().err
    rc = main(["triton", str(export_dir), "--output", str(repo), "--force"])
    assert rc == 0 and _parse_config(repo / MODEL / "config.pbtxt").parameters["backend"].string_value == "onnxruntime"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old folder left behind


@needs_serve
@pytest.mark.slow
def test_triton_repository_python_models_serve_with_pytritons_tritonserver(export_dir, tmp_path):
    """The repository's Python-backend models, loaded by the tritonserver PyTriton bundles (not through PyTriton)."""
    import sysconfig

    import pytriton

    repo = tmp_path / "repo"
    assert main(["triton", str(export_dir), "--output", str(repo), "-q"]) == 0
    dist = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(dist / "backends", backends)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(dist / "python_backend_stubs" / version / "triton_python_backend_stub",
                backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               LD_LIBRARY_PATH=os.pathsep.join([sysconfig.get_config_var("LIBDIR"),
                                                str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")]))
    port = free_port()
    proc = subprocess.Popen(
        [str(dist / "bin" / "tritonserver"), f"--model-repository={repo}", "--model-control-mode=explicit",
         f"--load-model={MODEL}", f"--load-model={MODEL}_image", f"--backend-directory={backends}",
         "--http-address=127.0.0.1", f"--http-port={port}", "--allow-grpc=false", "--allow-metrics=false",
         "--exit-timeout-secs=5"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _ready(f"{url}/v2/models/{MODEL}_image/ready"):
            assert proc.poll() is None and time.monotonic() < deadline, "tritonserver did not load the models"
            time.sleep(0.25)
        x = np.load(DATA / "x64.npy")
        status, body = _post(f"{url}/v2/models/{MODEL}/infer", _infer_json(x))
        assert status == 200
        got = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32).reshape(len(x), -1)
        want = _local(export_dir, "onnxruntime", "fp32", x)
        assert np.abs(got - want).max() <= 1e-5
        status, body = _post(f"{url}/v2/models/{MODEL}_image/infer",
                             {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["garbage"]}]})
        assert status == 400 and b"image 0 of 1: 7 bytes are not an image Pillow can read" in body
        assert _ready(f"{url}/v2/health/ready")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise


# --------------------------------------------------------------------------- a running server


def _local(folder: Path, backend: str, precision: str, x: np.ndarray) -> np.ndarray:
    from deploy.backends import open_artifact
    from deploy.predict import run_batched
    from export.manifest import Manifest

    runner, _ = open_artifact(folder, Manifest.load(folder), backend, precision, None)
    try:
        return run_batched(runner, x, 8)
    finally:
        runner.close()


@needs_serve
def test_serve_says_where_it_listens(server):
    err = server.stderr()
    assert f"listening on 127.0.0.1 (loopback only): {server.url} (KServe v2 HTTP), 127.0.0.1:{server.grpc_port} " \
           f"(gRPC), http://127.0.0.1:{server.metrics_port}/metrics (Prometheus)" in err
    assert "serving openvino int8 (openvino/model.int8.xml)" in err
    status, body = _get(f"{server.url}/v2/models/{MODEL}/config")
    config = json.loads(body)
    assert status == 200 and config["max_batch_size"] == 8 and "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [("input", "TYPE_FP32", [3, 64, 64])]
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [("logits", "TYPE_FP32", [10])]


@needs_serve
def test_200_requests_from_8_threads_all_answered_identical_to_local(server, export_dir, inputs, capsys):
    rc = main(["loadtest", server.url, "--data", str(inputs), "--concurrency", "8", "--requests", "200",
               "--verify", str(export_dir), "--backend", "openvino", "--precision", "int8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc
    assert (doc["succeeded"], doc["failed"], doc["errors"]) == (200, 0, {})
    assert doc["verify"]["compared"] == 200 and doc["verify"]["beyond_tolerance"] == 0
    assert doc["verify"]["max_abs_logit_diff"] <= 1e-4
    assert set(doc["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}


@needs_serve
def test_kserve_json_matches_deploy_predict_within_1e4(server, export_dir, inputs, tmp_path, capsys):
    saved = tmp_path / "y.npy"
    assert main(["predict", str(export_dir), "--backend", "openvino", "--precision", "int8", "--inputs", str(inputs),
                 "--save-logits", str(saved)]) == 0
    capsys.readouterr()
    want = np.load(saved)
    x = np.load(inputs)
    for i in (0, 5):
        status, body = _post(f"{server.url}/v2/models/{MODEL}/infer", _infer_json(x[i : i + 3]))
        out = json.loads(body)["outputs"][0]
        assert status == 200 and out["name"] == "logits" and out["shape"] == [3, 10]
        assert np.abs(np.asarray(out["data"], np.float32).reshape(3, 10) - want[i : i + 3]).max() <= 1e-4


@needs_serve
def test_grpc_and_the_image_model_answer_what_the_local_runner_computes(server, export_dir, photos, capsys):
    rc = main(["loadtest", f"grpc://127.0.0.1:{server.grpc_port}", "--data", str(photos), "--concurrency", "4",
               "--requests", "20", "--batch", "2", "--verify", str(export_dir), "--backend", "openvino",
               "--precision", "int8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0, doc
    assert doc["model"] == MODEL + "_image" and doc["succeeded"] == 20 and doc["verify"]["beyond_tolerance"] == 0
    assert doc["verify"]["max_abs_logit_diff"] <= 1e-4


@needs_serve
def test_bad_requests_get_an_error_and_the_server_stays_ready(server):
    infer = f"{server.url}/v2/models/{MODEL}/infer"
    x = np.zeros((1, 3, 64, 64), np.float32)
    cases = [
        (_infer_json(np.zeros((1, 3, 64, 63), np.float32)), 400, "unexpected shape for input 'input'"),
        (_infer_json(x.astype(np.int32), datatype="INT32"), 400, "data-type is 'INT32', but model"),
        (_infer_json(x, name="images"), 400, "unexpected inference input 'images'"),
        (_infer_json(np.zeros((9, 3, 64, 64), np.float32)), 400, "batch-size must be <= 8"),
        (b"{not json", 500, "failed to parse the request JSON"),  # Triton's own answer to a body that is not JSON
    ]
    for body, code, text in cases:
        status, reply = _post(infer, body)
        assert status == code and text in reply.decode(), (status, reply[:300])
    image = f"{server.url}/v2/models/{MODEL}_image/infer"
    status, reply = _post(image, {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["garbage"]}]})
    assert status >= 400 and "image 0 of 1: 7 bytes are not an image Pillow can read" in reply.decode()
    buf = BytesIO()
    Image.new("RGB", (80, 80), (10, 200, 30)).save(buf, format="PNG")
    many = [buf.getvalue()] * 9
    import tritonclient.http as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        inp = tc.InferInput("image", [9], "BYTES")
        inp.set_data_from_numpy(np.array(many, dtype=np.object_))
        with pytest.raises(Exception, match="the request holds 9 images; at most 8 per request"):
            client.infer(MODEL + "_image", [inp])
        inp = tc.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array(many[:1], dtype=np.object_))
        assert client.infer(MODEL + "_image", [inp]).as_numpy("logits").shape == (1, 10)
    finally:
        client.close()
    assert _ready(f"{server.url}/v2/health/ready") and _ready(f"{server.url}/v2/models/{MODEL}/ready")
    status, _ = _post(infer, _infer_json(x))
    assert status == 200
    assert "Traceback" not in server.stderr()


@needs_serve
def test_prometheus_metrics_count_the_requests(server):
    status, body = _get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    text = body.decode()
    line = next(ln for ln in text.splitlines() if ln.startswith(f'nv_inference_request_success{{model="{MODEL}"'))
    assert status == 200 and float(line.split()[-1]) >= 200
    assert f'nv_inference_request_failure{{model="{MODEL}"' in text


@needs_serve
def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    """Requests keep coming from 4 threads while SIGTERM arrives; every answer is a 200 or a refusal, never a hang."""
    x = _infer_json(np.zeros((2, 3, 64, 64), np.float32))
    outcomes: list[str] = []
    started = threading.Event()
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                status, _ = _post(f"{server.url}/v2/models/{MODEL}/infer", x, timeout=20)
                outcomes.append(str(status))
            except OSError as e:  # refused once the server has closed its port
                outcomes.append(type(e).__name__)
                return
            started.set()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    assert started.wait(30)
    rc = server.terminate(timeout=30)
    stop.set()
    for t in threads:
        t.join(30)
    assert rc == 0
    assert "200" in outcomes and "500" not in outcomes
    err = server.stderr()
    assert "stopping: draining in-flight requests" in err and err.rstrip().endswith("stopped")
    assert "Traceback" not in err
