"""INT8 measurements that chose the default exclusion policy and show INT8 is faster than FP32 on this CPU.

For one export folder (made by `deploy export`), this script

* quantizes with onnxruntime and with NNCF/OpenVINO under a list of policies: nothing kept in float, each candidate
  part kept in float on its own, every candidate, and the default;
* reports each artifact's drift against its own backend's FP32 (top-1 agreement, mean cosine, max |logit error|)
  on held-out images, and top-1 accuracy when those images are labelled;
* times FP32 and INT8 of each backend at batch 1 (medians of interleaved runs: every round runs each model K times,
  round-robin with a rotating start, so load from other processes falls on every model alike).

Markdown goes to stdout, progress to stderr. Example (T0, 224 px, embedded images):

    deploy export partialnet_t0 -c ckpt.pth --output /tmp/t0
    python benchmarks/int8.py /tmp/t0 --calib 64 --eval 128 --latency
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.ort_int8 import QuantSession, quantize_ort  # noqa: E402
from calibration.ov_int8 import OvQuantization, quantize_ov  # noqa: E402
from calibration.policy import DEFAULT_POLICY, NO_EXCLUSIONS, PARTS, FloatPolicy  # noqa: E402
from calibration.sources import ImageSet, default_images, load_images  # noqa: E402
from export.manifest import Manifest  # noqa: E402
from partialnet.variants import Preprocess  # noqa: E402
from runtimes.base import INPUT_NAME, OUTPUT_NAME  # noqa: E402
from runtimes.compare import Drift  # noqa: E402
from runtimes.ort import OrtRunner  # noqa: E402
from runtimes.ov import OpenVINORunner  # noqa: E402


# Idle onnxruntime workers busy-wait by default and would steal the cores from the next model of an interleaved
# round; unless --ort-spinning, every onnxruntime session here is made without spinning. Spinning is what a lone
# onnxruntime process does, and it lowers per-op overhead.
ORT_OPTIONS: dict = {}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def policies(names: list[str]) -> list[FloatPolicy]:
    out = []
    for n in names:
        if n == "none":
            out.append(NO_EXCLUSIONS)
        elif n == "all":
            out.append(FloatPolicy(parts=tuple(PARTS), name="all-parts"))
        elif n == "default":
            out.append(DEFAULT_POLICY)
        elif "+" in n or n in PARTS:
            out.append(FloatPolicy(parts=tuple(n.split("+")), name=n))
        else:
            raise SystemExit(f"unknown policy {n!r}: none, all, default, a part ({', '.join(PARTS)}) or parts joined by +")
    return out


def logits_of(runner, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([runner.run({INPUT_NAME: x[i : i + batch]})[OUTPUT_NAME] for i in range(0, len(x), batch)])


def drift(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    d = Drift.between(ref, got)
    out = {"agree": d.top1_agreement, "cos": d.cosine_similarity, "max_abs": d.max_abs_logit_error}
    if labels is not None:
        out["top1"] = float((got.argmax(1) == labels).mean())
    return out


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, k: int) -> dict[str, dict[str, float]]:
    """Median, p10 and p90 per call in ms, from `rounds` round-robin passes of `k` calls per function."""
    names = list(fns)
    for f in fns.values():
        for _ in range(5):
            f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(k):
                t = time.perf_counter()
                fns[n]()
                times[n].append((time.perf_counter() - t) * 1e3)
    out = {}
    for n, v in times.items():
        v.sort()
        out[n] = {"median": statistics.median(v), "p10": v[len(v) // 10], "p90": v[9 * len(v) // 10]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="export folder (model.onnx, openvino/model.xml, manifest.json)")
    ap.add_argument("--calib", type=int, default=64, help="embedded calibration images (when --calib-data is not given)")
    ap.add_argument("--eval", type=int, default=128, help="embedded held-out images (when --eval-data is not given)")
    ap.add_argument("--calib-data", help="calibration images: folder, .txt list or .npy")
    ap.add_argument("--calib-limit", type=int, default=300)
    ap.add_argument("--eval-data", help="held-out images (labelled for accuracy)")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--policies", default="none,softmax,layernorm,attn_bias,srm_stats,sp_gate,head,all,default")
    ap.add_argument("--backends", default="onnxruntime,openvino")
    ap.add_argument("--ov-model-type", default="transformer", help="NNCF model type(s), comma-separated: transformer, cnn")
    ap.add_argument("--latency", action="store_true", help="time FP32 and INT8 per backend at batch 1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--ort-spinning", action="store_true", help="leave onnxruntime's busy-waiting workers on")
    args = ap.parse_args(argv)
    if not args.ort_spinning:
        ORT_OPTIONS["spinning"] = False

    manifest = Manifest.load(args.export)
    pp = Preprocess.from_dict(manifest.preprocess)
    onnx_path, xml = args.export / "model.onnx", args.export / "openvino" / "model.xml"
    calib: ImageSet = (load_images(args.calib_data, pp, limit=args.calib_limit, seed=0) if args.calib_data
                       else default_images(args.calib, pp, seed=0))
    held: ImageSet = (load_images(args.eval_data, pp) if args.eval_data else default_images(args.eval, pp, seed=1))
    backends = args.backends.split(",")
    ov_types = args.ov_model_type.split(",")
    columns = [b for b in backends if b != "openvino"] + (
        (["openvino"] if len(ov_types) == 1 else [f"openvino-{t}" for t in ov_types]) if "openvino" in backends else [])
    chosen = policies(args.policies.split(","))
    log(f"calibration: {calib.source}; held out: {held.source}")

    fp32 = {}
    if "onnxruntime" in backends:
        fp32["onnxruntime"] = OrtRunner(onnx_path, threads=args.threads, **ORT_OPTIONS)
    if "openvino" in backends:
        fp32["openvino"] = OpenVINORunner(xml, threads=args.threads)
    ref = {b: logits_of(r, held.images) for b, r in fp32.items()}
    rows, runners = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    with QuantSession(onnx_path, calib, args.method, pp.to_dict(), workdir=tmp / "work", log=log) as session:
        for pol in chosen:
            row: dict = {"policy": pol.name}
            if "onnxruntime" in backends:
                dest = tmp / f"{pol.name}.int8.onnx"
                quantize_ort(onnx_path, dest, calib, policy=pol, session=session, force=True)
                runners[("onnxruntime", pol.name)] = OrtRunner(dest, precision="int8", threads=args.threads, **ORT_OPTIONS)
                row["onnxruntime"] = drift(ref["onnxruntime"], logits_of(runners[("onnxruntime", pol.name)], held.images), held.labels)
            for model_type in (ov_types if "openvino" in backends else []):
                label = "openvino" if len(ov_types) == 1 else f"openvino-{model_type}"
                dest = tmp / f"{pol.name}.{model_type}.int8.xml"
                info = quantize_ov(xml, onnx_path, dest, calib, OvQuantization(policy=pol, model_type=model_type),
                                   force=True)
                row[f"{label}_fq"] = info["fake_quantize"]
                runners[(label, pol.name)] = OpenVINORunner(dest, precision="int8", threads=args.threads)
                row[label] = drift(ref["openvino"], logits_of(runners[(label, pol.name)], held.images), held.labels)
            log(f"  {pol.name}: " + ", ".join(f"{b} {row[b]}" for b in columns))
            rows.append(row)

    print(f"## INT8 drift by exclusion policy ({manifest.variant}, {manifest.input_size} px, method {args.method})\n")
    print(f"Calibration: {calib.source}. Held out: {held.source}. Each backend's INT8 is compared with the same "
          f"backend's FP32 logits.\n")
    acc = held.labels is not None
    if acc:
        for b, r in ref.items():
            print(f"FP32 top-1 on the held-out set: {b} {float((r.argmax(1) == held.labels).mean()):.4f}  ")
        print()
    cols = ["agree", "cos", "max_abs"] + (["top1"] if acc else [])
    head = "| policy | " + " | ".join(f"{b} {c}" for b in columns for c in cols) + " |"
    print(head)
    print("|" + "---|" * (1 + len(columns) * len(cols)))
    for row in rows:
        cells = [f"{row[b][c]:.4f}" if c != "max_abs" else f"{row[b][c]:.3f}" for b in columns for c in cols]
        print(f"| {row['policy']} | " + " | ".join(cells) + " |")

    if args.latency:
        x1 = held.images[:1]
        fns: dict[str, Callable[[], object]] = {}
        for b, r in fp32.items():
            fns[f"{b} fp32"] = lambda r=r: r.run({INPUT_NAME: x1})
        for (b, name), r in runners.items():
            fns[f"{b} int8 {name}"] = lambda r=r: r.run({INPUT_NAME: x1})
        log(f"timing {len(fns)} models: {args.rounds} rounds x {args.k} runs each")
        load_before = os.getloadavg()[0]
        lat = interleaved(fns, args.rounds, args.k)
        load_after = os.getloadavg()[0]
        spin = "off" if ORT_OPTIONS else "on"
        print(f"\n## Latency, batch 1, {args.threads} threads ({platform.processor() or platform.machine()}, "
              f"load average {load_before:.1f} -> {load_after:.1f}, onnxruntime spinning {spin})\n")
        print("| model | median ms | p10 ms | p90 ms | vs fp32 (median) |")
        print("|---|---|---|---|---|")
        for n, v in lat.items():
            base = lat[f"{n.split()[0].split('-')[0]} fp32"]["median"]
            print(f"| {n} | {v['median']:.2f} | {v['p10']:.2f} | {v['p90']:.2f} | {v['median'] / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
