"""The attention-module conformance table (benchmarks/MODULES.md): each module of partialnet/attention.py in the
same small CNN, through the whole `deploy export --int8` pipeline.

For every module: weights with randomized BatchNorm statistics (so the folds are not trivially the identity) are
saved, `deploy export partialnet.attention:NAME_cnn --weights W --int8` runs (fold, ONNX, both CPU backends, INT8,
validation on the embedded images, a short latency run), and the table takes from its report: FP32 error against
eager at batch 1 and 8 (relative to the largest logit), each INT8 artifact's top-1 agreement, cosine and KL against
eager, p50 latency at batch 1 against eager, and the ONNX ops of model.onnx. For modules with activation x
activation MatMuls, `--policy-check` also runs benchmarks/int8.py with the default float policy with and without
its `act_matmul` part, each backend's INT8 against its own FP32.

    python benchmarks/modules.py --size 64 --policy-check > benchmarks/MODULES.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibration.policy import DEFAULT_PARTS, OnnxGraph  # noqa: E402
from deploy.pipeline import ExportRequest, run_export  # noqa: E402
from partialnet.attention import ATTENTION, FACTORIES  # noqa: E402
from partialnet.build import init_weights  # noqa: E402
from partialnet.console import Console  # noqa: E402

CPU_BACKENDS = ("onnxruntime", "openvino")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def randomized_weights(name: str, path: Path, seed: int = 0) -> None:
    """The conformance CNN with fan-in weights and random BN statistics and affines, saved as a state dict."""
    torch.manual_seed(seed)
    model = FACTORIES[name]()
    init_weights(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.6 - 0.3)
    torch.save(model.state_dict(), path)


def _rel(drift: dict) -> float:
    return drift["max_abs_logit_error"] / max(drift["max_ref_logit"], 1e-12)


def measure(name: str, size: int, work: Path) -> dict:
    weights = work / f"{name}.pth"
    randomized_weights(name, weights)
    out = work / name
    result = run_export(ExportRequest(variant=f"partialnet.attention:{name}_cnn", weights=str(weights),
                                      input_size=size, int8=True, output=str(out), force=True),
                        Console(quiet=True))
    report = json.loads((out / "report.json").read_text())["sections"]
    post = report["post_export_check"]
    batch_n = next(k for k in post if k.startswith("batch_") and k != "batch_1")
    row: dict = {"module": name, "class": ATTENTION[name].__name__, "exit": int(result.exit_code),
                 "fp32_b1": _rel(post["batch_1"]["drift"]), f"fp32_b{batch_n[6:]}": _rel(post[batch_n]["drift"])}
    for key, check in report["backend_checks"].items():
        row[f"{key} b1"] = _rel(check["batch_1"]["drift"])
    validation = json.loads((out / "validation.json").read_text())
    for art in validation["artifacts"]:
        if art["precision"] == "int8" and art["backend"] in CPU_BACKENDS:
            row[art["backend"]] = {"agree": art["top1_agreement"], "cos": art["cosine_similarity"],
                                   "kl": art["mean_kl"]}
    lat = {r["key"]: r["p50_ms"] for r in report["latency"]["rows"] if r["batch_size"] == 1}
    row["latency_ms"] = lat
    proto = onnx.load(str(out / "model.onnx"))
    row["ops"] = sorted({n.op_type for n in proto.graph.node})
    row["act_matmuls"] = len(OnnxGraph(proto).part_nodes("act_matmul"))
    row["folder"] = str(out)
    return row


def policy_check(folder: str) -> str:
    """benchmarks/int8.py on one export: the default float policy without act_matmul, and the default."""
    pols = f"{'+'.join(p for p in DEFAULT_PARTS if p != 'act_matmul')},default"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "int8.py"), folder, "--policies", pols,
                           "--calib", "64", "--eval", "128"], capture_output=True, text=True, check=True)
    return proc.stdout


def table(rows: list[dict], size: int) -> str:
    lines = [f"| module | FP32 err b1 | FP32 err b8 | OV FP32 err | ORT INT8 agree / cos / KL | "
             f"OV INT8 agree / cos / KL | eager ms | ORT fp32 / int8 ms | OV fp32 / int8 ms | ONNX ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b8 = next(v for k, v in r.items() if k.startswith("fp32_b") and k != "fp32_b1")
        lat = r["latency_ms"]

        def q(b: str) -> str:
            d = r.get(b)
            return f"{d['agree']:.3f} / {d['cos']:.5f} / {d['kl']:.1e}" if d else "skipped"

        lines.append(
            f"| {r['module']} ({r['class']}) | {r['fp32_b1']:.1e} | {b8:.1e} | {r.get('openvino/fp32 b1', float('nan')):.1e} "
            f"| {q('onnxruntime')} | {q('openvino')} | {lat.get('eager', float('nan')):.2f} "
            f"| {lat.get('onnxruntime/fp32', float('nan')):.2f} / {lat.get('onnxruntime/int8', float('nan')):.2f} "
            f"| {lat.get('openvino/fp32', float('nan')):.2f} / {lat.get('openvino/int8', float('nan')):.2f} "
            f"| {', '.join(r['ops'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64, help="input size (default 64)")
    ap.add_argument("--modules", default=",".join(ATTENTION), help="comma-separated (default: all)")
    ap.add_argument("--policy-check", action="store_true",
                    help="also compare the default float policy with and without act_matmul where the graph has such MatMuls")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="modules-"))
    rows = []
    for name in args.modules.split(","):
        log(f"{name}: exporting")
        rows.append(measure(name, args.size, work))
        log(f"  {rows[-1]}")
    print(f"# Attention modules through `deploy export --int8` ({args.size} px, embedded images)\n")
    print(table(rows, args.size))
    if args.policy_check:
        for r in rows:
            if r["act_matmuls"]:
                log(f"{r['module']}: policy check")
                print(f"\n### {r['module']}: {r['act_matmuls']} activation x activation MatMul(s)\n")
                print(policy_check(r["folder"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
