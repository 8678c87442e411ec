"""The sensitivity pass (calibration/sensitivity.py): ranking, greedy steps, targets.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations

import re

import pytest
import torch

from calibration.policy import NO_EXCLUSIONS
from calibration.sensitivity import Target, sensitivity_pass
from calibration.sources import default_images
from partialnet.errors import UsageError
from int8_fixtures import T0_UNITS



# --------------------------------------------------------------------------------------------------------
# sensitivity
# --------------------------------------------------------------------------------------------------------


def test_sensitivity_ranks_units_and_stops_at_the_target(session, model, pp):
    # Held-out images and nothing float by default: on the calibration images the default policy already agrees
    # on every top-1. Measured here: 0.958 with everything quantized, 1.0 once the head and two merges are float.
    held = default_images(48, pp, seed=3).images
    with torch.inference_mode():
        held_ref = model(torch.from_numpy(held)).numpy()
    result = sensitivity_pass(session, held_ref, Target(top1_agreement=1.0), images=held, base=NO_EXCLUSIONS)
    assert result.base.drift.top1_agreement < 1.0
    ranked = [u for u, _ in result.ranking]
    assert sorted(ranked) == sorted(T0_UNITS)
    kls = [d.drift.mean_kl for _, d in result.ranking]
    assert kls == sorted(kls, reverse=True)
    assert result.kept_float == ranked[: len(result.kept_float)]  # worst first
    assert len(result.steps) == len(result.kept_float) + 1
    met = [Target(top1_agreement=1.0).met(d, None) for _, d in result.steps]
    assert met[-1] == result.met and not any(met[:-1])  # it stopped at the first step meeting the target
    policy = result.policy(NO_EXCLUSIONS)
    assert policy.units == tuple(result.kept_float) and set(policy.reasons) == set(result.kept_float)
    assert re.match(r"sensitivity rank 1 of 18; quantized alone: top-1 agreement", policy.reasons[ranked[0]])


def test_sensitivity_keeps_nothing_when_int8_already_meets_the_target(session, ref):
    result = sensitivity_pass(session, ref, Target(top1_agreement=0.5))
    assert result.met and result.kept_float == [] and len(result.steps) == 1
    assert result.ranking == []  # nothing to rank when everything quantized already meets the target


def test_sensitivity_checks_its_target():
    with pytest.raises(UsageError, match=r"needs a target: a top-1 agreement or a maximum accuracy drop"):
        Target()
    with pytest.raises(UsageError, match=r"maximum accuracy drop is a fraction in \[0, 1\) \(0.01 = one point\); got 1.5"):
        Target(max_accuracy_drop=1.5)
