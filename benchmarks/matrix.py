"""The deployment matrix: variants x available backends x FP32 (and INT8 where it can be built), against eager.

For each variant this runs, each as its own `deploy` process (so thread pools and memory never carry over):

    deploy export VARIANT --output WORK/VARIANT --force --int8     (without --int8 if this deploy has no such option)
    deploy validate WORK/VARIANT --json                            (drift and agreement against eager)
    deploy bench WORK/VARIANT --json                               (interleaved latency, speed-up against eager)

and writes one Markdown file (default benchmarks/RESULTS.md) with the ratios against eager, the command line and
the machine. Progress goes to stderr. It is a script that measures, never a test: nothing here asserts on time.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VARIANTS = ("partialnet_t0", "partialnet_t1", "partialnet_t2")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """What one variant produced: the export's notes, and the validate and bench documents when they ran."""

    variant: str
    folder: Path
    notes: list[str] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    error: str | None = None


def deploy(*args: str) -> subprocess.CompletedProcess:
    """Run `deploy ARGS` in a fresh interpreter from the repository root; stdout and stderr are captured."""
    cmd = [sys.executable, "-m", "deploy", *args]
    log(f"$ deploy {shlex.join(args)}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log(f"  exit {done.returncode} after {time.perf_counter() - t0:.0f} s")
    return done


def last_line(text: str) -> str:
    """The error deploy printed (its last 'error:' line), else the last line of stderr."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "deploy: error:"))]
    return (errors or lines or ["(no output)"])[-1]


def export(variant: str, folder: Path, args: argparse.Namespace, notes: list[str]) -> bool:
    """Export with --int8 when this deploy supports it, else FP32 only (said in the notes); True if usable."""
    base = ["export", variant, "--output", str(folder), "--force", "--precisions", args.precisions, "-q"]
    if args.backends:
        base += ["--backends", args.backends]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if args.data:
        base += ["--val-data", args.data]
    if variant in args.checkpoint:
        base += ["--checkpoint", args.checkpoint[variant]]
    if args.int8:
        done = deploy(*base, "--int8")
        if done.returncode == 2 and "--int8" in done.stderr:
            notes.append(f"INT8 not built: this `deploy export` does not take --int8 ({last_line(done.stderr)}); "
                         f"FP32 only.")
            done = deploy(*base)
    else:
        notes.append("INT8 not requested (--no-int8).")
        done = deploy(*base)
    if done.returncode == 3:
        notes.append(f"the post-export check failed (exit 3): {last_line(done.stderr)}; the artifacts were still "
                     f"validated and timed.")
    elif done.returncode != 0:
        notes.append(f"export failed (exit {done.returncode}): {last_line(done.stderr)}")
        return False
    return True


def json_of(done: subprocess.CompletedProcess, what: str, notes: list[str], ok: Sequence[int] = (0,)) -> dict | None:
    if done.returncode not in ok:
        notes.append(f"{what} failed (exit {done.returncode}): {last_line(done.stderr)}")
        return None
    return json.loads(done.stdout)


def run_variant(variant: str, work: Path, args: argparse.Namespace) -> Outcome:
    out = Outcome(variant, work / variant)
    if not export(variant, out.folder, args, out.notes):
        return out
    common = ["--json", "-q"] + (["--threads", str(args.threads)] if args.threads else [])
    common += ["--backends", args.backends] if args.backends else []
    val = ["validate", str(out.folder), *common, "--samples", str(args.samples)]
    val += ["--data", args.data] if args.data else []
    out.validation = json_of(deploy(*val), "validate", out.notes, ok=(0, 3))
    if out.validation is not None and not out.validation["passed"]:
        out.notes.append("validation gates failed: " + "; ".join(out.validation["failures"]))
    bench = ["bench", str(out.folder), *common, "--batch-sizes", args.batch_sizes,
             "--warmup-s", str(args.warmup_s), "--duration-s", str(args.duration_s)]
    out.bench = json_of(deploy(*bench), "bench", out.notes)
    return out


# --------------------------------------------------------------------------- RESULTS.md


def _validation_rows(doc: dict | None) -> dict[tuple[str, str], dict]:
    return {(a["backend"], a["precision"]): a for a in doc["artifacts"]} if doc else {}


def variant_table(o: Outcome) -> list[str]:
    """Per (artifact, batch size): latency, throughput, speed-up against eager, and the validation beside it."""
    if o.bench is None:
        return ["No benchmark for this variant (see the notes)."]
    val = _validation_rows(o.validation)
    lines = ["| backend | precision | batch | p50 ms | p90 ms | p99 ms | images/s | speed-up vs eager (p50) | "
             "top-1 agreement | max abs Δlogit | validation |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in o.bench["rows"]:
        v = val.get((r["backend"], r["precision"]))
        verdict = "-" if v is None else "reference" if r["backend"] == "eager" else "pass" if v["passed"] else "FAIL"
        agree = "-" if v is None else f"{v['top1_agreement']:.4f}"
        err = "-" if v is None else f"{v['max_abs_logit_error']:.3g}"
        lines.append(f"| {r['backend']} | {r['precision']} | {r['batch_size']} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['throughput']:.1f} | {r['speedup_vs_eager']:.2f}x | "
                     f"{agree} | {err} | {verdict} |")
    return lines


def summary_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Speed-up against eager (p50) per variant and batch size, one column per artifact."""
    columns: list[tuple[str, str]] = []
    for o in outcomes:
        for r in (o.bench or {}).get("rows", []):
            key = (r["backend"], r["precision"])
            if r["backend"] != "eager" and key not in columns:
                columns.append(key)
    if not columns:
        return ["No benchmark results."]
    lines = ["| variant | batch | eager p50 ms | " + " | ".join(f"{b} {p}" for b, p in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for o in outcomes:
        rows = (o.bench or {}).get("rows", [])
        for bs in sorted({r["batch_size"] for r in rows}):
            at = {(r["backend"], r["precision"]): r for r in rows if r["batch_size"] == bs}
            cells = [f"{at[c]['speedup_vs_eager']:.2f}x" if c in at else "-" for c in columns]
            lines.append(f"| {o.variant} | {bs} | {at[('eager', 'fp32')]['p50_ms']:.2f} | " + " | ".join(cells) + " |")
    return lines


def environment_lines(outcomes: Sequence[Outcome]) -> list[str]:
    docs = [d for o in outcomes for d in (o.bench, o.validation) if d is not None]
    if not docs:
        return ["- (no deploy run finished, so no environment was recorded)"]
    env = docs[0]["environment"]
    isa = env["isa"] if isinstance(env["isa"], str) else ", ".join(k for k, v in env["isa"].items() if v) or "none"
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return [f"- CPU: {env['cpu']} ({env['usable_cpus']} usable of {env['logical_cpus']} logical CPUs); "
            f"load average at the end (1/5/15 min): {load}",
            f"- ISA extensions: {isa}",
            f"- GPU: {', '.join(env['gpu']) if env['gpu'] else 'none'}",
            f"- platform: {env['platform']}",
            "- libraries: " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items())]


def results_markdown(outcomes: Sequence[Outcome], args: argparse.Namespace, argv: Sequence[str], wall_s: float) -> str:
    command = f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} benchmarks/matrix.py {shlex.join(argv)}"
    threads = args.threads or "each library's default"
    lines = ["# PartialNet deployment matrix", "",
             f"Created {datetime.now(timezone.utc).isoformat(timespec='seconds')} in {wall_s:.0f} s.", "",
             f"- command: `{command}`",
             f"- timing: `deploy bench`, interleaved round-robin over eager and every artifact; batch sizes "
             f"{args.batch_sizes}; {args.warmup_s:g} s warm-up and {args.duration_s:g} s timed per runner and batch "
             f"size; threads: {threads}",
             f"- drift: `deploy validate` on {args.data or f'{args.samples} images of the embedded default set'}; "
             f"speed-up = eager p50 / artifact p50 at the same batch size",
             "- weights: " + (", ".join(f"{k}: {v}" for k, v in args.checkpoint.items()) if args.checkpoint else
                              "freshly initialised, seeded (no --checkpoint): latency is representative, "
                              "agreement figures are not accuracy"), "",
             "## Speed-up against eager (p50)", "", *summary_table(outcomes), ""]
    for o in outcomes:
        size = (o.bench or o.validation or {}).get("export", {}).get("input_size")
        lines += [f"## {o.variant}" + (f" at {size} px" if size else ""), "", *variant_table(o), ""]
        lines += [f"- {n}" for n in o.notes] + ([""] if o.notes else [])
    lines += ["## Environment", "", *environment_lines(outcomes), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def _checkpoints(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"matrix.py: error: --checkpoint takes VARIANT=PATH, got {item!r}")
        out[name] = str(Path(path).resolve())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/matrix.py", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated (default: %(default)s)")
    p.add_argument("--backends", help="comma-separated backends (default: every backend usable here)")
    p.add_argument("--precisions", default="fp32", help="float precisions to export besides INT8 (default: fp32)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="do not ask the export for INT8")
    p.add_argument("--checkpoint", action="append", default=[], metavar="VARIANT=PATH",
                   help="weights for a variant (repeatable; default: fresh seeded weights)")
    p.add_argument("--data", help="images for validation and INT8 calibration (default: the embedded set)")
    p.add_argument("--samples", type=int, default=64, help="validation images (default: 64)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: 1,8)")
    p.add_argument("--warmup-s", type=float, default=1.0, help="warm-up seconds per runner and batch (default: 1)")
    p.add_argument("--duration-s", type=float, default=5.0, help="timed seconds per runner and batch (default: 5)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every runtime (default: each library's default)")
    p.add_argument("--work-dir", help="where the exports go (default: a temporary folder, removed at the end)")
    p.add_argument("--output", default=str(REPO / "benchmarks" / "RESULTS.md"), help="Markdown file to write")
    p.add_argument("--generic", type=Path, help="a benchmarks/generic.py result (GENERIC.md) to include as the "
                                                 "section on this project's lead over the generic pipeline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.checkpoint = _checkpoints(args.checkpoint)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="partialnet-matrix-") as tmp:
        work = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        outcomes = []
        for variant in variants:
            log(f"== {variant}")
            outcomes.append(run_variant(variant, work, args))
    text = results_markdown(outcomes, args, argv, time.perf_counter() - t0)
    if args.generic:
        body = args.generic.read_text(encoding="utf-8").split("\n", 1)[1].strip()
        text = text.rstrip() + f"\n\n## Against the generic pipeline ({args.generic.name})\n\n{body}\n"
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    log(f"wrote {out}")
    return 0 if all(o.bench is not None for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
