"""`deploy export --int8` end to end, and `deploy validate` on held-out real images (the acceptance path)."""
from __future__ import annotations

import json

import pytest

from deploy.cli import main


@pytest.mark.slow
def test_export_int8_on_real_digits_loses_at_most_one_point(tmp_path, capsys):
    from realdata import digits_fixture

    fx = digits_fixture()
    out = tmp_path / "digits"
    rc = main(["export", fx.variant, "--checkpoint", str(fx.checkpoint), "--input-size", str(fx.input_size), "--int8",
               "--calib-data", str(fx.train_dir), "--calib-size", "256", "--output", str(out), "-q", "--no-bench"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    rows = {(a["backend"], a["precision"]) for a in m["artifacts"]}
    assert {("onnxruntime", "int8"), ("openvino", "int8")} <= rows
    report = json.loads((out / "report.json").read_text())
    assert report["sections"]["int8"]["calibrated_on_user_data"] is True
    assert report["sections"]["int8"]["calibration"]["size"] == 256
    capsys.readouterr()

    rc = main(["validate", str(out), "--data", str(fx.test_dir), "--json", "-q"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    by = {(a["backend"], a["precision"]): a for a in doc["artifacts"]}
    assert by[("eager", "fp32")]["top1"] == pytest.approx(fx.eager_top1, abs=1e-12)  # as measured at training time
    for key in (("onnxruntime", "int8"), ("openvino", "int8")):
        assert by[key]["top1"] >= fx.eager_top1 - 0.01, key  # at most one point of top-1 lost


def test_int8_flags_need_int8(capsys):
    rc = main(["export", "partialnet_t0", "--calib-data", "somewhere"])
    assert rc == 2 and "add --int8" in capsys.readouterr().err


def test_default_calibration_is_said_plainly(tmp_path, capsys):
    out = tmp_path / "t"
    rc = main(["export", "partialnet_t0", "--checkpoint", "tests/data/official/tiny_gelu_sp.ckpt", "--input-size", "64",
               "--int8", "--backends", "onnxruntime", "--output", str(out), "--no-bench", "--no-validate"])
    err = capsys.readouterr().err
    assert rc == 0 and "NOT on your data" in err
    section = json.loads((out / "report.json").read_text())["sections"]["int8"]
    assert section["calibrated_on_user_data"] is False and "not on the user's data" in section["warning"]
