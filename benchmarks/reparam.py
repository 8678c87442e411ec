"""Interleaved ONNX Runtime CPU latency of PartialNet's training-form and reparameterized graphs (spec §6b).

For each variant the training-form model and its reparameterized copy (`export.reparam`) are exported to ONNX and
simplified with onnxsim, then timed by ONNX Runtime on the CPU side by side: every round runs each session K times,
round-robin over all graphs of all variants (in a new random order each round), so load from other processes on the
machine falls on every graph alike. Medians and p90 are per run; the ratio to the training form is also taken per
round, which cancels slow drifts in machine load.

Two other deploy forms of the merged PAT_sp tail are built here from the same folded weights and timed in the same
run, so that the layout of `export.reparam.DeployMLP` (one conv with C+1 rows, then Split/Clip/Mul/Add/Concat) can
be judged against them:

* `reparam+sep-attn`, spec §6b "Variant": the second MLP conv keeps C rows [sA-scaled gated | merged conv half];
  the gate logit is its own C/2 -> 1 conv on the gated rows, with weight (wa / sA) / 6 and bias 1/2.
* `reparam+aligned`: no channel split. The second conv keeps C rows [W2a | merged conv half]; a C -> 1 conv reads
  the gate logit off the gated rows; a 1 -> C conv broadcasts it to the gated half (a constant 1 to the plain half)
  before the clamp; one Mul; a depthwise 1x1 conv applies [sA ; 1] and adds [tA ; 0]. Every tensor of the tail has
  C channels, so ONNX Runtime's NCHWc layout pass keeps the tail and the residual add (fused into the depthwise
  conv) in its blocked layout, with no reorders and no C+1 rows padded up to the block size.

Every graph's logits are compared with the eager training model's on the same input (BatchNorm statistics are
randomized first, so a wrong fold would show). Markdown goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import bisect
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import torch
from torch import Tensor, nn

from export.reparam import HSIG_OFFSET, HSIG_SLOPE, DeployBlock, DeployMLP, bn_affine, reparameterize_model
from deploy.report import cpu_model
from export.to_onnx import export_onnx
from partialnet import DeployError, PartialNet, build_model, get_variant
from partialnet.model import MLPBlock, SpatialAttention

GRAPHS = ("training", "reparam", "reparam+sep-attn", "reparam+aligned")
NCHWC_DOMAIN = "com.microsoft.nchwc"
F64 = torch.float64
# Every graph's logits must match the eager training model's to this fraction of its largest logit.
RELATIVE_TOLERANCE = 1e-4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Alternative deploy forms of the PAT_sp tail, built from export.reparam's folded weights
# --------------------------------------------------------------------------------------------------------


def _conv(weight: Tensor, bias: Tensor, groups: int = 1) -> nn.Conv2d:
    """A 1x1 Conv2d holding exactly these weights (float64 math in, float32 out)."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    conv = nn.Conv2d(in_per_group * groups, out_ch, 1, groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight.to(torch.float32).view(out_ch, in_per_group, 1, 1))
        conv.bias.copy_(bias.to(torch.float32))
    return conv


def _merged_rows(mlp: DeployMLP) -> tuple[Tensor, Tensor, int]:
    """The merged second conv's weight [C+1, 2C] and bias in float64, and the gated half's width."""
    if not mlp.gated:
        raise ValueError("this MLP has no merged PAT_sp; only gated DeployMLPs have an alternative tail")
    half = mlp.splits[0]
    weight = mlp.fc2.weight.detach().to(F64).flatten(1)
    bias = mlp.fc2.bias.detach().to(F64)
    return weight, bias, half


