"""The speed targets of the speed issue, measured exactly as its check does, on one export folder.

In separate processes, `--rounds` times, alternating: a plain eager loop (`partialnet.build_model(VARIANT)`,
`torch.set_num_threads(T)`, inference_mode, batch 1) and `benchmark_app -m IR -d CPU -hint latency -b 1
-infer_precision f32` on each OpenVINO IR of the folder; plus a plain ONNX Runtime loop (default options, T
intra-op threads) on each ONNX artifact for the ONNX Runtime target. Medians over the rounds; each target is
eager's median over the artifact's. On an x86 CPU without VNNI the ONNX Runtime int8 loop turns on the exact
U8U8 kernels, as `deploy`'s runner does there: the default U8S8 kernels saturate on such a CPU, and the latency
of a graph computing other answers than the deployed one is no figure to quote.

    deploy export partialnet_t0 --int8 --output D --no-bench
    python benchmarks/targets.py D --threads 2 > benchmarks/TARGETS.md
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TARGETS = {"openvino/int8": 9.0, "openvino/fp32": 5.5, "onnxruntime/int8": 5.0}

EAGER_LOOP = """
import statistics, sys, time, torch, partialnet
torch.set_num_threads({threads})
m = partialnet.build_model({variant!r}).model.eval()
x = torch.randn(1, 3, {size}, {size})
with torch.inference_mode():
    for _ in range(20):
        m(x)
    times, end = [], time.perf_counter() + {seconds}
    while time.perf_counter() < end:
        t = time.perf_counter(); m(x); times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e3)
"""

ORT_LOOP = """
import statistics, time, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = {threads}
if {exact}:
    so.add_session_config_entry({exact_key!r}, "1")
s = ort.InferenceSession({path!r}, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((1, 3, {size}, {size})).astype(np.float32)
for _ in range(20):
    s.run(None, {{"input": x}})
times, end = [], time.perf_counter() + {seconds}
while time.perf_counter() < end:
    t = time.perf_counter(); s.run(None, {{"input": x}}); times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e3)
"""


def python(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def benchmark_app(xml: Path, seconds: int) -> float:
    out = subprocess.run([str(BIN / "benchmark_app"), "-m", str(xml), "-d", "CPU", "-hint", "latency", "-b", "1",
                          "-infer_precision", "f32", "-t", str(seconds)], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"Median:\s+([\d.]+) ms", out).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from deploy.report import isa_summary, machine_fingerprint
    from runtimes.cpu import int8_dot_saturates
    from runtimes.ort import EXACT_INT8_KEY

    exact_int8 = int8_dot_saturates()  # deploy's ONNX Runtime runner takes the exact int8 kernels on this CPU
    manifest = json.loads((args.folder / "manifest.json").read_text())
    variant, size = manifest["variant"], manifest["input_size"]
    rows = {f"{a['backend']}/{a['precision']}": args.folder / a["path"] for a in manifest["artifacts"]
            if a["backend"] in ("openvino", "onnxruntime") and a.get("target") in (None, "cpu")
            and a["precision"] in ("fp32", "int8")}
    times: dict[str, list[float]] = {"eager": [], **{k: [] for k in rows}}
    for r in range(args.rounds):
        print(f"round {r + 1}", file=sys.stderr)
        times["eager"].append(python(EAGER_LOOP.format(threads=args.threads, variant=variant, size=size,
                                                       seconds=args.seconds)))
        for key, path in rows.items():
            if key.startswith("openvino"):
                times[key].append(benchmark_app(path, args.seconds))
            else:
                exact = key.endswith("int8") and exact_int8
                times[key].append(python(ORT_LOOP.format(threads=args.threads, path=str(path), size=size,
                                                         exact=exact, exact_key=EXACT_INT8_KEY,
                                                         seconds=args.seconds)))
    med = {k: statistics.median(v) for k, v in times.items()}
    env = machine_fingerprint()
    print(f"# Speed targets: {variant}, {size} px, batch 1, {args.threads} threads\n")
    print(f"{env['cpu']} ({isa_summary(env)}); {args.rounds} alternating rounds of {args.seconds} s, medians. "
          f"`python benchmarks/targets.py D --threads {args.threads} --rounds {args.rounds}` on "
          f"`deploy export {variant} --int8 --output D --no-bench`.\n")
    print("| row | measured by | ms per round | median ms | eager / row | target | met |")
    print("|---|---|---|---:|---:|---:|---|")
    print(f"| eager | plain loop | {', '.join(f'{t:.2f}' for t in times['eager'])} | {med['eager']:.2f} | 1.00x | | |")
    for key in rows:
        ratio = med["eager"] / med[key]
        target = TARGETS.get(key)
        how = "benchmark_app -hint latency" if key.startswith("openvino") else "plain loop, default options"
        if key == "onnxruntime/int8" and exact_int8:
            how += " + exact int8 kernels (no VNNI)"
        print(f"| {key} | {how} | {', '.join(f'{t:.2f}' for t in times[key])} | {med[key]:.2f} | {ratio:.2f}x "
              f"| {'' if target is None else f'{target:g}x'} | "
              f"{'' if target is None else ('yes' if ratio >= target else 'no')} |")


if __name__ == "__main__":
    main()
