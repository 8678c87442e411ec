"""This project's artifacts against what a user would do without it: the generic export-and-quantize pipeline.

The generic pipeline takes the official module as it is (no reparameterization), exports it with
`torch.onnx.export` (its defaults, a dynamic batch axis), simplifies nothing, converts it with
`openvino.convert_model`, and quantizes with each library's defaults: ONNX Runtime's `quantize_static(fp32, int8,
reader)` (QDQ, uint8 activations, int8 weights, MinMax, no pre-processing, no exclusions) and NNCF's
`nncf.quantize(model, dataset)`. Both are calibrated on the same images `deploy export` uses when no
--calib-data is given (the embedded set, 128 crops), so only the method differs.

This project's rows are the artifacts of one `deploy export --int8` folder (made here, or `--export D`). Every
row is timed the same way (each runner in its own process, round-robin slices: `benchmarks/plain.py`) at batch
1: OpenVINO as `benchmark_app -hint latency -b 1 -infer_precision f32` compiles it, ONNX Runtime with default
options, eager as a plain loop; and every row's top-1 agreement with eager is taken on 64 other crops.

    python benchmarks/generic.py --threads 2 --duration-s 20 > benchmarks/GENERIC.md
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from plain import (PlainOnnxRuntime, StaticOpenVINO, median_ms, open_plain_eager, open_plain_onnxruntime,  # noqa: E402
                   open_static_openvino, time_side_by_side)

CALIB = 128
CHECK = 64


def build_generic(variant: str, size: int, folder: Path) -> dict[str, Path]:
    """The generic pipeline's four artifacts from the untouched module (fresh weights, as `deploy export`)."""
    import nncf
    import openvino as ov
    import torch
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    import partialnet
    from calibration.sources import default_images

    model = partialnet.build_model(variant).model.eval()
    fp32 = folder / "generic.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(fp32), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    calib = default_images(CALIB, partialnet.VARIANTS[variant].preprocess.at(size), seed=0).images

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"input": x[None]}

    int8 = folder / "generic.int8.onnx"
    quantize_static(str(fp32), str(int8), Reader())
    ov_model = ov.convert_model(str(fp32))
    ov.save_model(ov_model, str(folder / "generic.xml"), compress_to_fp16=False)
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars go to stdout; the table is stdout
        quantized = nncf.quantize(ov_model, nncf.Dataset([x[None] for x in calib]), subset_size=len(calib))
    ov.save_model(quantized, str(folder / "generic.int8.xml"), compress_to_fp16=False)
    return {"onnxruntime fp32": fp32, "onnxruntime int8": int8,
            "openvino fp32": folder / "generic.xml", "openvino int8": folder / "generic.int8.xml"}


def ours(export: Path) -> dict[str, Path]:
    manifest = json.loads((export / "manifest.json").read_text())
    rows = {}
    for art in manifest["artifacts"]:
        if art["backend"] in ("onnxruntime", "openvino") and art.get("target") in (None, "cpu") \
                and art["precision"] in ("fp32", "int8"):
            rows[f"{art['backend']} {art['precision']}"] = export / art["path"]
    return rows


def agreement(rows: dict[str, Path], variant: str, size: int, threads: int) -> dict[str, float]:
    """Top-1 agreement of every row with eager on CHECK crops not used for calibration."""
    import numpy as np

    import partialnet
    from calibration.sources import default_images

    x = default_images(CHECK, partialnet.VARIANTS[variant].preprocess.at(size), seed=1).images
    eager = open_plain_eager(variant, threads)
    ref = np.concatenate([eager.run({"input": x[i:i + 1]})["logits"] for i in range(len(x))]).argmax(1)
    out = {}
    for label, path in rows.items():
        runner = StaticOpenVINO(str(path), 1, threads) if path.suffix == ".xml" else PlainOnnxRuntime(str(path), threads)
        got = np.concatenate([runner.run({"input": x[i:i + 1]})["logits"] for i in range(len(x))]).argmax(1)
        out[label] = float((got == ref).mean())
        runner.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="partialnet_t0")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--slice-s", type=float, default=0.2)
    ap.add_argument("--export", type=Path, help="an existing `deploy export --int8` folder of the same variant/size")
    args = ap.parse_args()
    from deploy.report import isa_summary, machine_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = args.export
        if export is None:
            export = tmp / "export"
            cmd = [str(Path(sys.executable).with_name("deploy")), "export", args.variant, "--input-size",
                   str(args.input_size), "--int8", "--output", str(export), "--no-bench", "--no-validate", "--quiet"]
            subprocess.run(cmd, check=True)
        print("building the generic pipeline's artifacts", file=sys.stderr)
        generic = build_generic(args.variant, args.input_size, tmp)
        mine = ours(export)
        rows = {f"generic {k}": v for k, v in generic.items()} | {f"ours {k}": v for k, v in mine.items()}
        agree = agreement(rows, args.variant, args.input_size, args.threads)
        factories = {"eager": functools.partial(open_plain_eager, args.variant, args.threads)}
        for label, path in rows.items():
            factories[label] = (functools.partial(open_static_openvino, str(path), args.threads)
                                if path.suffix == ".xml" else
                                functools.partial(open_plain_onnxruntime, str(path), args.threads))
        print("timing", file=sys.stderr)
        times = time_side_by_side(factories, args.input_size, args.threads, args.duration_s, args.slice_s)
    med = {k: median_ms(v) for k, v in times.items()}
    env = machine_fingerprint()
    print(f"# This project against the generic pipeline: {args.variant}, {args.input_size} px, batch 1, "
          f"{args.threads} threads\n")
    print(f"{env['cpu']} ({isa_summary(env)}). Each runner in its own process, round-robin slices of "
          f"{args.slice_s} s, {args.duration_s:g} s timed each; agreement: top-1 equal to eager's on {CHECK} "
          f"embedded crops (seed 1); both INT8 pipelines calibrated on the same {CALIB} crops (seed 0). "
          f"`python benchmarks/generic.py --variant {args.variant} --threads {args.threads} "
          f"--duration-s {args.duration_s:g}{' --export D' if args.export else ''}`"
          f"{' (D: deploy export ' + args.variant + ' --int8)' if args.export else ''}\n")
    print("| runtime | precision | generic p50 ms | ours p50 ms | our lead | generic vs eager | ours vs eager "
          "| generic agreement | ours agreement |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in ("onnxruntime fp32", "openvino fp32", "onnxruntime int8", "openvino int8"):
        g, o = med.get(f"generic {key}"), med.get(f"ours {key}")
        if g is None or o is None:
            continue
        runtime, precision = key.split()
        print(f"| {runtime} | {precision} | {g:.3f} | {o:.3f} | {g / o:.2f}x | {med['eager'] / g:.2f}x "
              f"| {med['eager'] / o:.2f}x | {agree[f'generic {key}']:.2f} | {agree[f'ours {key}']:.2f} |")
    print(f"\neager (training module, plain loop): {med['eager']:.3f} ms")


if __name__ == "__main__":
    main()
