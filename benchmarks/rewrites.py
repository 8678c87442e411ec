"""What each inference-form rewrite buys on each CPU runtime, timed side by side with the method of `deploy bench`.

For one variant (fresh weights, BatchNorm statistics randomized so a wrong rewrite would show) the reparameterized
model is built once; each rewrite in `export.rewrites.REWRITES` is applied alone, and all of them together, to a
copy. Every graph is exported (torchscript exporter + onnxsim, as `deploy export` does), converted to OpenVINO IR,
checked against the eager training model in FP32, and timed at batch 1:

* OpenVINO as `benchmark_app -hint latency -b 1 -infer_precision f32` runs it (static batch-1 shape),
* ONNX Runtime with default session options and `--threads` intra-op threads (spinning on),

each runner in its own worker process, round-robin one slice at a time (`deploy.timing`), so machine drift falls
on every graph alike. The table gives each graph's median and its speed-up over the reparameterized graph per
runtime; a rewrite is worth adopting when it is faster on both runtimes, or faster on one and neutral (within
the run's noise) on the other. The run's noise is measured, not assumed: the reparameterized graph is timed twice,
first and last in the rotation (`reparam-again`), and a speed-up inside that A/A gap is noise.

    python benchmarks/rewrites.py --variant partialnet_t0 --threads 2 --duration-s 20 > benchmarks/REWRITES.md
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONTROL = "reparam-again"
sys.path.insert(0, str(HERE.parent))

from plain import open_plain_onnxruntime, open_static_openvino, time_side_by_side  # noqa: E402


def build_graphs(variant: str, size: int, folder: Path, only: list[str] | None,
                 combine: list[str] | None) -> tuple[dict[str, Path], dict[str, float]]:
    """ONNX files (and IR beside them) of the reparameterized graph and of each rewrite; their FP32 error."""
    import onnx
    import onnxsim
    import torch

    import partialnet
    from export.reparam import reparameterize_model
    from reparam import randomize_batchnorms  # benchmarks/reparam.py's, so both scripts fold the same kind of BN
    from export.rewrites import REWRITES, apply_rewrites
    from export.to_onnx import export_onnx
    from runtimes.ov import convert_to_ir

    lm = partialnet.build_model(variant)
    randomize_batchnorms(lm.model, 0)
    base = reparameterize_model(lm.model, size)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = lm.model(x)
    names = only or list(REWRITES)
    plans = {"reparam": []} | {name: [name] for name in names}
    if combine:
        plans["+".join(combine)] = combine
    plans[CONTROL] = []  # the reference again, timed last in the rotation: the run's own noise floor (A/A)
    paths, errors = {}, {}
    for label, rewrites in plans.items():
        model = apply_rewrites(copy.deepcopy(base), rewrites)
        with torch.inference_mode():
            errors[label] = float((model(x) - ref).abs().max() / ref.abs().max())
        raw = folder / f"{label}.raw.onnx"
        export_onnx(model, raw, size, force=True)
        simplified, ok = onnxsim.simplify(onnx.load(str(raw)), initializers_as_constants=False)
        dest = folder / f"{label}.onnx"
        onnx.save(simplified if ok else onnx.load(str(raw)), str(dest))
        convert_to_ir(dest, folder / f"{label}.xml", force=True)
        paths[label] = dest
        print(f"built {label}: max |dlogit| / max |logit| = {errors[label]:.2e}", file=sys.stderr)
    return paths, errors


def time_graphs(paths: dict[str, Path], size: int, threads: int, duration_s: float, slice_s: float):
    factories = {}
    for label, onnx_path in paths.items():
        factories[f"openvino|{label}"] = functools.partial(open_static_openvino, str(onnx_path.with_suffix(".xml")),
                                                           threads)
        factories[f"onnxruntime|{label}"] = functools.partial(open_plain_onnxruntime, str(onnx_path), threads)
    return time_side_by_side(factories, size, threads, duration_s, slice_s)


def main() -> None:
    from export.rewrites import REWRITES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="partialnet_t0")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=20.0, help="timed seconds per graph and runtime")
    ap.add_argument("--slice-s", type=float, default=0.2)
    ap.add_argument("--rewrites", help=f"comma-separated subset of: {', '.join(REWRITES)}")
    ap.add_argument("--combine", help="also time these rewrites applied together (comma-separated, in order)")
    args = ap.parse_args()
    from deploy.report import isa_summary, machine_fingerprint

    with tempfile.TemporaryDirectory() as tmp:
        paths, errors = build_graphs(args.variant, args.input_size, Path(tmp),
                                     args.rewrites.split(",") if args.rewrites else None,
                                     args.combine.split(",") if args.combine else None)
        times = time_graphs(paths, args.input_size, args.threads, args.duration_s, args.slice_s)
    env = machine_fingerprint()
    print(f"# Inference-form rewrites: {args.variant}, {args.input_size} px, batch 1, {args.threads} threads\n")
    print(f"{env['cpu']} ({isa_summary(env)}); each runner in its own process, round-robin slices of "
          f"{args.slice_s} s, {args.duration_s} s timed each. `python benchmarks/rewrites.py "
          f"{' '.join(sys.argv[1:])}`\n")
    print("| graph | what it changes | FP32 error | OpenVINO p50 ms | speed-up | ONNX Runtime p50 ms | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for label in paths:
        what = "reparameterized (today's model.onnx)" if label == "reparam" else \
            "the same graph again, last in the rotation: this run's noise floor" if label == CONTROL else \
            "the rewrites named, together" if "+" in label else REWRITES[label].summary
        ov, ort = med[f"openvino|{label}"], med[f"onnxruntime|{label}"]
        print(f"| {label} | {what} | {errors[label]:.1e} | {ov:.3f} | {med['openvino|reparam'] / ov:.3f}x "
              f"| {ort:.3f} | {med['onnxruntime|reparam'] / ort:.3f}x |")


if __name__ == "__main__":
    main()
