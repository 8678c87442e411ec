"""runtimes/compare.py: drift between two sets of logits, judged by a tolerance, and the notes about near-ties."""
from __future__ import annotations

import numpy as np
import pytest

from runtimes.base import INPUT_NAME, OUTPUT_NAME, TensorSpec
from runtimes.compare import TOLERANCES, Drift, disagreement_note, judge, run_all


class Scaled:
    """A runner that multiplies its input's mean per image by `k`: enough to see batches and order."""

    def __init__(self, k: float):
        self.k, self.calls = k, []
        self.name = f"scaled:{k}"
        self.inputs = [TensorSpec(INPUT_NAME, "float32", (None, 3, 2, 2))]
        self.outputs = [TensorSpec(OUTPUT_NAME, "float32", (None, 2))]

    def run(self, feeds):
        x = feeds[INPUT_NAME]
        self.calls.append(len(x))
        m = x.reshape(len(x), -1).mean(1, keepdims=True) * self.k
        return {OUTPUT_NAME: np.concatenate([m, -m], axis=1)}

    def close(self):
        pass


def test_run_all_feeds_every_runner_the_same_batches_in_order():
    x = np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 2, 2)
    a, b = Scaled(1.0), Scaled(2.0)
    out = run_all({"a": a, "b": b}, x, 2)
    assert a.calls == b.calls == [2, 2, 1]
    assert np.allclose(out["b"], 2 * out["a"]) and out["a"].shape == (5, 2)


def test_judge_holds_fp32_to_its_limit():
    ref = np.array([[10.0, 0.0], [0.0, 10.0]])
    ok = judge(ref, ref + 5e-4, TOLERANCES["fp32"])
    assert ok.passed and ok.limit == 1e-3
    bad = judge(ref, ref + 2e-3, TOLERANCES["fp32"])
    assert not bad.passed and bad.failures == ["max |logit error| 0.002 exceeds 0.001"]
    assert judge(ref, ref + 2e-3, TOLERANCES["fp32"], noise_floor=1e-3).passed  # 4x the eager noise floor


def test_drift_says_how_decided_the_changed_predictions_were():
    ref = np.array([[3.0, 1.0, 0.0], [1.0, 1.1, 0.0], [0.0, 0.0, 5.0], [2.0, 0.0, 1.5]])
    near_tie = ref.copy()
    near_tie[1, 0] = 1.2  # eager's top-1 led by 0.1 there: a 0.2 error flips it
    d = Drift.between(ref, near_tie)
    assert d.top1_agreement == 0.75 and d.flipped_margin_max == pytest.approx(0.1)
    assert d.ref_margin_median == pytest.approx((0.5 + 2.0) / 2)
    note = disagreement_note("x int8", d.to_dict())
    assert note == ("x int8: top-1 changed on 1 of 4 images, whose eager top-1 margin is at most 0.1 logits "
                    "(median margin on this set 1.25, mean |logit error| 0.0167); 0 of the changes on the 3 images "
                    "decided beyond its logit noise (margin > 0.235)")
    wrong = ref.copy()
    wrong[0] = [0.0, 1.0, 3.0]  # a decided image (margin 2) predicted otherwise: a real error
    d = Drift.between(ref, wrong)
    assert d.flipped_margin_max == pytest.approx(2.0) and "at most 2 logits" in disagreement_note("x", d.to_dict())
    assert disagreement_note("x", Drift.between(ref, ref).to_dict()) is None
