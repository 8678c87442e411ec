"""Runners (runtimes/): one protocol, one feed wording, FP32 agreement with eager, artifact and backend errors.

The FP32 comparisons use a PartialNet-T0 whose BatchNorm statistics and affines and iRPE table are randomized
(a fresh BN is nearly the identity), exported at 64 px. TensorRT tests run only where TensorRT and a GPU are.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import randomize_
from partialnet import build_model
from partialnet.errors import UsageError
from runtimes.artifacts import ArtifactError, check_artifact
from runtimes.base import INPUT_NAME, OUTPUT_NAME, BackendUnavailable, InputError, Runner, TensorSpec
from runtimes.eager import EagerRunner
from runtimes.ort import OrtRunner
from runtimes.ov import OpenVINORunner, convert_to_ir
from runtimes.trt import EngineSpec, tensorrt_status, write_build_script
from deploy import backends
from deploy.backends import RunnerOptions
from export.manifest import Artifact

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # px: the smallest input that keeps every stage well defined, and fast
CLASSES = 10
FP32_ABS_TOL = 1e-4  # max |Δlogit| vs eager, on logits of magnitude ~10; seen: ~5e-6 (onnxruntime), ~1e-5 (openvino)
TRT_FP32_ABS_TOL = 1e-3  # TF32 is off, but GPU kernels sum in other orders than the CPU
TRT_FP16_REL_TOL = 3e-2  # max |Δlogit| <= 3e-2 * max |logit| for an fp16 engine
INPUT_SPEC = TensorSpec(INPUT_NAME, "float32", (None, 3, SIZE, SIZE))
OUTPUT_SPEC = TensorSpec(OUTPUT_NAME, "float32", (None, CLASSES))


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return randomize_(build_model("partialnet_t0", num_classes=CLASSES, log=lambda msg: None).model.eval(), seed=1)


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory) -> Path:
    from export.to_onnx import export_onnx

    dest = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, dest, SIZE)
    return dest


@pytest.fixture(scope="module")
def ir_path(onnx_path, tmp_path_factory) -> Path:
    return convert_to_ir(onnx_path, tmp_path_factory.mktemp("ir") / "model.xml")


@pytest.fixture(scope="module")
def runners(model, onnx_path, ir_path) -> dict[str, Runner]:
    return {
        "eager": EagerRunner(model, SIZE),
        "onnxruntime": OrtRunner(onnx_path),
        "openvino": OpenVINORunner(ir_path),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(runners, images) -> np.ndarray:
    return runners["eager"].run({INPUT_NAME: images})[OUTPUT_NAME]


def tiny_onnx(path: Path, *, batch: int | str = "batch", metadata: dict[str, str] | None = None) -> Path:
    """A one-Relu ONNX with the project's tensor names, for tests that need a file, not a network."""
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, 4, 4])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, 3, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", [INPUT_NAME], [OUTPUT_NAME])], "tiny", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def cpu_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


# --------------------------------------------------------------------------------------------------------
# protocol and agreement
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, name", [("eager", "eager:cpu:fp32"), ("onnxruntime", "onnxruntime:cpu:fp32"),
                                           ("openvino", "openvino:cpu:fp32")])
def test_runner_protocol_and_specs(runners, backend, name):
    runner = runners[backend]
    assert isinstance(runner, Runner)
    assert runner.name == name
    assert list(runner.inputs) == [INPUT_SPEC]
    assert list(runner.outputs) == [OUTPUT_SPEC]


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_matches_eager(runners, images, reference, backend, batch):
    out = runners[backend].run({INPUT_NAME: images[:batch]})[OUTPUT_NAME]
    assert out.shape == (batch, CLASSES) and out.dtype == np.float32
    assert np.abs(reference).max() > 1.0  # logits large enough that 1e-4 is a real bound
    assert np.abs(out - reference[:batch]).max() <= FP32_ABS_TOL


def test_onnxruntime_records_options(onnx_path):
    runner = OrtRunner(onnx_path, threads=1, graph_optimization="basic")
    assert runner.options == {"threads": 1, "graph_optimization": "basic", "providers": ["CPUExecutionProvider"],
                              "spinning": True, "exact_int8": False}


def test_openvino_fp32_runs_in_f32(runners):
    options = runners["openvino"].options
    assert options["inference_precision"] == "f32"
    assert options["device"] == "CPU"


def test_openvino_records_threads_and_uses_cache(ir_path, tmp_path):
    runner = OpenVINORunner(ir_path, threads=1, cache_dir=tmp_path / "cache")
    assert runner.options["threads"] == 1 and runner.options["cache_dir"] == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())  # the compiled blob was written