def _bn64(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    scale, shift = bn_affine(bn)
    return scale.to(F64), shift.to(F64)


class SeparateGateMLP(nn.Module):
    """Spec §6b "Variant": C-row second conv, gate logit from a C/2 -> 1 conv on the sA-scaled gated rows."""

    def __init__(self, fc1: nn.Conv2d, act: nn.Module, fc2: nn.Conv2d, attn: nn.Conv2d, shift: Tensor):
        super().__init__()
        self.fc1, self.act, self.fc2, self.attn = fc1, act, fc2, attn
        self.half = attn.in_channels
        self.splits = [self.half, fc2.out_channels - self.half]
        self.shift = nn.Parameter(shift.detach().to(torch.float32).view(1, -1, 1, 1))

    @classmethod
    def from_deploy(cls, mlp: DeployMLP, block: MLPBlock) -> "SeparateGateMLP":
        """logit = wa·(W2a h) = (wa / sA)·(sA W2a h): the gated rows already are sA·W2a h, so divide wa by sA."""
        weight, bias, half = _merged_rows(mlp)
        spatial: SpatialAttention = block.mlp[4]
        scale, _ = _bn64(spatial.norm)
        if scale.abs().min() < 1e-6:
            raise ValueError(
                f"PAT_sp's norm has a scale of {scale.abs().min().item():.3g} on some channel; the separate-gate form "
                f"divides by it. Keep the scale as an explicit Mul for this checkpoint instead."
            )
        attn_w = spatial.conv_attn.weight.detach().to(F64).flatten(1) / scale[None, :] * HSIG_SLOPE
        attn_b = torch.full((1,), HSIG_OFFSET, dtype=F64)
        rows = torch.cat((torch.arange(half), torch.arange(half + 1, weight.shape[0])))
        fc2 = _conv(weight[rows], bias[rows])
        return cls(mlp.fc1, mlp.act, fc2, _conv(attn_w, attn_b), mlp.gate_shift.detach().flatten())

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(self.act(self.fc1(x)))
        gated, plain = torch.split(z, self.splits, dim=1)
        return torch.cat((gated * self.attn(gated).clamp(0.0, 1.0) + self.shift, plain), dim=1)


class AlignedGateMLP(nn.Module):
    """PAT_sp tail with every tensor C channels wide: `affine(z * clamp(expand(logit(z)), 0, 1))`, z = fc2(h).

    fc2 has C rows [W2a h (gated, not yet scaled by sA) ; merged conv half]. `logit` (C -> 1) reads the gated rows
    with wa / 6 and bias 1/2; `expand` (1 -> C) copies the logit to the gated half and gives a constant 1 to the
    plain half; `affine` is a depthwise 1x1 conv with weight [sA ; 1] and bias [tA ; 0], into which ONNX Runtime
    fuses the residual add. Exact for any sA (nothing is divided).
    """

    def __init__(self, fc1: nn.Conv2d, act: nn.Module, fc2: nn.Conv2d, logit: nn.Conv2d, expand: nn.Conv2d,
                 affine: nn.Conv2d):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.logit, self.expand, self.affine = logit, expand, affine

    @classmethod
    def from_deploy(cls, mlp: DeployMLP, block: MLPBlock) -> "AlignedGateMLP":
        weight, bias, half = _merged_rows(mlp)
        dim = weight.shape[0] - 1
        conv2: nn.Conv2d = block.mlp[3]
        spatial: SpatialAttention = block.mlp[4]
        scale, shift = _bn64(spatial.norm)
        w2a = conv2.weight.detach().to(F64).flatten(1)[:half]
        b2a = torch.zeros(half, dtype=F64) if conv2.bias is None else conv2.bias.detach().to(F64)[:half]
        fc2 = _conv(torch.cat((w2a, weight[half + 1:])), torch.cat((b2a, bias[half + 1:])))
        logit_w = torch.zeros(1, dim, dtype=F64)
        logit_w[0, :half] = spatial.conv_attn.weight.detach().to(F64).flatten() * HSIG_SLOPE
        logit = _conv(logit_w, torch.full((1,), HSIG_OFFSET, dtype=F64))
        gated = (torch.arange(dim) < half).to(F64)
        expand = _conv(gated.view(dim, 1), 1.0 - gated)
        affine_w = torch.ones(dim, 1, dtype=F64)
        affine_w[:half, 0] = scale
        affine_b = torch.zeros(dim, dtype=F64)
        affine_b[:half] = shift
        return cls(mlp.fc1, mlp.act, fc2, logit, expand, _conv(affine_w, affine_b, groups=dim))

    def forward(self, x: Tensor) -> Tensor:
        z = self.fc2(self.act(self.fc1(x)))
        return self.affine(z * self.expand(self.logit(z)).clamp(0.0, 1.0))


def _block_pairs(training: PartialNet, deployed: PartialNet) -> Iterator[tuple[MLPBlock, DeployBlock]]:
    """Each training block with its folded counterpart (reparameterization replaces blocks in place, in order)."""
    train_blocks = [m for m in training.modules() if isinstance(m, MLPBlock)]
    deploy_blocks = [m for m in deployed.modules() if isinstance(m, DeployBlock)]
    if len(train_blocks) != len(deploy_blocks):
        raise ValueError(f"{len(train_blocks)} training blocks but {len(deploy_blocks)} deploy blocks")
    return zip(train_blocks, deploy_blocks)


def with_tail(
    training: PartialNet, deployed: PartialNet, make: Callable[[DeployMLP, MLPBlock], nn.Module]
) -> PartialNet:
    """A copy of `deployed` whose merged PAT_sp tails are rebuilt by `make` from the folded MLP and the training
    block it came from (for PAT_sp's own weights)."""
    alt = copy.deepcopy(deployed)
    for train_block, deploy_block in _block_pairs(training, alt):
        if isinstance(deploy_block.mlp, DeployMLP) and deploy_block.mlp.gated:
            deploy_block.mlp = make(deploy_block.mlp, train_block)
    return alt.eval()


def randomize_batchnorms(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affines, so that the folds and the alternatives are really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))  # type: ignore[union-attr]
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------
# Graphs and sessions
# --------------------------------------------------------------------------------------------------------


