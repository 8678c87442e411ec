"""The backend registry: a new backend is one module and one `register` line, and manifests of format 1 (written
before schemes and targets were fields of their own) still load, validate, bench and predict."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deploy import backends
from deploy.backends import BuildContext, Int8Inputs, RunnerOptions
from deploy.cli import main
from export.manifest import Artifact, Manifest
from partialnet.errors import DeployError, UsageError
from partialnet.files import file_sha256
from runtimes.ort import OrtRunner

DATA = Path(__file__).parents[1] / "data"
TINY = DATA / "official" / "tiny_gelu_sp.ckpt"


class ToyRuntime:
    """A backend written the way a new one would be: its artifact is a copy of the reference ONNX in toy/,
    run by ONNX Runtime, with `offset` added to every logit (0: exact)."""

    makes_artifacts = True
    float_precisions = ("fp32",)
    runs_reference_onnx = False
    builds_offline = False

    def __init__(self, name: str = "toyrt", offset: float = 0.0):
        self.name, self.offset = name, offset

    def status(self) -> str | None:
        return None

    def build(self, ctx: BuildContext, precision: str) -> Artifact:
        (ctx.folder / "toy").mkdir(exist_ok=True)
        shutil.copyfile(ctx.onnx, ctx.folder / "toy" / "model.onnx")
        return ctx.artifact("toy/model.onnx", self.name, precision)

    def build_int8(self, ctx: BuildContext, q: Int8Inputs) -> list:
        raise DeployError("toyrt has no INT8")

    def prepare_offline(self, ctx: BuildContext, precisions: list[str]) -> None:
        return None

    def triton_model(self, art: Artifact):
        return None  # no Triton backend runs it: `deploy triton` writes only the Python-backend models

    def open_streams(self, path: Path, precision: str, options: RunnerOptions, streams: int | None):
        from runtimes.throughput import ThreadedStreams

        runner = self.open(path, precision, options)
        return ThreadedStreams([runner.run], {"threads": options.threads}, runner.close)

    def open(self, path: Path, precision: str, options: RunnerOptions):
        runner, offset = OrtRunner(path, precision=precision, threads=options.threads), self.offset
        real = runner.run
        runner.run = lambda feeds: {k: v + offset for k, v in real(feeds).items()}  # type: ignore[method-assign]
        runner.name = f"{self.name}:cpu:{precision}"
        return runner


@pytest.fixture
def toy():
    backend = backends.register(ToyRuntime())
    yield backend
    backends.unregister(backend.name)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_toy_backend_registered_from_a_test_is_built_checked_validated_and_predicted(toy, tmp_path, capsys):
    assert isinstance(toy, backends.Backend)
    out = tmp_path / "export"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64", "--output",
                     str(out), "--backends", "onnxruntime,toyrt", "--no-bench", "-q")
    assert rc == 0, err
    manifest = Manifest.load(out)
    assert [a.key for a in manifest.artifacts] == ["onnxruntime/fp32", "toyrt/fp32"]
    report = json.loads((out / "report.json").read_text())
    gates = {g["name"]: g["passed"] for g in report["gates"]}
    assert gates["toyrt fp32 vs eager (batch 1)"] and gates["validate: toyrt fp32 vs eager: fp32 tolerance"]
    assert report["sections"]["backend_checks"]["toyrt/fp32"]["batch_8"]["drift"]["max_abs_logit_error"] < 1e-4

    rc, stdout, _ = run(capsys, "validate", str(out), "--json", "-q")
    rows = {r["key"]: r for r in json.loads(stdout)["artifacts"]}
    assert rc == 0 and rows["toyrt/fp32"]["runner"] == "toyrt:cpu:fp32" and rows["toyrt/fp32"]["passed"]

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for name in ("onnxruntime", "toyrt"):
        rc, _, err = run(capsys, "predict", str(out), "--backend", name, "--inputs", str(tmp_path / "x.npy"),
                         "--save-logits", str(tmp_path / f"{name}.npy"), "-q")
        assert rc == 0, err
    assert np.array_equal(np.load(tmp_path / "toyrt.npy"), np.load(tmp_path / "onnxruntime.npy"))


def test_a_backend_that_drifts_fails_its_gate(tmp_path, capsys):
    backends.register(ToyRuntime("drifty", offset=0.5))
    try:
        out = tmp_path / "export"
        rc, _, err = run(capsys, "export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64",
                         "--output", str(out), "--backends", "drifty", "--no-bench", "--no-validate", "-q")
    finally:
        backends.unregister("drifty")
    assert rc == 3
    report = json.loads((out / "report.json").read_text())
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["drifty fp32 vs eager (batch 1)", "drifty fp32 vs eager (batch 8)"]
    assert "max |logit error| 0.5 exceeds" in failed[0]["failures"][0]


def test_unknown_backends_are_named_with_the_registry():
    with pytest.raises(UsageError, match=r"unknown backend\(s\) coreml; choose from onnxruntime, openvino, tensorrt\."):
        backends.parse_backends("onnxruntime,coreml")


# --------------------------------------------------------------------------- manifest format 1


@pytest.mark.slow
def test_a_format_1_folder_still_validates_benches_and_predicts(tmp_path, capsys):
    """Today's export, with its manifest replaced by the one format 1 wrote for the same layout (hashes of these
    files put in): every command reads it, and `--precision int8-qdq` still finds the TensorRT Q/DQ ONNX."""
    out = tmp_path / "old"
    rc, _, err = run(capsys, "export", "partialnet_t0", "--input-size", "64", "--int8", "--backends",
                     "onnxruntime,openvino,tensorrt", "--output", str(out), "--no-bench", "--no-validate", "-q")
    assert rc == 0, err
    v1 = json.loads((DATA / "manifest-v1.json").read_text())
    for a in v1["artifacts"]:
        a["sha256"], a["bytes"] = file_sha256(out / a["path"]), (out / a["path"]).stat().st_size
        if "weights" in a:
            a["weights_sha256"] = file_sha256(out / a["weights"])
    (out / "manifest.json").write_text(json.dumps(v1))

    rc, stdout, err = run(capsys, "validate", str(out), "--json", "-q")
    assert rc == 0, err
    keys = [r["key"] for r in json.loads(stdout)["artifacts"]]
    assert keys == ["eager", "onnxruntime/fp32", "openvino/fp32", "onnxruntime/int8", "openvino/int8",
                    "onnxruntime/int8@tensorrt"]
    rc, stdout, err = run(capsys, "bench", str(out), "--json", "--batch-sizes", "1", "--warmup-s", "0.02",
                          "--duration-s", "0.05", "-q")
    assert rc == 0, err
    assert len(json.loads(stdout)["rows"]) == 6
    x = np.zeros((1, 3, 64, 64), np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run(capsys, "predict", str(out), "--backend", "onnxruntime", "--precision", "int8-qdq",
                     "--inputs", str(tmp_path / "x.npy"), "-q")
    assert rc == 0, err