@pytest.mark.skipif("BF16" not in cpu_capabilities(), reason="this CPU has no bf16 support in OpenVINO")
def test_openvino_bf16_is_measurably_different(ir_path, images, reference):
    """Why the f32 hint is pinned: on a bf16 CPU the default would drift far beyond the FP32 tolerance."""
    runner = OpenVINORunner(ir_path, inference_precision="bf16")
    assert runner.options["inference_precision"] == "bf16"
    out = runner.run({INPUT_NAME: images})[OUTPUT_NAME]
    assert np.abs(out - reference).max() > 10 * FP32_ABS_TOL


@pytest.mark.parametrize("hint, capability", [("bf16", "BF16"), ("f16", "FP16")])
def test_openvino_never_substitutes_a_precision(tmp_path, hint, capability):
    path = tiny_onnx(tmp_path / "tiny.onnx")
    if capability in cpu_capabilities():
        assert OpenVINORunner(path, inference_precision=hint).options["inference_precision"] == hint
    else:
        with pytest.raises(BackendUnavailable, match=rf"computes in \w+ although {hint} was requested"):
            OpenVINORunner(path, inference_precision=hint)


def test_openvino_makes_a_fixed_batch_dynamic(tmp_path):
    runner = OpenVINORunner(tiny_onnx(tmp_path / "fixed.onnx", batch=1))
    assert runner.inputs[0].shape == (None, 3, 4, 4)
    x = np.linspace(-1, 1, 3 * 3 * 4 * 4, dtype=np.float32).reshape(3, 3, 4, 4)
    np.testing.assert_array_equal(runner.run({INPUT_NAME: x})[OUTPUT_NAME], np.maximum(x, 0))


# --------------------------------------------------------------------------------------------------------
# one feed wording
# --------------------------------------------------------------------------------------------------------

BAD_FEEDS = {
    "wrong name": (lambda x: {"image": x}, "model inputs are 'input' (float32 [batch, 3, 64, 64]); got 'image'."),
    "float64": (
        lambda x: {INPUT_NAME: x.astype(np.float64)},
        "input 'input' has dtype float64; expected 'input' (float32 [batch, 3, 64, 64]). "
        "Convert it with .astype(np.float32).",
    ),
    "wrong shape": (
        lambda x: {INPUT_NAME: x[:, :, :32, :32].copy()},
        "input 'input' has shape [1, 3, 32, 32]; expected 'input' (float32 [batch, 3, 64, 64])",
    ),
}


def feed_error(runner: Runner, feeds) -> str:
    with pytest.raises(InputError) as info:
        runner.run(feeds)
    return str(info.value)


@pytest.mark.parametrize("case", ["wrong name", "float64"])
def test_feed_errors_are_worded_once(runners, images, case):
    make, expected = BAD_FEEDS[case]
    messages = {backend: feed_error(runner, make(images[:1])) for backend, runner in runners.items()}
    assert set(messages.values()) == {expected}, messages


def test_shape_error_is_worded_once_by_compiled_backends(runners, images):
    make, expected = BAD_FEEDS["wrong shape"]
    ort_msg = feed_error(runners["onnxruntime"], make(images[:1]))
    assert ort_msg == feed_error(runners["openvino"], make(images[:1]))
    assert ort_msg.startswith(expected)


def test_shape_error_is_worded_once_with_eager(runners, images):
    make, _ = BAD_FEEDS["wrong shape"]
    assert feed_error(runners["eager"], make(images[:1])) == feed_error(runners["onnxruntime"], make(images[:1]))


# --------------------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opener", [OrtRunner, OpenVINORunner])
def test_missing_file_is_named(tmp_path, opener):
    path = tmp_path / "nowhere.onnx"
    with pytest.raises(ArtifactError, match=rf"{path} does not exist; check the path or re-export it"):
        opener(path)


@pytest.mark.parametrize("opener, library", [(OrtRunner, "onnxruntime"), (OpenVINORunner, "OpenVINO")])
def test_truncated_onnx_is_named(onnx_path, tmp_path, opener, library):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_path.read_bytes()[: onnx_path.stat().st_size // 2])
    with pytest.raises(ArtifactError) as info:
        opener(cut)
    message = str(info.value)
    assert message.startswith(f"{library} could not load {cut} (")
    assert "truncated or corrupt" in message and "\n" not in message


def test_truncated_ir_weights_are_named(ir_path, tmp_path):
    xml = tmp_path / "cut.xml"
    xml.write_bytes(ir_path.read_bytes())
    weights = ir_path.with_suffix(".bin").read_bytes()
    xml.with_suffix(".bin").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ArtifactError, match=rf"OpenVINO could not load {xml} \(.*\); the file may be truncated"):
        OpenVINORunner(xml)
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ArtifactError, match=rf"OpenVINO weights file {xml.with_suffix('.bin')} does not exist"):
        OpenVINORunner(xml)