@dataclass
class Graph:
    """One exported graph, its static counts and, once run, its latency samples (ms)."""

    variant: str
    name: str
    path: Path
    nodes: int
    convs: int
    ort_nodes: int = 0
    nchwc_convs: int = 0
    reorders: int = 0
    max_abs_diff: float = 0.0
    samples: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.name}"


def _export(model: nn.Module, dest: Path, input_size: int, simplify: bool) -> onnx.ModelProto:
    proto = export_onnx(model, dest, input_size, force=True)
    if not simplify:
        return proto
    simplified, ok = onnxsim.simplify(proto, initializers_as_constants=False)
    if not ok:
        raise RuntimeError(f"onnxsim's own check failed on {dest.name}; run with --unsimplified to see the raw graph")
    onnx.save(simplified, str(dest))
    return simplified


def build_graphs(
    variant: str, graphs: Sequence[str], workdir: Path, unsimplified: bool, seed: int, x: np.ndarray
) -> tuple[list[Graph], np.ndarray]:
    """Export the requested graphs of one variant into `workdir` (simplified; raw copies too if asked), and the
    eager training model's logits on `x`, the reference every graph is checked against."""
    input_size = x.shape[-1]
    training = build_model(variant, seed=seed, log=log).model.eval()
    randomize_batchnorms(training, seed)
    with torch.no_grad():
        reference = training(torch.from_numpy(x)).numpy()
    deployed = reparameterize_model(training, input_size)
    models: dict[str, Callable[[], nn.Module]] = {
        "training": lambda: training,
        "reparam": lambda: deployed,
        "reparam+sep-attn": lambda: with_tail(training, deployed, SeparateGateMLP.from_deploy),
        "reparam+aligned": lambda: with_tail(training, deployed, AlignedGateMLP.from_deploy),
    }
    out: list[Graph] = []
    for name in graphs:
        model = models[name]()
        forms = [(name, True)] + ([(f"{name} (raw)", False)] if unsimplified else [])
        for label, simplify in forms:
            log(f"exporting {variant} {label}")
            dest = workdir / f"{variant}.{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
            proto = _export(model, dest, input_size, simplify)
            ops = Counter(n.op_type for n in proto.graph.node)
            out.append(Graph(variant, label, dest, len(proto.graph.node), ops["Conv"]))
    return out, reference


