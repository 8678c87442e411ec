"""export/manifest.py: the artifact rows of format 2 (precision, scheme, target), the upgrade of format 1, and the
--precision names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.manifest import FORMAT_VERSION, Artifact, parse_precision, upgrade
from partialnet.errors import DeployError, UsageError

DATA = Path(__file__).parents[1] / "data"


def test_format_1_rows_upgrade_to_precision_scheme_and_target():
    v1 = json.loads((DATA / "manifest-v1.json").read_text())
    assert v1["format_version"] == 1
    d = upgrade(v1)
    assert d["format_version"] == FORMAT_VERSION and v1["artifacts"][4]["precision"] == "int8-qdq"  # input untouched
    rows = [(a["backend"], a["precision"], a["scheme"], a["target"], a["path"]) for a in d["artifacts"]]
    assert rows == [
        ("onnxruntime", "fp32", None, None, "model.onnx"),
        ("openvino", "fp32", None, None, "openvino/model.xml"),
        ("onnxruntime", "int8", "qdq", None, "model.int8.onnx"),
        ("openvino", "int8", "nncf", None, "openvino/model.int8.xml"),
        ("onnxruntime", "int8", "qdq-symmetric", "tensorrt", "tensorrt/model.qdq.onnx"),
    ]
    assert all("target_backend" not in a for a in d["artifacts"])
    assert {s["precision"] for s in d["skipped"]} <= {"*", "int8"}
    keys = [Artifact.from_dict(a).key for a in d["artifacts"]]
    assert keys == ["onnxruntime/fp32", "openvino/fp32", "onnxruntime/int8", "openvino/int8",
                    "onnxruntime/int8@tensorrt"]


def test_a_newer_format_is_refused():
    with pytest.raises(DeployError, match="format version 99, newer than this deploy reads"):
        upgrade({"format_version": 99, "artifacts": []})


@pytest.mark.parametrize("text, parsed", [
    ("int8", ("int8", None, None)), ("int8@tensorrt", ("int8", "tensorrt", None)),
    ("int8+entropy", ("int8", None, "entropy")), ("int8-qdq", ("int8", None, "qdq-symmetric")),
    ("int8-entropy", ("int8", None, "entropy")), ("bf16", ("bf16", None, None)),
])
def test_precisions_parse(text, parsed):
    assert parse_precision(text) == parsed


def test_a_bad_precision_is_a_usage_error():
    with pytest.raises(UsageError, match=r"precision 'int4' is not one of fp32, fp16, bf16, int8"):
        parse_precision("int4")