def test_check_artifact_compares_sha256(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"partialnet")
    recorded = "9f5c7b0d4a5c4d1a9b6c4d2a1f9c7d2e2b5e9b8e6f0e0d3b8f5e2d7c0a1b2c3d"
    import hashlib

    actual = hashlib.sha256(b"partialnet").hexdigest()
    assert check_artifact(path, actual) == path
    assert check_artifact(path, None) == path
    with pytest.raises(ArtifactError) as info:
        check_artifact(path, recorded)
    assert str(info.value) == (
        f"{path} has sha256 {actual} but its manifest records {recorded}: the file was changed, truncated or replaced "
        f"after export; re-export it with `deploy export --force`."
    )
    with pytest.raises(ArtifactError, match=rf"{tmp_path / 'gone.onnx'} does not exist"):
        check_artifact(tmp_path / "gone.onnx", actual)


def test_convert_to_ir_keeps_fp32_metadata_and_refuses_to_overwrite(tmp_path):
    import openvino as ov

    src = tiny_onnx(tmp_path / "tiny.onnx", metadata={"variant": "partialnet_t0", "input_size": "4"})
    dest = tmp_path / "ir" / "tiny.xml"
    assert convert_to_ir(src, dest) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny.bin", "tiny.xml"]  # no temporary left behind
    assert 'element_type="f16"' not in dest.read_text()
    rt = ov.Core().read_model(str(dest)).get_rt_info()
    assert rt["partialnet"]["variant"].astype(str) == "partialnet_t0"
    with pytest.raises(UsageError, match=rf"^{dest} exists; pass --force to overwrite it\.$"):
        convert_to_ir(src, dest)
    assert convert_to_ir(src, dest, force=True) == dest
    with pytest.raises(UsageError, match="must end in .xml"):
        convert_to_ir(src, tmp_path / "tiny.ir")


# --------------------------------------------------------------------------------------------------------
# backends that are not here
# --------------------------------------------------------------------------------------------------------


