"""What int8 weights for the head's Linear buy OpenVINO INT8, timed side by side with the method of `deploy bench`.

From one export folder's float IR and ONNX, two INT8 IRs are made with the same calibration images and policy,
differing only in `OvQuantization.head_weights` ("int8": weight-only int8 for the head's Linear; "float"). Each is
compiled as `benchmark_app -hint latency -b 1 -infer_precision f32` compiles it, in its own worker process,
round-robin one slice at a time (`deploy.timing`), the float one twice (first and last: the run's noise floor).
The table gives each IR's median and the head Linear's own time from OpenVINO's per-node counters, and what the
change does to the logits on held-out images.

    deploy export partialnet_t0 --int8 --output D --no-bench
    python benchmarks/ov_head.py D --threads 2 > benchmarks/OV_HEAD.md
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from plain import open_static_openvino, time_side_by_side  # noqa: E402
from profile import openvino_counters  # noqa: E402  (benchmarks/profile.py: first on sys.path, before the stdlib's)

CALIB, HELD_OUT = 128, 64
COUNTER_RUNS = 200


def head_counter_us(xml: Path, name: str, threads: int) -> float:
    """The head Linear's real time per inference from OpenVINO's counters (benchmarks/profile.py's method)."""
    _, by_node = openvino_counters(str(xml), threads, COUNTER_RUNS, key=lambda info: info.node_name)
    return by_node[name][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--duration-s", type=float, default=20.0, help="timed seconds per IR")
    ap.add_argument("--slice-s", type=float, default=0.2)
    args = ap.parse_args()
    import numpy as np
    import openvino as ov

    from calibration.ov_int8 import OvQuantization, quantize_ov
    from calibration.sources import default_images
    from deploy.report import isa_summary, machine_fingerprint
    from partialnet.variants import Preprocess
    from runtimes.compare import Drift

    manifest = json.loads((args.folder / "manifest.json").read_text())
    pp = Preprocess.from_dict(manifest["preprocess"])
    calib, held_out = default_images(CALIB, pp, seed=0), default_images(HELD_OUT, pp, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        irs, heads = {}, {}
        for choice in ("float", "int8"):
            dest = Path(tmp) / f"head-{choice}.xml"
            info = quantize_ov(args.folder / "openvino" / "model.xml", args.folder / "model.onnx", dest, calib,
                               OvQuantization(head_weights=choice))
            irs[choice] = dest
            heads[choice] = info["head_weights"]
        name = heads["int8"]["ops"][0]
        logits = {}
        for choice, xml in irs.items():
            compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            logits[choice] = np.asarray(compiled(held_out.images)[compiled.outputs[0]])
        counters = {c: head_counter_us(xml, name, args.threads) for c, xml in irs.items()}
        # The float-head IR is timed twice, first and last in the rotation: the gap between the two is this
        # run's noise floor (A/A), and a speed-up inside it is no speed-up.
        runners = {**irs, "float-again": irs["float"]}
        times = time_side_by_side({c: functools.partial(open_static_openvino, str(xml), args.threads)
                                   for c, xml in runners.items()}, pp.input_size, args.threads, args.duration_s,
                                  args.slice_s)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    drift = Drift.between(logits["float"], logits["int8"])
    env = machine_fingerprint()
    print(f"# OpenVINO INT8: the head's Linear with int8 or fp32 weights ({manifest['variant']}, "
          f"{pp.input_size} px, batch 1, {args.threads} threads)\n")
    print(f"{env['cpu']} ({isa_summary(env)}); each IR in its own process, round-robin slices of {args.slice_s} s, "
          f"{args.duration_s:g} s timed each. `python benchmarks/ov_head.py D --threads {args.threads} "
          f"--duration-s {args.duration_s:g}` on `deploy export {manifest['variant']} --int8 --output D "
          f"--no-bench`; both IRs calibrated on the same {CALIB} embedded crops.\n")
    print("| head weights | p50 ms | speed-up | head Linear (counters, us) |")
    print("|---|---:|---:|---:|")
    for c in ("float", "int8", "float-again"):
        counter = f"{counters[c]:.1f}" if c in counters else "(A/A control: the float IR again, timed last)"
        print(f"| {c} | {med[c]:.3f} | {med['float'] / med[c]:.3f}x | {counter} |")
    scale = float(np.abs(logits["float"]).max())
    print(f"\nint8 head against fp32 head on {HELD_OUT} held-out embedded crops: top-1 agreement "
          f"{drift.top1_agreement:.4f}, cosine {drift.cosine_similarity:.6f}, max |logit change| "
          f"{drift.max_abs_logit_error:.3g} ({drift.max_abs_logit_error / scale:.2%} of the largest logit).")


if __name__ == "__main__":
    main()
