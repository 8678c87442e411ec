"""Bring your own model: `deploy export FILE.py:FACTORY --weights W`, the manifest's record of the file, and the
rebuild that refuses a changed file. The slow test is the reviewers' check, run exactly as they run it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploy.cli import main
from helpers import randomize_
from partialnet.errors import UsageError
from partialnet.factory import build_from_factory, rebuild
from partialnet.files import file_sha256

REPO = Path(__file__).resolve().parents[2]
MYNET = REPO / "tests" / "data" / "mynet.py"
RTOL = 1e-4  # FP32 logits against the user's own eager forward, relative to the largest logit


def load_user_file(path: Path):
    """The user's model module, imported the way the user's own script would (not through this tool)."""
    spec = importlib.util.spec_from_file_location(f"user_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_model(folder: Path, seed: int = 5):
    """mynet.py copied to an arbitrary folder, a model with randomized BatchNorms, and its weights saved there."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MYNET, folder / "mynet.py")
    model = randomize_(load_user_file(folder / "mynet.py").build(num_classes=10), seed).eval()
    torch.save(model.state_dict(), folder / "mynet.pth")
    return folder / "mynet.py", folder / "mynet.pth", model


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def fresh_process(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """`deploy ...` in a new interpreter: nothing of the export's process (its imported user module) is left."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "deploy.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.slow
def test_the_reviewers_check(tmp_path, capsys):
    src, weights, model = user_model(tmp_path / "x")
    out = tmp_path / "D"
    rc, _, _ = run(capsys, "export", f"{src}:build", "--weights", weights, "--input-size", 64, "--int8",
                   "--output", out, "-q")
    assert rc in (0, 3)
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for backend in ("onnxruntime", "openvino"):
        y = tmp_path / f"y_{backend}.npy"
        rc, _, err = run(capsys, "predict", out, "--backend", backend, "--inputs", tmp_path / "x.npy",
                         "--save-logits", y, "-q")
        assert rc == 0, err
        assert relative_error(np.load(y), ref) < RTOL
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(out / "model.onnx").graph.node) == 0
    rc, stdout, err = run(capsys, "validate", out, "--json", "-q")  # a new process rebuilds it: the FP32 test
    assert rc in (0, 3), err
    int8 = {r["backend"] for r in json.loads(stdout)["artifacts"] if r["precision"] == "int8"}
    assert {"onnxruntime", "openvino"} <= int8


def test_fp32_export_records_the_file_and_the_rebuild_refuses_a_changed_or_missing_one(tmp_path, capsys):
    src, weights, model = user_model(tmp_path / "elsewhere" / "models")
    out = tmp_path / "D"
    rc, _, err = run(capsys, "export", f"{src}:build", "--weights", weights, "--input-size", 32, "--backends",
                     "onnxruntime", "--no-validate", "--no-bench", "--output", out, "-q")
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert (source["kind"], source["file"], source["factory"]) == ("factory", str(src), "build")
    assert source["file_sha256"] == file_sha256(src) and source["weights_sha256"] == file_sha256(weights)
    assert manifest["variant"] == "mynet.build" and manifest["num_classes"] == 10
    folds = json.loads((out / "report.json").read_text())["sections"]["reparameterization"]
    assert folds["batchnorms"] == 5 and folds["affines_left"] == 0
    assert folds["folds"] == {"bn_cat_conv": 1, "conv_bn": 4}  # the gated BN through the concat into mix

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = fresh_process("predict", out, "--backend", "eager", "--inputs", tmp_path / "x.npy", "--save-logits",
                         tmp_path / "eager.npy", "-q", cwd=tmp_path)  # rebuilt from the file in a new process
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        assert relative_error(np.load(tmp_path / "eager.npy"), model(torch.from_numpy(x)).numpy()) < 1e-6

    src.write_text(src.read_text() + "\n# edited after the export\n")
    rc, _, err = run(capsys, "validate", out, "-q")
    assert rc == 1
    assert one_line(err).startswith(f"deploy: error: {src} changed since the export (sha256 ")
    src.unlink()
    rc, _, err = run(capsys, "predict", out, "--backend", "eager", "--inputs", tmp_path / "x.npy", "-q")
    assert rc == 1 and f"the export's model file {src} is gone" in one_line(err)


def test_bad_factories_and_weights_are_one_line_usage_errors(tmp_path, capsys):
    src, weights, _ = user_model(tmp_path / "m")
    cases = [
        (f"{tmp_path}/nope.py:build", [], f"{tmp_path}/nope.py does not exist"),
        (f"{src}:make", [], f"{src} has no callable 'make'; it defines: CBAM, CoordAtt, ECA, MyNet, PartialBlock, "
                            f"build, conv_bn."),
        (f"{src}:build", ["--checkpoint", weights], "--checkpoint and --(no-)spatial-attn apply to PartialNet"),
        ("partialnet_t0", ["--weights", weights], "--weights loads a state dict into a factory's model"),
        ("partialnet.zoo:patconv", ["--num-classes", 3], "partialnet.zoo:patconv takes no num_classes argument"),
    ]
    for target, extra, expected in cases:
        rc, _, err = run(capsys, "export", target, *extra, "--output", tmp_path / "out", "-q")
        assert rc == 2 and expected in one_line(err), err
    torch.save(load_user_file(src).build(num_classes=5).state_dict(), tmp_path / "five.pth")
    rc, _, err = run(capsys, "export", f"{src}:build", "--weights", tmp_path / "five.pth", "--output", tmp_path / "o")
    line = one_line(err)
    assert rc == 1 and f"weights {tmp_path / 'five.pth'} does not match the architecture (" in line
    assert "Wrong shape 2: fc.weight: checkpoint [5, 64], model [10, 64]; fc.bias" in line


def test_untraceable_model_is_one_line_naming_the_module(tmp_path, capsys):
    (tmp_path / "branchy.py").write_text(
        "import torch\n\nclass Gate(torch.nn.Module):\n    def forward(self, x):\n"
        "        if x.mean() > 0:\n            return x\n        return -x\n\n"
        "class Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3)\n        self.gate = Gate()\n"
        "    def forward(self, x):\n        return self.gate(self.conv(x)).mean((2, 3))\n\n"
        "def build():\n    return Net()\n")
    rc, _, err = run(capsys, "export", f"{tmp_path / 'branchy.py'}:build", "--input-size", 32, "--output",
                     tmp_path / "o", "--backends", "onnxruntime", "-q")
    assert rc == 1
    assert one_line(err) == ("deploy: error: cannot export gate (Gate): its forward branches or loops on a tensor's "
                             "value (data-dependent control flow), which one static ONNX graph cannot express at "
                             "branchy.py:5 `if x.mean() > 0:`; compute both branches and select with torch.where, "
                             "or decide from constructor arguments.")


def test_package_module_factory_with_num_classes_rebuilds_the_same_model():
    fm = build_from_factory("partialnet.attention:eca_cnn", num_classes=3, input_size=32)
    assert fm.num_classes == 3 and fm.source["module"] == "partialnet.attention" and fm.source["file"] is None
    again = rebuild(fm.source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fm.model(x), again(x))
    with pytest.raises(UsageError) as e:
        build_from_factory("torch.nn:Identity", input_size=32)  # a module, but no classifier
    assert str(e.value) == "torch.nn:Identity's model returns (1, 3, 32, 32); a classifier returns logits [batch, classes]."