def test_onnxruntime_cuda_is_never_a_silent_cpu_run(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailable) as info:
        OrtRunner(tiny_onnx(tmp_path / "tiny.onnx"), precision="fp32", device="cuda")
    message = str(info.value)
    assert message.startswith(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (it has ")
    assert "install onnxruntime-gpu" in message


def test_openvino_missing_device_is_an_error(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"OpenVINO .* has no device 'NPU' here \(available: .*CPU"):
        OpenVINORunner(tiny_onnx(tmp_path / "tiny.onnx"), device="NPU")


def test_registry_names_and_statuses(tmp_path):
    with pytest.raises(UsageError, match=r"unknown backend 'openvno' \(did you mean 'openvino'\?\); backends are "
                                         r"eager, onnxruntime, openvino, tensorrt\."):
        backends.get("openvno")
    status = backends.status()
    assert set(status) == {"onnxruntime", "openvino", "tensorrt"}
    assert status["onnxruntime"] is None and status["openvino"] is None
    runner = backends.get("openvino").open(tiny_onnx(tmp_path / "tiny.onnx"), "fp32", RunnerOptions(threads=1))
    assert runner.name == "openvino:cpu:fp32" and runner.options["threads"] == 1


def test_tensorrt_unavailable_here_is_explained(tmp_path):
    reason = tensorrt_status()
    if reason is None:
        pytest.skip("TensorRT and a GPU are usable here")
    assert "TensorRT" in reason and "\n" not in reason
    assert 'pip install -e ".[tensorrt]"' in reason or "TensorRT is installed but" in reason
    with pytest.raises(BackendUnavailable) as info:
        backends.open_row(tmp_path, Artifact("tensorrt", "fp16", "model.plan", "0" * 64, 0))
    assert str(info.value) == reason
    from runtimes.trt import EngineSpec, build_engine

    with pytest.raises(BackendUnavailable):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", EngineSpec("fp32", SIZE))


def test_tensorrt_probe_never_loads_tensorrt_without_a_gpu():
    code = (
        "import json, sys\n"
        "import runtimes.trt as trt\n"
        "after_import = 'tensorrt' in sys.modules\n"
        "reason = trt.tensorrt_status()\n"
        "print(json.dumps({'after_import': after_import, 'reason': reason, 'loaded': 'tensorrt' in sys.modules}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["after_import"] is False
    if seen["reason"] is not None:  # unusable here: TensorRT must not have been loaded to find that out
        assert seen["loaded"] is False and "TensorRT" in seen["reason"]


def test_build_script_is_the_trtexec_equivalent(tmp_path):
    dest = write_build_script(tmp_path / "build.sh", "model.onnx", "model.fp16.plan", EngineSpec("fp16", SIZE, 1, 8, 32))
    text = dest.read_text()
    assert dest.stat().st_mode & stat.S_IXUSR
    assert text.startswith("#!/usr/bin/env bash\n")
    command = text[text.index("\ntrtexec"):].replace("\\\n", " ").split()
    assert command == [
        "trtexec", "--onnx=model.onnx", "--saveEngine=model.fp16.plan",
        "--minShapes=input:1x3x64x64", "--optShapes=input:8x3x64x64", "--maxShapes=input:32x3x64x64",
        "--fp16", "--noTF32", "--memPoolSize=workspace:4096", "--timingCacheFile=timing.cache",
    ]
    int8 = write_build_script(tmp_path / "build.sh", "q.onnx", "q.plan", EngineSpec("int8", SIZE, 1, 1, 4),
                              force=True).read_text()
    assert "--stronglyTyped" in int8 and "--fp16" not in int8
    with pytest.raises(UsageError, match="exists; pass --force"):
        write_build_script(tmp_path / "build.sh", "q.onnx", "q.plan", EngineSpec("int8", SIZE, 1, 1, 4))
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        EngineSpec("fp32", SIZE, 4, 2, 8)


# --------------------------------------------------------------------------------------------------------
# TensorRT, where it exists
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def trt_ready():
    reason = tensorrt_status()
    if reason is not None:
        pytest.skip(reason)
    from runtimes.trt import require_tensorrt

    return require_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_eager(trt_ready, onnx_path, images, reference, tmp_path, precision):
    from runtimes.trt import EngineBuildError, EngineSpec, TensorRTRunner, build_engine

    plan, cache = tmp_path / f"model.{precision}.plan", tmp_path / "timing.cache"
    spec = EngineSpec(precision, SIZE, min_batch=1, opt_batch=2, max_batch=4, timing_cache=cache)
    if precision == "fp16" and not hasattr(trt_ready.BuilderFlag, "FP16"):
        with pytest.raises(EngineBuildError, match="modelopt.onnx.autocast"):
            build_engine(onnx_path, plan, spec)
        return
    info = build_engine(onnx_path, plan, spec)
    assert info["engine_precision"] == precision and info["batch"] == {"min": 1, "opt": 2, "max": 4}
    assert info["tf32"] is False and cache.stat().st_size > 0
    with pytest.raises(UsageError, match="exists; pass --force"):
        build_engine(onnx_path, plan, spec)

    runner = TensorRTRunner(plan, precision=precision)
    assert isinstance(runner, Runner) and runner.name == f"tensorrt:cuda:{precision}"
    assert list(runner.inputs) == [INPUT_SPEC] and list(runner.outputs) == [OUTPUT_SPEC]
    assert runner.options["batch_range"] == [1, 4]
    tol = TRT_FP32_ABS_TOL if precision == "fp32" else TRT_FP16_REL_TOL * float(np.abs(reference).max())
    for batch in (1, 3):
        out = runner.run({INPUT_NAME: images[:batch]})[OUTPUT_NAME]
        assert out.shape == (batch, CLASSES)
        assert np.abs(out - reference[:batch]).max() <= tol
    five = np.concatenate([images, images[:2]])
    with pytest.raises(InputError, match="was built for batches 1 to 4"):
        runner.run({INPUT_NAME: five})
    assert feed_error(runner, BAD_FEEDS["float64"][0](images[:1])) == BAD_FEEDS["float64"][1]
    runner.close()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_corrupt_engine_asks_for_a_rebuild(trt_ready, tmp_path):
    from runtimes.trt import TensorRTRunner

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00" * 4096)
    with pytest.raises(ArtifactError, match=r"could not load the engine .*deploy export --backends tensorrt --force"):
        TensorRTRunner(plan, precision="fp32")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_int8_needs_a_qdq_onnx(trt_ready, onnx_path, tmp_path):
    from runtimes.trt import EngineBuildError, EngineSpec, build_engine

    with pytest.raises(EngineBuildError, match="no QuantizeLinear/DequantizeLinear nodes"):
        build_engine(onnx_path, tmp_path / "m.plan", EngineSpec("int8", SIZE))


def test_openvino_compiles_each_batch_size_as_a_static_shape_and_keeps_four(tmp_path):
    runner = OpenVINORunner(tiny_onnx(tmp_path / "tiny.onnx"))
    assert runner.inputs[0].shape == (None, 3, 4, 4)
    for batch in (1, 2, 3, 4, 5, 3):
        x = np.linspace(-1, 1, batch * 3 * 4 * 4, dtype=np.float32).reshape(batch, 3, 4, 4)
        np.testing.assert_array_equal(runner.run({INPUT_NAME: x})[OUTPUT_NAME], np.maximum(x, 0))
    assert runner.compiled_batches() == [2, 4, 5, 3]  # 1 evicted; 3 used last
    compiled, _ = runner._shapes.get(5)
    assert compiled.inputs[0].get_partial_shape().is_static
    assert list(compiled.inputs[0].get_shape()) == [5, 3, 4, 4]
