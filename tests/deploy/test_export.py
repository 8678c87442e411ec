"""`deploy export`: the folder it writes, the graph it emits, and its check against eager."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deploy.cli import main
from partialnet.files import file_sha256

DATA = Path(__file__).parents[1] / "data" / "official"
TINY = DATA / "tiny_gelu_sp.ckpt"


def _export(tmp_path, *extra, name="out", full=False):
    out = tmp_path / name
    quick = [] if full else ["--no-validate", "--no-bench"]
    rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64", "--output", str(out), "-q",
               *quick, *extra])
    return rc, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    rc, out = _export(tmp, full=True)
    assert rc == 0
    return out


def test_folder_layout_and_manifest(exported):
    # default backends: every one usable here (onnxruntime, openvino; TensorRT needs a GPU and is not requested)
    assert sorted(p.name for p in exported.iterdir()) == [
        "bench.json", "bench.md", "bench.png", "manifest.json", "model.onnx", "openvino", "report.json", "report.md",
        "validation.json", "validation.md"]
    m = json.loads((exported / "manifest.json").read_text())
    assert (m["variant"], m["input_size"], m["num_classes"]) == ("partialnet_t0", 64, 10)
    assert m["checkpoint_sha256"] == file_sha256(TINY)
    assert m["preprocess"]["resize_size"] == 71 and m["preprocess"]["interpolation"] == "bicubic"
    art = m["artifacts"][0]
    assert (art["backend"], art["precision"], art["path"]) == ("onnxruntime", "fp32", "model.onnx")
    assert [(a["backend"], a["precision"]) for a in m["artifacts"][1:]] == [("openvino", "fp32")]
    assert art["sha256"] == file_sha256(exported / "model.onnx")


def test_onnx_graph_is_reparameterized_with_metadata(exported):
    proto = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert "BatchNormalization" not in ops and "HardSigmoid" not in ops
    # tiny: depths 1-1-2-1 = 5 blocks with PAT_sp; per block one 3x3 and two 1x1 convs, the SRM gate's 1x1 conv
    # over [mean; std] (2C -> C) in 4 blocks, patch embed + 3 merges + the head's 1x1 conv.
    inits = {t.name: t for t in proto.graph.initializer}
    shapes = [tuple(inits[n.input[1]].dims) for n in proto.graph.node if n.op_type == "Conv"]
    one_by_one = [s for s in shapes if s[2:] == (1, 1)]
    assert len(one_by_one) == 2 * 5 + 4 + 1
    assert not [s for s in shapes if s[2:] == (1, 2)]  # no (1, 2) kernel left
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["partialnet.variant"] == "partialnet_t0" and meta["partialnet.input_size"] == "64"
    assert meta["partialnet.checkpoint_sha256"] == file_sha256(TINY)
    assert json.loads(meta["partialnet.preprocess"])["input_size"] == 64
    assert "onnxruntime" in json.loads(meta["partialnet.tool_versions"])
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]


@pytest.mark.parametrize("batch", [1, 2])
def test_onnx_reproduces_official_logits(exported, batch):
    sess = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(DATA / "x64.npy")[:batch]
    ref = np.load(DATA / "tiny_gelu_sp_x64_logits.npy")[:batch]
    got = sess.run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-4  # the official-checkpoint acceptance tolerance


def test_report_records_reparam_and_check(exported):
    r = json.loads((exported / "report.json").read_text())
    # onnxruntime + openvino at 2 batch sizes, then deploy validate's gate for each of the 2 artifacts
    assert r["passed"] is True and [g["passed"] for g in r["gates"]] == [True] * 6
    assert {a["backend"] for a in r["sections"]["validation"]["artifacts"]} == {"eager", "onnxruntime", "openvino"}
    assert [row["backend"] for row in r["sections"]["latency"]["rows"]] == ["eager", "onnxruntime", "openvino"]
    rep = r["sections"]["reparameterization"]
    assert rep["spatial_attn_merged"] == 5 and rep["batchnorms_folded"] > 0
    assert rep["macs_after"] < rep["macs_before"] and rep["params_after"] < rep["params_before"]
    assert rep["onnx"]["final"]["nodes"] < rep["onnx"]["without_reparam"]["nodes"]
    assert rep["onnx"]["without_reparam"]["ops"]["BatchNormalization"] > 0
    assert rep["onnx"]["simplify"]["applied"] is True
    check = r["sections"]["post_export_check"]
    assert set(check) >= {"batch_1", "batch_8", "eager_fp32_vs_fp64", "tolerance"}
    assert "embedded default" in r["sections"]["inputs"]["check_set"]
    md = (exported / "report.md").read_text()
    assert "| onnxruntime fp32 vs eager (batch 1) | pass |" in md


def test_existing_folder_is_kept_without_force(exported, tmp_path, capsys):
    before = file_sha256(exported / "model.onnx")
    rc = main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64", "--output", str(exported)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists; pass --force" in err
    assert file_sha256(exported / "model.onnx") == before
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_force_replaces_and_no_reparam_keeps_batchnorm(tmp_path):
    rc, out = _export(tmp_path, "--no-reparam", "--no-simplify")
    assert rc == 0
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["BatchNormalization"] > 0
    r = json.loads((out / "report.json").read_text())
    assert r["sections"]["reparameterization"]["applied"] is False
    assert r["sections"]["reparameterization"]["onnx"]["simplify"] == {"applied": False, "reason": "--no-simplify"}
    rc, out = _export(tmp_path, "--force")
    assert rc == 0 and "BatchNormalization" not in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}


def test_drift_beyond_tolerance_exits_3_and_reports_by_how_much(tmp_path, monkeypatch, capsys):
    from runtimes.ort import OrtRunner

    real = OrtRunner.run
    monkeypatch.setattr(OrtRunner, "run", lambda self, feeds: {k: v + 0.5 for k, v in real(self, feeds).items()})
    rc, out = _export(tmp_path, "--no-simplify")
    assert rc == 3
    r = json.loads((out / "report.json").read_text())
    assert r["passed"] is False
    assert any("max |logit error| 0.5 exceeds" in f for g in r["gates"] for f in g["failures"])


def test_val_data_images_are_used_for_the_check(tmp_path):
    from PIL import Image

    data = tmp_path / "val"
    for cls in ("cat", "dog"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (90, 70), (40 * i, 100, 200 if cls == "cat" else 10)).save(data / cls / f"{i}.png")
    (data / "cat" / "broken.jpg").write_text("not an image")
    rc, out = _export(tmp_path, "--val-data", str(data))
    assert rc == 0
    inputs = json.loads((out / "report.json").read_text())["sections"]["inputs"]
    assert inputs["samples"] == 6 and inputs["skipped_images"] == 1 and "2 class subfolders" in inputs["check_set"]


def test_dynamo_exporter_also_works(tmp_path):
    rc, out = _export(tmp_path, "--exporter", "dynamo", "--no-simplify")
    assert rc == 0
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert "ScatterElements" not in ops and "BatchNormalization" not in ops
