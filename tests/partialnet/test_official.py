"""Numerical contract against the official implementation.

tests/data/official holds two small random-weight networks written by the official `models/partialnet.py`
(github haiduo/PartialNet @ 679cfc0) and the logits it computed for fixed inputs at 64 and 96 px (README.json
says which). The full-size T0 / T1+PAT_sp / T2 checks at 192, 224 and 256 px were run the same way outside
the repository (their checkpoints are too large to commit) and matched bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy.cli import main

DATA = Path(__file__).parents[1] / "data" / "official"
CASES = [("tiny_gelu_sp.ckpt", "partialnet_t0"), ("tiny_relu.pth", "partialnet_t2")]


@pytest.mark.parametrize("ckpt,variant", CASES)
@pytest.mark.parametrize("size", [64, 96])
def test_cli_predict_reproduces_official_logits(tmp_path, ckpt, variant, size, capsys):
    out = tmp_path / "logits.npy"
    rc = main(["predict", variant, "--checkpoint", str(DATA / ckpt), "--backend", "eager",
               "--inputs", str(DATA / f"x{size}.npy"), "--save-logits", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    got = np.load(out)
    ref = np.load(DATA / f"{Path(ckpt).stem}_x{size}_logits.npy")
    assert got.dtype == np.float32 and got.shape == ref.shape
    # Contract: max abs error <= 1e-5 x the largest logit magnitude (fp32 rounding only).
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
