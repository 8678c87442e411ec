"""Keyed calibration caches (calibration/cache.py): a stale one is never read.

The model is PartialNet-T0 with randomized BatchNorm statistics, affines and iRPE tables, 10 classes, exported at
64 px (tests/calibration/conftest.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.cache import CacheKey, KeyedCache
from calibration.ort_int8 import QuantSession
from calibration.sources import default_images
from partialnet.variants import Preprocess
from runtimes.base import BackendUnavailable
from int8_fixtures import SIZE, CALIB



# --------------------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------------------


def test_cache_key_changes_with_model_calibration_and_preprocess(folder, calib, pp, tmp_path):
    base = CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="minmax")
    assert base.digest() == CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="minmax").digest()
    other_model = tmp_path / "other.onnx"
    other_model.write_bytes((folder / "model.onnx").read_bytes() + b"\0")
    fewer = default_images(CALIB - 1, pp, seed=0)
    shifted = default_images(CALIB, pp, seed=0)
    shifted.images = shifted.images + np.float32(1e-3)
    variants = [
        CacheKey.of(other_model, calib, pp.to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", fewer, pp.to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", shifted, pp.to_dict(), method="minmax"),  # same source, other bytes
        CacheKey.of(folder / "model.onnx", calib, Preprocess(SIZE, crop_ratio=0.875).to_dict(), method="minmax"),
        CacheKey.of(folder / "model.onnx", calib, pp.to_dict(), method="entropy"),
    ]
    assert len({base.digest(), *(k.digest() for k in variants)}) == 1 + len(variants)


def test_stale_cache_is_deleted_not_read(folder, calib, pp, tmp_path):
    key = CacheKey.of(folder / "model.onnx", calib, pp.to_dict())
    cache = KeyedCache(tmp_path / "calib.cache", key)
    assert cache.status() == "miss" and cache.read_bytes() is None
    cache.write_bytes(b"ranges")
    assert cache.status() == "hit" and KeyedCache(cache.path, key).read_bytes() == b"ranges"
    cache.write_bytes(b"ranges, refreshed")  # a tool rewriting its own valid cache replaces it and its key
    assert cache.status() == "hit" and cache.read_bytes() == b"ranges, refreshed"
    assert json.loads(cache.key_path.read_text())["digest"] == key.digest()
    stale = KeyedCache(cache.path, CacheKey.of(folder / "model.onnx", calib, Preprocess(SIZE, interpolation="bilinear").to_dict()))
    assert stale.status() == "stale"
    assert stale.read_bytes() is None and not cache.path.exists() and not cache.key_path.exists()
    cache.path.write_bytes(b"written by a crashed run, no key")
    assert KeyedCache(cache.path, key).read_bytes() is None and not cache.path.exists()


def test_range_cache_is_reused_only_for_the_same_calibration(folder, calib, pp, tmp_path):
    def status(images):
        with QuantSession(folder / "model.onnx", images, "minmax", pp.to_dict(), cache_dir=tmp_path) as s:
            s.ranges()
            return s.cache_status

    assert status(calib) == "miss"
    assert status(calib) == "hit"
    assert status(default_images(8, pp, seed=5)) == "stale"  # recalibrated, and the old ranges are gone
    assert status(default_images(8, pp, seed=5)) == "hit"


@pytest.mark.skipif(__import__("runtimes.trt", fromlist=["x"]).tensorrt_status() is None,
                    reason="TensorRT is usable here; this checks the message where it is not")
def test_trt_calibrator_is_unreachable_without_tensorrt(folder, calib, pp, tmp_path):
    from calibration.trt_calibrator import entropy_calibrator

    with pytest.raises(BackendUnavailable, match="TensorRT"):
        entropy_calibrator(folder / "model.onnx", calib, tmp_path / "calib.cache", pp.to_dict())
