"""Fixtures shared across the test packages (tests/<package>/ mirrors the source packages)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from calibration.ort_int8 import QuantSession, quantize_ort
from calibration.policy import DEFAULT_POLICY, OnnxGraph
from calibration.qdq import build_qdq
from calibration.sources import default_images
from helpers import randomize_
from int8_fixtures import BLOCK, CALIB, CLASSES, SIZE
from partialnet import build_model
from partialnet.variants import Preprocess

DATA = Path(__file__).parent / "data"
TINY = DATA / "official" / "tiny_gelu_sp.ckpt"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """The tiny official-layout checkpoint exported at 64 px (FP32 on every usable backend), once per session."""
    from deploy.cli import main

    out = tmp_path_factory.getbasetemp() / "tiny_t0_64"
    assert main(["export", "partialnet_t0", "--checkpoint", str(TINY), "--input-size", "64", "--output", str(out),
                 "--force", "-q", "--no-validate", "--no-bench"]) == 0
    return out


# --------------------------------------------------------------------------------------------------------
# the INT8 tests' model (tests/calibration, tests/deploy/test_int8_build.py): a randomized T0 at 64 px
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model():
    return randomize_(build_model("partialnet_t0", num_classes=CLASSES, log=lambda msg: None).model.eval(), seed=1)


@pytest.fixture(scope="session")
def folder(model, tmp_path_factory) -> Path:
    """model.onnx (reparameterized, 64 px) and openvino/model.xml, as `deploy export` lays them out."""
    from export.reparam import reparameterize_model
    from export.to_onnx import export_onnx
    from runtimes.ov import convert_to_ir

    out = tmp_path_factory.mktemp("export")
    export_onnx(reparameterize_model(model, SIZE), out / "model.onnx", SIZE)
    convert_to_ir(out / "model.onnx", out / "openvino" / "model.xml")
    return out


@pytest.fixture(scope="session")
def pp() -> Preprocess:
    return Preprocess(input_size=SIZE)


@pytest.fixture(scope="session")
def calib(pp):
    return default_images(CALIB, pp, seed=0)


@pytest.fixture(scope="session")
def ref(model, calib) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(calib.images)).numpy()


@pytest.fixture(scope="session")
def graph(folder) -> OnnxGraph:
    return OnnxGraph(onnx.load(str(folder / "model.onnx")))


@pytest.fixture(scope="session")
def session(folder, calib, pp, tmp_path_factory):
    with QuantSession(folder / "model.onnx", calib, "minmax", pp.to_dict(),
                      cache_dir=tmp_path_factory.mktemp("ranges")) as s:
        yield s


@pytest.fixture(scope="session")
def ort_int8(folder, calib, session, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ort") / "model.int8.onnx"
    return dest, quantize_ort(folder / "model.onnx", dest, calib, session=session, metadata={"partialnet.variant": "t0"})


@pytest.fixture(scope="session")
def qdq(folder, calib, session, tmp_path_factory):
    dest = tmp_path_factory.mktemp("trt") / "model.qdq.onnx"
    return dest, build_qdq(folder / "model.onnx", dest, calib, session=session)


@pytest.fixture(scope="session")
def ov_int8(folder, calib, tmp_path_factory):
    from calibration.ov_int8 import OvQuantization, quantize_ov

    dest = tmp_path_factory.mktemp("ov") / "model.int8.xml"
    info = quantize_ov(folder / "openvino" / "model.xml", folder / "model.onnx", dest, calib,
                       OvQuantization(policy=DEFAULT_POLICY.with_units([BLOCK])), metadata={"partialnet.variant": "t0"})
    return dest, info
