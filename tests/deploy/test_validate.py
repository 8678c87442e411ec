"""`deploy validate`: the JSON document, accuracy with labels, paired statistics, drift decomposition and gates."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from deploy.cli import main
from deploy.validate import PairedComparison, mcnemar_exact, paired_bootstrap_ci
from helpers import noise_class_folders

DATA = Path(__file__).parents[1] / "data" / "official"
TINY = DATA / "tiny_gelu_sp.ckpt"
ARTIFACT_KEYS = {"backend", "precision", "top1", "top5", "top1_agreement", "top5_overlap", "max_abs_logit_error",
                 "mean_abs_logit_error", "cosine_similarity", "mean_kl", "passed", "failures", "runner", "paired"}


@pytest.fixture(scope="module")
def folder(tiny_export) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Three class subfolders of noise PNGs; class names sort as ants < bees < cats, so labels are 0, 1, 2."""
    return noise_class_folders(tmp_path_factory.mktemp("labelled"), ("cats", "ants", "bees"), 4, seed=0)


def validate(capsys, folder, *extra) -> tuple[int, dict, str]:
    rc = main(["validate", str(folder), "--json", "--samples", "8", *extra])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def test_json_without_labels_has_eager_and_every_artifact(folder, capsys):
    rc, doc, err = validate(capsys, folder)
    assert rc == 0 and doc["passed"] is True and doc["failures"] == []
    assert {"artifacts", "data", "gates", "decomposition", "environment", "passed"} <= set(doc)
    eager, *arts = doc["artifacts"]
    assert eager["backend"] == "eager" and eager["top1"] is None and eager["max_abs_logit_error"] == 0.0
    assert [(a["backend"], a["precision"]) for a in arts] == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    for a in arts:
        assert ARTIFACT_KEYS <= set(a)
        assert a["top1"] is None and a["paired"] is None and a["passed"] is True
        assert a["top1_agreement"] == 1.0 and a["max_abs_logit_error"] <= a["abs_limit"]
    assert doc["data"] == {**doc["data"], "labelled": False, "user_data": False, "samples": 8}
    assert doc["data"]["source"].startswith("embedded default")
    assert "no labels, so accuracy is not measured" in err
    assert json.loads((folder / "validation.json").read_text()) == doc
    md = (folder / "validation.md").read_text()
    assert "| onnxruntime | fp32 |" in md and "Result: **PASSED**" in md


def test_labelled_folder_gives_accuracy_and_paired_tests(folder, labelled, capsys):
    from calibration.sources import load_images
    import torch

    from deploy.reference import eager_from_manifest
    from export.manifest import Manifest
    from partialnet.variants import Preprocess

    rc, doc, err = validate(capsys, folder, "--data", str(labelled), "--samples", "12")
    assert rc == 0 and doc["data"]["labelled"] and doc["data"]["class_names"] == ["ants", "bees", "cats"]
    assert "3 class subfolders for a 10-class model" in err

    manifest = Manifest.load(folder)
    images = load_images(labelled, Preprocess.from_dict(manifest.preprocess))
    with torch.inference_mode():
        logits = eager_from_manifest(manifest)(torch.from_numpy(images.images)).numpy()
    expected = float((logits.argmax(1) == images.labels).mean())
    eager, *arts = doc["artifacts"]
    assert eager["top1"] == pytest.approx(expected, abs=1e-12)
    for a in arts:
        assert 0.0 <= a["top1"] <= a["top5"] <= 1.0 and (a["top1"] * 12) == pytest.approx(round(a["top1"] * 12))
        p = a["paired"]["top1"]
        assert p["samples"] == 12 and p["difference"] == pytest.approx(a["top1"] - eager["top1"])
        assert p["mcnemar_p"] == mcnemar_exact(p["reference_only"], p["candidate_only"])
        lo, hi = p["bootstrap_ci95"]
        assert lo <= p["difference"] <= hi
        assert a["top1_drop_points"] == pytest.approx((eager["top1"] - a["top1"]) * 100)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    # b=2, c=9: 2 * P(X <= 2), X ~ Bin(11, 1/2) = 2 * (1 + 11 + 55) / 2**11
    assert mcnemar_exact(2, 9) == 134 / 2048 == mcnemar_exact(9, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 40) == 2 * 0.5**40
    direct = 2 * sum(math.comb(30, i) for i in range(8)) / 2**30
    assert mcnemar_exact(7, 23) == pytest.approx(direct, rel=1e-15)
    stats = pytest.importorskip("scipy.stats")
    assert mcnemar_exact(7, 23) == pytest.approx(stats.binomtest(7, 30, 0.5).pvalue, rel=1e-12)


def test_paired_comparison_counts_the_discordant_images():
    ref = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    cand = np.array([1, 0, 0, 0, 1, 1, 0, 0], bool)
    p = PairedComparison.of(ref, cand, seed=3)
    assert (p.reference_only, p.candidate_only, p.reference_correct, p.candidate_correct) == (3, 1, 5, 3)
    assert p.difference == -0.25 and p.mcnemar_p == mcnemar_exact(3, 1) == 0.625
    assert PairedComparison.of(ref, cand, seed=3) == p  # seeded: the same CI every time
    same = PairedComparison.of(ref, ref)
    assert same.mcnemar_p == 1.0 and same.bootstrap_ci95 == (0.0, 0.0)