def session_options(threads: int, allow_spinning: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Every session owns a thread pool; spinning workers of the session that just ran would steal the cores from
    # the next one in the round-robin, so spinning is off unless asked for.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = 3
    return so


def open_session(path: Path, so: ort.SessionOptions) -> ort.InferenceSession:
    session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise RuntimeError(f"onnxruntime did not start the CPU provider for {path.name}: {session.get_providers()}")
    return session


def count_optimized(graph: Graph, threads: int) -> None:
    """Op counts of the graph as ONNX Runtime optimized it (NCHWc convs, reorders) from optimized_model_filepath."""
    so = session_options(threads, allow_spinning=False)
    optimized = graph.path.with_suffix(".ort.onnx")
    so.optimized_model_filepath = str(optimized)
    open_session(graph.path, so)
    proto = onnx.load(str(optimized))
    graph.ort_nodes = len(proto.graph.node)
    graph.nchwc_convs = sum(n.op_type == "Conv" and n.domain == NCHWC_DOMAIN for n in proto.graph.node)
    graph.reorders = sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in proto.graph.node)


def measure_interleaved(
    graphs: Sequence[Graph],
    sessions: Sequence[ort.InferenceSession],
    feed: dict[str, np.ndarray],
    warmup: int,
    rounds: int,
    per_round: int,
    seed: int,
) -> None:
    """Every round runs each session `per_round` times, in a fresh random order (so no graph always follows the
    same neighbour or goes first); fills each graph's samples and per-round medians."""
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        for k in rng.permutation(len(sessions)):
            run = []
            for _ in range(per_round):
                t0 = time.perf_counter_ns()
                sessions[k].run(None, feed)
                run.append((time.perf_counter_ns() - t0) / 1e6)
            graphs[k].samples.extend(run)
            graphs[k].round_medians.append(statistics.median(run))
        if (r + 1) % max(1, rounds // 5) == 0:
            log(f"round {r + 1}/{rounds}")


@dataclass
class OpProfile:
    """Per op type as ORT ran it: (nodes per run, median over runs of their summed kernel ms); and the MACs the
    convs really executed, NCHWc block padding included (weight as reordered x output pixels)."""

    ops: dict[str, tuple[int, float]]
    conv_macs: int


def profile_ops(
    graphs: Sequence[Graph], threads: int, feed: dict[str, np.ndarray], runs: int, workdir: Path
) -> dict[str, OpProfile]:
    """ORT's profiler on each graph; the profiled sessions also run round-robin so load falls on all alike."""
    sessions = []
    for g in graphs:
        so = session_options(threads, allow_spinning=False)
        so.enable_profiling = True
        so.profile_file_prefix = str(workdir / f"{g.path.stem}.profile")
        sessions.append(open_session(g.path, so))
    # One extra run: the first profiled run carries one-off allocation costs and is dropped below.
    for _ in range(runs + 1):
        for session in sessions:
            session.run(None, feed)
    return {g.name: _ops_per_run(Path(s.end_profiling())) for g, s in zip(graphs, sessions)}


def _ops_per_run(trace: Path) -> OpProfile:
    events = json.loads(trace.read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(starts))
    counts: Counter[str] = Counter()
    macs = 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        idx = bisect.bisect_right(starts, e["ts"]) - 1
        if idx < 0:
            continue
        args = e["args"]
        op = args["op_name"]
        per_run[op][idx] += e["dur"] / 1e3
        counts[op] += 1
        if op == "Conv" and idx == 0:
            weight = next(iter(args["input_type_shape"][1].values()))
            n, _, h, w = next(iter(args["output_type_shape"][0].values()))
            macs += int(np.prod(weight)) * n * h * w
    ops = {op: (counts[op] // len(starts), statistics.median(t[1:] or t)) for op, t in per_run.items()}
    return OpProfile(ops, macs)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _round_ratio(graph: Graph, ref: Graph | None) -> str:
    """Median and p10/p90 over rounds of graph / ref, each round's median against the same round's median."""
    if ref is None:
        return "n/a"
    per_round = [a / b for a, b in zip(graph.round_medians, ref.round_medians)]
    return f"{statistics.median(per_round):.3f} [{_pct(per_round, 10):.3f}, {_pct(per_round, 90):.3f}]"


def results_table(graphs: Sequence[Graph]) -> str:
    rows = [
        "| variant | graph | nodes | convs | ORT nodes | NCHWc convs | reorders | min ms | p50 ms | p90 ms "
        "| speed-up vs training | per-round ratio to training, p50 [p10, p90] | per-round ratio to reparam "
        "| max abs Δ logits vs eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    training = {g.variant: g for g in graphs if g.name == "training"}
    reparam = {g.variant: g for g in graphs if g.name == "reparam"}
    for g in graphs:
        p50 = statistics.median(g.samples)
        ref = training.get(g.variant)
        speed = "n/a" if ref is None else f"{statistics.median(ref.samples) / p50:.3f}×"
        rows.append(
            f"| {g.variant} | {g.name} | {g.nodes} | {g.convs} | {g.ort_nodes} | {g.nchwc_convs} | {g.reorders} "
            f"| {min(g.samples):.2f} | {p50:.2f} | {_pct(g.samples, 90):.2f} | {speed} "
            f"| {_round_ratio(g, ref)} | {_round_ratio(g, reparam.get(g.variant))} | {g.max_abs_diff:.1e} |"
        )
    return "\n".join(rows)


def profile_table(variant: str, profiles: dict[str, OpProfile]) -> str:
    names = list(profiles)

    def worst(op: str) -> float:
        return -max(p.ops.get(op, (0, 0.0))[1] for p in profiles.values())

    rows = [
        f"| {variant}: op type | " + " | ".join(f"{n}: nodes, ms" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for op in sorted({op for p in profiles.values() for op in p.ops}, key=worst):
        cells = [f"{p.ops[op][0]}, {p.ops[op][1]:.3f}" if op in p.ops else "–" for p in profiles.values()]
        rows.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [
        f"{sum(c for c, _ in p.ops.values())}, {sum(t for _, t in p.ops.values()):.3f}" for p in profiles.values()
    ]
    rows.append("| **all kernels** | " + " | ".join(totals) + " |")
    rows.append("| conv MACs run (M, NCHWc padding incl.) | " + " | ".join(
        f"{p.conv_macs / 1e6:.1f}" for p in profiles.values()) + " |")
    return "\n".join(rows)


def cpu_pressure_us() -> int | None:
    """Linux PSI: total µs during which some runnable task waited for a CPU (None where PSI is unavailable)."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


def _cpu_isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2", "neon") if f" {isa}" in flags), "baseline")


def environment(args: argparse.Namespace, pressure: float | None) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    command = f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} {shlex.join(sys.argv)}"
    return "\n".join(
        [
            f"- command: `{command}`",
            f"- CPU: {cpu_model()}, {cpus} logical CPUs usable, widest SIMD: {_cpu_isa()}; load average now "
            f"(1/5/15 min): {load}; CPU pressure while timing (share of wall time some task waited for a core, "
            f"Linux PSI): {'n/a' if pressure is None else f'{pressure:.0%}'}",
            f"- onnxruntime {ort.__version__}, CPUExecutionProvider, intra-op threads {args.threads}, inter-op 1, "
            f"sequential, graph optimization ALL, spinning {'on' if args.allow_spinning else 'off'}",
            f"- torch {torch.__version__}, onnx {onnx.__version__}, onnxsim {onnxsim.__version__}, "
            f"python {platform.python_version()}, {platform.system()} {platform.release()}",
            f"- input {args.batch}x3x{args.input_size}x{args.input_size} (fixed, seed {args.seed}); "
            f"{args.warmup} warm-up runs per graph; {args.rounds} interleaved rounds x {args.per_round} runs per graph",
        ]
    )


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/reparam.py",
        description="Interleaved ONNX Runtime CPU latency: training-form vs reparameterized PartialNet graphs.",
    )
    p.add_argument("--variants", nargs="+", default=["partialnet_t0", "partialnet_t1"], metavar="NAME",
                   help="variants to export (PAT_sp on, fresh seeded weights); default: %(default)s")
    p.add_argument("--graphs", nargs="+", choices=GRAPHS, default=list(GRAPHS),
                   help="graphs per variant; 'training' is the reference for ratios; default: all")
    p.add_argument("--unsimplified", action="store_true", help="also time each graph without onnxsim")
    p.add_argument("--threads", type=_positive, default=2, help="ONNX Runtime intra-op threads (default: 2)")
    p.add_argument("--batch", type=_positive, default=1, help="batch size (default: 1)")
    p.add_argument("--input-size", type=_positive, default=224, help="square input side in px (default: 224)")
    p.add_argument("--rounds", type=_positive, default=50, help="interleaved rounds (default: 50)")
    p.add_argument("--per-round", type=_positive, default=3, help="timed runs per graph per round (default: 3)")
    p.add_argument("--warmup", type=_non_negative, default=10, help="untimed runs per graph first (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, BN statistics and the input (default: 0)")
    p.add_argument("--allow-spinning", action="store_true",
                   help="let ORT worker threads spin between runs (off by default: idle sessions would steal cores)")
    p.add_argument("--profile", action="store_true",
                   help="also print per-op-type kernel times and conv MACs from ORT's profiler (separate "
                        "profiling sessions, run round-robin per variant after the timing)")
    p.add_argument("--profile-runs", type=_positive, default=30, help="profiled runs per graph (default: 30)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DeployError as e:
        log(f"error: {e}")
        return e.exit_code


def run(args: argparse.Namespace) -> int:
    """Export, check, time interleaved, report; optionally profile."""
    variants = [get_variant(name).name for name in args.variants]
    x = np.random.default_rng(args.seed).standard_normal((args.batch, 3, args.input_size, args.input_size))
    feed = {"input": x.astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="reparam-bench-") as tmp:
        workdir = Path(tmp)
        graphs: list[Graph] = []
        reference: dict[str, np.ndarray] = {}
        for v in variants:
            own, reference[v] = build_graphs(v, args.graphs, workdir, args.unsimplified, args.seed, feed["input"])
            graphs += own
        so = session_options(args.threads, args.allow_spinning)
        sessions = [open_session(g.path, so) for g in graphs]
        for g, s in zip(graphs, sessions):
            count_optimized(g, args.threads)
            ref = reference[g.variant]
            g.max_abs_diff = float(np.abs(s.run(None, feed)[0] - ref).max())
            if g.max_abs_diff > RELATIVE_TOLERANCE * float(np.abs(ref).max()):
                raise RuntimeError(
                    f"{g.label} changes the logits by {g.max_abs_diff:.3g} against the eager training model (largest "
                    f"logit {float(np.abs(ref).max()):.3g}); the graph is not equivalent, so its timing means nothing."
                )
        log(f"timing {len(sessions)} sessions, {args.rounds} rounds x {args.per_round} runs each")
        stalled, started = cpu_pressure_us(), time.perf_counter()
        measure_interleaved(graphs, sessions, feed, args.warmup, args.rounds, args.per_round, args.seed)
        stalled_after, wall = cpu_pressure_us(), time.perf_counter() - started
        pressure = None if stalled is None or stalled_after is None else (stalled_after - stalled) / 1e6 / wall
        del sessions

        print("## Reparameterization: ONNX Runtime CPU latency, interleaved\n")
        print(results_table(graphs))
        print(
            "\nnodes/convs: the ONNX file; ORT nodes, NCHWc convs, reorders: the graph after ORT's optimizations "
            "(ReorderInput/ReorderOutput convert between NCHW and the blocked NCHWc layout). Speed-up: training "
            "p50 / graph p50. Per-round ratio: graph / reference, each round's median over the same round's median "
            "(robust to load that changes between rounds).\n"
        )
        print(environment(args, pressure))

        if args.profile:
            print("\n## Per-op-type kernel time (ORT profiler; ms per run, median over runs)\n")
            print("Profiling adds a small cost per node, so these totals exceed the latencies above.\n")
            for v in variants:
                own = [g for g in graphs if g.variant == v]
                log(f"profiling {v}")
                print(profile_table(v, profile_ops(own, args.threads, feed, args.profile_runs, workdir)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
