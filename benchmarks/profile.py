"""Where each microsecond of an export's CPU artifacts goes, from the runtimes' own profilers.

For every OpenVINO IR and ONNX Runtime model of one or more export folders (batch 1, the given thread count), each
in a fresh process:

* OpenVINO: the model compiled as `benchmark_app -hint latency` compiles it (static batch 1, f32 inference
  precision, PERF_COUNT on); per-node `real_time` from `get_profiling_info()`, averaged over the runs and summed
  by (layer type, kernel: OpenVINO's exec_type, e.g. brgconv_avx512_1x1_I8 or ref_f32).
* ONNX Runtime: a session with profiling on (default spinning, the given intra-op threads); per-node durations
  from its trace, averaged over the runs and summed by operator type.

The tables give count, microseconds per inference and share of the counted total, worst first, and the wall
median of the same runs. Counters do not add up to the wall time: scheduling between nodes is not counted.

    python benchmarks/profile.py D [D2 ...] --threads 2 --runs 300 > benchmarks/PROFILE.md
    python benchmarks/profile.py D --precisions fp32 --nodes /stages/stages.4/blocks/blocks.3/   # one block
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def openvino_counters(xml: str, threads: int, runs: int,
                      key: Callable[[Any], Any] = lambda info: (info.node_type, info.exec_type)) -> tuple[float, dict]:
    """The IR compiled as `benchmark_app -hint latency -b 1` compiles it, with PERF_COUNT on: the wall median (ms)
    and, per `key` of each executed node's profiling info, (nodes per inference, microseconds per inference)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(xml)
    shape = list(model.inputs[0].get_partial_shape().get_min_shape())
    shape[0] = 1
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(shape)})
    compiled = core.compile_model(model, "CPU", {
        ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
        ov.properties.hint.inference_precision: ov.Type.f32,
        ov.properties.inference_num_threads: threads,
        ov.properties.enable_profiling: True,
    })
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(30):
        request.infer({0: x})
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    wall = []
    for _ in range(runs):
        t = time.perf_counter()
        request.infer({0: x})
        wall.append(time.perf_counter() - t)
        for info in request.get_profiling_info():
            if info.status != info.Status.EXECUTED:
                continue
            totals[key(info)][0] += 1
            totals[key(info)][1] += info.real_time.total_seconds() * 1e6
    return statistics.median(wall) * 1e3, {k: (c // runs, us / runs) for k, (c, us) in totals.items()}


def profile_openvino(xml: str, threads: int, runs: int, nodes: str = "") -> dict:
    """By (layer type, kernel); with `nodes`, one row per node whose name starts with it (type and kernel beside)."""
    if not nodes:
        wall_ms, totals = openvino_counters(xml, threads, runs)
        return {"wall_ms": wall_ms, "rows": [(t, k, c, us) for (t, k), (c, us) in totals.items()]}
    wall_ms, totals = openvino_counters(xml, threads, runs,
                                        key=lambda info: (info.node_name, f"{info.node_type} {info.exec_type}"))
    return {"wall_ms": wall_ms, "rows": [(n, k, c, us) for (n, k), (c, us) in totals.items() if n.startswith(nodes)]}


def profile_onnxruntime(path: str, threads: int, runs: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from runtimes.cpu import int8_dot_saturates
    from runtimes.ort import EXACT_INT8_KEY

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    trace_dir = Path(tempfile.mkdtemp())
    so.profile_file_prefix = str(trace_dir / "ort")
    if int8_dot_saturates():  # as the project's runner does on CPUs without VNNI
        so.add_session_config_entry(EXACT_INT8_KEY, "1")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1] + [int(d) for d in inp.shape[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    wall = []
    for i in range(30 + runs):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        if i >= 30:
            wall.append(time.perf_counter() - t)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    shutil.rmtree(trace_dir, ignore_errors=True)
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    seen_runs = sum(1 for e in trace if e.get("name") == "model_run")
    skip = seen_runs - runs  # the warm-up runs are in the trace too
    run_index = -1
    for e in trace:
        if e.get("name") == "model_run":
            run_index += 1
            continue
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        # Node events are written before the model_run event that closes their run.
        if run_index + 1 < skip:
            continue
        op = e["args"].get("op_name", "?")
        totals[op][0] += 1
        totals[op][1] += e["dur"]
    rows = [(op, "", c // runs, us / runs) for op, (c, us) in totals.items()]
    return {"wall_ms": statistics.median(wall) * 1e3, "rows": rows}


def _child(kind: str, path: str, threads: int, runs: int, nodes: str) -> None:
    result = profile_openvino(path, threads, runs, nodes) if kind == "openvino" else \
        profile_onnxruntime(path, threads, runs)
    print(json.dumps(result))


def measure(kind: str, path: Path, threads: int, runs: int, nodes: str = "") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(threads), str(runs), nodes],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"profiling {path} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def artifacts(folder: Path) -> list[tuple[str, str, Path]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    found = []
    for art in manifest["artifacts"]:
        if art["backend"] in ("openvino", "onnxruntime") and art.get("target") in (None, "cpu"):
            found.append((art["backend"], art["precision"], folder / art["path"]))
    return found


def table(result: dict, label: str) -> str:
    rows = sorted(result["rows"], key=lambda r: -r[3])
    counted = sum(r[3] for r in rows)
    lines = [f"### {label}", "",
             f"wall median {result['wall_ms']:.3f} ms, counted {counted / 1e3:.3f} ms", "",
             "| layer | kernel | count | us | share |", "|---|---|---:|---:|---:|"]
    for t, k, c, us in rows:
        if us < 0.5:
            continue
        lines.append(f"| {t} | {k} | {c} | {us:.1f} | {us / counted:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="export folders (deploy export --output)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--nodes", default="", metavar="PREFIX",
                    help="OpenVINO only: one row per node whose name starts with PREFIX (e.g. a block's scope, "
                         "/stages/stages.4/blocks/blocks.3/), instead of the totals by layer type")
    args = ap.parse_args()
    from deploy.report import isa_summary, machine_fingerprint

    wanted = args.precisions.split(",")
    env = machine_fingerprint()
    print(f"# Profiles (batch 1, {args.threads} threads, {args.runs} runs, {env['cpu']}: {isa_summary(env)})\n")
    print(f"`python benchmarks/profile.py {' '.join(sys.argv[1:])}`\n")
    for folder in args.folders:
        for backend, precision, path in artifacts(folder):
            if precision not in wanted or (args.nodes and backend != "openvino"):
                continue
            print(f"profiling {path}", file=sys.stderr)
            print(table(measure(backend, path, args.threads, args.runs, args.nodes),
                        f"{folder.name}: {backend} {precision}"))


if __name__ == "__main__":
    main()
