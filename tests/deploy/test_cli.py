"""CLI exit codes and messages: 0 success, 2 usage error, 1 any other error, one line on stderr."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.cli import main

DATA = Path(__file__).parents[1] / "data" / "official"
TINY = str(DATA / "tiny_gelu_sp.ckpt")


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_shows_every_variant_with_params_and_macs(capsys):
    rc, out, err = run(["list", "--json"], capsys)
    rows = json.loads(out)
    assert rc == 0 and [r["variant"] for r in rows][0] == "partialnet_t0"
    t0 = rows[0]
    assert (t0["params_m"], t0["params_m_no_sp"], t0["macs_m_224"], t0["macs_m_224_no_sp"]) == (3.558, 3.486, 246.9, 235.4)


def test_info_reports_what_came_from_the_checkpoint(capsys):
    rc, out, _ = run(["info", "partialnet_t0", "--checkpoint", TINY, "--json", "-q"], capsys)
    info = json.loads(out)
    assert rc == 0
    assert info["architecture"]["embed_dim"] == 16 and info["architecture"]["num_classes"] == 10
    assert info["sources"]["act"] == "checkpoint hyper_parameters"
    assert info["checkpoint"]["format"] == "lightning" and len(info["checkpoint"]["sha256"]) == 64
    assert info["checkpoint"]["hyper_parameters"]["act_layer"] == "GELU"


def test_predict_images_topk_with_labels(tmp_path, capsys):
    imgs = []
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (80, 60), color).save(p)
        imgs.append(str(p))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class_{i}" for i in range(10)))
    logits = tmp_path / "y.npy"
    rc, out, err = run(["predict", "partialnet_t0", "--checkpoint", TINY, *imgs, "--topk", "3", "--labels", str(labels),
                        "--input-size", "64", "--save-logits", str(logits)], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(imgs[0] + ": ") and lines[0].count("class_") == 3
    y = np.load(logits)
    assert y.shape == (2, 10) and y.dtype == np.float32
    top = int(np.argmax(y[0]))
    assert f"{top} class_{top} (" in lines[0].split(": ", 1)[1].split(",")[0]


@pytest.mark.parametrize("argv,code,needle", [
    (["predict", "partialnet_t7"], 2, "unknown variant 'partialnet_t7'. Did you mean partialnet_t"),
    (["predict", "partialnet_t0", "--topk", "0"], 2, "expected a positive integer, got 0"),
    (["predict", "partialnet_t0", "--input-size", "100"], 2, "input size 100 is not a multiple of 32 (the last stage works on N/32 maps); try 96"),
    (["predict", "partialnet_t0"], 2, "nothing to predict"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["predict", "partialnet_t0", "--checkpoint", "/nonexistent.ckpt", "--inputs", "x.npy"], 1, "does not exist"),
])
def test_errors_are_one_line_with_the_right_code(argv, code, needle, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == code
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("deploy: error: ") and "Traceback" not in err


def test_inputs_npy_dtype_and_shape_errors(tmp_path, capsys):
    bad_dtype = tmp_path / "f64.npy"
    np.save(bad_dtype, np.zeros((1, 3, 64, 64)))
    rc, _, err = run(["predict", "partialnet_t0", "--checkpoint", TINY, "--inputs", str(bad_dtype)], capsys)
    assert rc == 2 and "has dtype float64; expected 'input' (float32 [batch, 3, any, any])" in err
    bad_shape = tmp_path / "hwc.npy"
    np.save(bad_shape, np.zeros((1, 64, 64, 3), np.float32))
    rc, _, err = run(["predict", "partialnet_t0", "--checkpoint", TINY, "--inputs", str(bad_shape)], capsys)
    assert rc == 2 and "has shape [1, 64, 64, 3]" in err and "multiple of 32" in err


def test_save_logits_is_not_overwritten_without_force(tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 64, 64), np.float32))
    y = tmp_path / "y.npy"
    y.write_bytes(b"keep me")
    rc, _, err = run(["predict", "partialnet_t0", "--checkpoint", TINY, "--inputs", str(x), "--save-logits", str(y)], capsys)
    assert rc == 2 and "exists; pass --force" in err and y.read_bytes() == b"keep me"
    rc, _, _ = run(["predict", "partialnet_t0", "--checkpoint", TINY, "--inputs", str(x), "--save-logits", str(y), "--force"], capsys)
    assert rc == 0 and np.load(y).shape == (1, 10)
    assert not list(tmp_path.glob(".y.npy.*"))  # no temporary file left behind


def test_traceback_flag_shows_the_stack(capsys):
    with pytest.raises(Exception):
        main(["predict", "partialnet_t0", "--checkpoint", "/nonexistent.ckpt", "--inputs", "x.npy", "--traceback"])


def test_mismatch_from_the_command_line_is_one_line(tmp_path, capsys):
    rc, _, err = run(["predict", "partialnet_t0", "--checkpoint", TINY, "--no-spatial-attn", "--inputs", "x.npy", "-q"], capsys)
    assert rc == 1 and "Unexpected" in err and "(PAT_sp)" in err and "drop --no-spatial-attn" in err
    assert err.count("\n") == 1


def test_console_script_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "deploy", "info", "partialnet_t9"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("deploy: error: unknown variant") and proc.stdout == ""