def test_bootstrap_ci_matches_resampling_the_images():
    n, b, c = 200, 20, 4  # 20 images right only in the reference, 4 only in the candidate
    d = np.zeros(n)
    d[:b], d[b : b + c] = -1, 1
    rng = np.random.default_rng(1)
    brute = d[rng.integers(0, n, (20_000, n))].mean(axis=1)
    lo, hi = paired_bootstrap_ci(b, c, n, seed=0, resamples=20_000)
    assert lo == pytest.approx(np.percentile(brute, 2.5), abs=0.006)
    assert hi == pytest.approx(np.percentile(brute, 97.5), abs=0.006)
    assert lo < -0.08 < hi < 0


def test_decomposition_splits_export_runtime_and_quantization(folder, tmp_path, capsys):
    copy = tmp_path / "with_int8"
    shutil.copytree(folder, copy)
    m = json.loads((copy / "manifest.json").read_text())
    onnx_row = next(a for a in m["artifacts"] if a["backend"] == "onnxruntime")
    m["artifacts"].append({**onnx_row, "precision": "int8", "role": "stand-in: the FP32 file read as an INT8 row"})
    (copy / "manifest.json").write_text(json.dumps(m))

    rc, doc, _ = validate(capsys, copy)
    assert rc == 0
    dec = doc["decomposition"]
    assert [(s["reference"], s["candidate"]) for s in dec["export"]] == [("eager", "onnxruntime/fp32")]
    assert [(s["reference"], s["candidate"]) for s in dec["runtime"]] == [("onnxruntime/fp32", "openvino/fp32")]
    [q] = dec["quantization"]
    assert (q["reference"], q["candidate"]) == ("onnxruntime/fp32", "onnxruntime/int8")
    assert q["max_abs_logit_error"] == 0.0 and q["top1_agreement"] == 1.0
    [int8] = [a for a in doc["artifacts"] if a["precision"] == "int8"]
    rule = int8["tolerance"].pop("rule")
    assert int8["tolerance"] == {"min_decided_top1_agreement": 0.9, "min_cosine": 0.97, "noise_multiple": 4.0}
    assert "on the images whose eager top-1 margin exceeds 3 x sqrt(2) x the artifact's logit noise" in rule
    assert doc["decomposition"]["export"][0]["max_abs_logit_error"] == doc["artifacts"][1]["max_abs_logit_error"]


def test_min_agreement_above_one_fails_every_artifact_with_exit_3(folder, capsys):
    rc, doc, err = validate(capsys, folder, "--min-agreement", "1.01", "--quiet")
    assert rc == 3 and doc["passed"] is False and err == ""
    eager, *arts = doc["artifacts"]
    assert eager["passed"] is True and all(not a["passed"] for a in arts)
    assert doc["failures"] == [
        f"{a['backend']} fp32 vs eager: --min-agreement 1.01: top-1 agreement 1.0000 is below --min-agreement 1.01"
        for a in arts]


def test_a_corrupted_runner_fails_its_tolerance_gate(folder, capsys, monkeypatch):
    from runtimes.ort import OrtRunner

    original = OrtRunner.run

    def reversed_classes(self, feeds):
        return {k: np.ascontiguousarray(v[:, ::-1]) for k, v in original(self, feeds).items()}

    monkeypatch.setattr(OrtRunner, "run", reversed_classes)
    rc, doc, err = validate(capsys, folder)
    assert rc == 3 and not doc["passed"]
    by_backend = {a["backend"]: a for a in doc["artifacts"]}
    assert by_backend["openvino"]["passed"] and not by_backend["onnxruntime"]["passed"]
    assert by_backend["onnxruntime"]["max_abs_logit_error"] > by_backend["onnxruntime"]["abs_limit"]
    [gate] = [g for g in doc["gates"] if not g["passed"]]
    assert gate["name"] == "onnxruntime fp32 vs eager: fp32 tolerance"
    assert gate["failures"][0].startswith("max |logit error|")
    assert "validation failed: onnxruntime fp32 vs eager: fp32 tolerance" in err


def test_max_top1_drop_needs_labels(folder, capsys):
    rc = main(["validate", str(folder), "--max-top1-drop", "1.0"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("deploy: error: --max-top1-drop needs labelled images")


def test_backends_filter_and_errors(folder, capsys):
    rc, doc, _ = validate(capsys, folder, "--backends", "openvino")
    assert rc == 0 and [a["backend"] for a in doc["artifacts"]] == ["eager", "openvino"]
    assert doc["decomposition"]["export"] == [] and "reference ONNX" in doc["decomposition"]["notes"][0]
    rc = main(["validate", str(folder), "--backends", "openvino,tensorflow"])
    assert rc == 2 and "unknown backend(s) tensorflow" in capsys.readouterr().err
    rc = main(["validate", str(folder), "--backends", "tensorrt"])
    assert rc == 1 and "no tensorrt artifact (it has: onnxruntime/fp32, openvino/fp32)" in capsys.readouterr().err


def test_readable_table_without_json(folder, capsys):
    rc = main(["validate", str(folder), "--samples", "4", "-q"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert rc == 0 and err == ""
    assert lines[1].split()[:3] == ["backend", "precision", "agreement"]
    assert lines[2].split()[:2] == ["eager", "fp32"] and lines[-1] == "PASSED"
    assert any(line.strip().startswith("export") and "eager -> onnxruntime/fp32" in line for line in lines)
