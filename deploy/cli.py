"""The `deploy` command: a thin argparse layer over plain functions in deploy/.

Results go to stdout, notes and progress to stderr. Every error is one line on stderr and an exit code
(`partialnet.errors.ExitStatus`): 0 success, 1 failure, 2 usage error, 3 a validation gate failed, 130
interrupted. `--traceback` shows the stack. Importing this module loads no torch, onnx or runtime: each handler
imports its heavy module when it runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from deploy import argtypes
from partialnet.console import Console
from partialnet.errors import DeployError, ExitStatus, UsageError

PROG = "deploy"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _add_model_args(p: argparse.ArgumentParser, *, checkpoint_required: bool = False) -> None:
    p.add_argument("variant", help="variant name, e.g. partialnet_t0 (see 'deploy list')")
    p.add_argument("--checkpoint", "-c", required=checkpoint_required,
                   help="official checkpoint: Lightning .ckpt, .pth state dict, or .safetensors")
    sp = p.add_mutually_exclusive_group()
    sp.add_argument("--spatial-attn", dest="spatial_attn", action="store_const", const=True, default=None,
                    help="force PAT_sp on (default: read from the checkpoint; on for a fresh model)")
    sp.add_argument("--no-spatial-attn", dest="spatial_attn", action="store_const", const=False,
                    help="force PAT_sp off (the published cfgs of T0, T2, S, M, L)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow checkpoints that need arbitrary pickled code (only for files you trust)")
    p.add_argument("--input-size", type=argtypes.input_size, default=None, help="input resolution N (multiple of 32)")


def _load(args) -> "object":
    from partialnet import build_model

    return build_model(args.variant, args.checkpoint, spatial_attn=args.spatial_attn, allow_pickle=args.allow_pickle,
                       log=_console(args))


def _console(args) -> Console:
    """Where notes and progress go: stderr, or nowhere with --quiet."""
    return Console(quiet=getattr(args, "quiet", False))


# --------------------------------------------------------------------------- handlers


def cmd_list(args) -> int:
    from deploy.catalog import format_table, variant_rows, zoo_rows

    rows, zoo = variant_rows(), zoo_rows()
    print(json.dumps(rows + zoo, indent=2) if args.json else f"{format_table(rows)}\n\n{format_table(zoo)}")
    return ExitStatus.OK


def cmd_info(args) -> int:
    from deploy.catalog import format_info, model_info

    lm = _load(args)
    info = model_info(lm, args.input_size or lm.variant.preprocess.input_size)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return ExitStatus.OK


def cmd_predict(args) -> int:
    from pathlib import Path

    import numpy as np

    from deploy.inputs import gather_inputs, read_labels
    from deploy.predict import format_topk, require_finite_logits, run_batched, topk

    target = Path(args.variant)
    if target.is_dir():
        runner, pp, fixed = _artifact_runner(args, target)
    else:
        from deploy.backends import EAGER, RunnerOptions

        if args.backend != EAGER.name:
            raise UsageError(
                f"--backend {args.backend} runs an export folder; {args.variant!r} is a variant name, which runs only "
                f"with --backend {EAGER.name}. Export it first: deploy export {args.variant}."
            )
        lm = _load(args)
        size = args.input_size or lm.variant.preprocess.input_size
        pp = lm.variant.preprocess.at(size)
        runner = EAGER.open_model(lm.model, None if args.inputs else size, RunnerOptions(threads=args.threads))
        fixed = None
    if fixed is not None and args.input_size and args.input_size != fixed:
        raise UsageError(f"this export is fixed at {fixed} px; --input-size {args.input_size} cannot apply.")
    x, names = gather_inputs(args.images, args.inputs, pp)
    try:
        logits = run_batched(runner, x, args.batch_size)
    finally:
        runner.close()
    require_finite_logits(logits, names, runner.name)
    if args.save_logits:
        from partialnet.files import atomic_save_npy

        atomic_save_npy(args.save_logits, logits.astype(np.float32), force=args.force)
    labels = read_labels(args.labels, logits.shape[1]) if args.labels else None
    idx, probs = topk(logits, args.topk)
    print(format_topk(names, idx, probs, labels))
    return ExitStatus.OK


def _artifact_runner(args, folder):
    """A runner for an export folder's artifact, with the preprocessing recorded in its manifest."""
    from deploy.backends import EAGER, RunnerOptions, open_artifact
    from deploy.opening import open_export
    from export.manifest import Manifest
    from partialnet.variants import Preprocess

    manifest = Manifest.load(folder)
    pp = Preprocess.from_dict(manifest.preprocess)
    if args.backend == EAGER.name:
        export = open_export(folder, manifest=manifest, allow_pickle=args.allow_pickle, console=_console(args))
        return export.eager_runner(RunnerOptions(threads=args.threads)).runner, pp, manifest.input_size
    runner, _ = open_artifact(folder, manifest, args.backend, args.precision, args.threads)
    if getattr(runner, "options", {}).get("cache_note"):
        _console(args).note(f"note: {runner.options['cache_note']}")
    return runner, pp, manifest.input_size


def cmd_export(args) -> int:
    from deploy.pipeline import ExportRequest, run_export
    from deploy.precisions import parse_precisions

    req = ExportRequest(
        variant=args.variant,
        checkpoint=args.checkpoint,
        weights=args.weights,
        num_classes=args.num_classes,
        mean=args.mean,
        std=args.std,
        crop_ratio=args.crop_ratio,
        interpolation=args.interpolation,
        input_size=args.input_size,
        opset=args.opset,
        output=args.output,
        force=args.force,
        reparam=not args.no_reparam,
        simplify=not args.no_simplify,
        exporter=args.exporter,
        spatial_attn=args.spatial_attn,
        allow_pickle=args.allow_pickle,
        val_data=args.val_data,
        check=not args.no_check,
        threads=args.threads,
        backends=args.backends,
        precisions=parse_precisions(args.precisions),
        int8=args.int8,
        calib_data=args.calib_data,
        calib_size=args.calib_size,
        calib_method=args.calib_method,
        int8_cpu=args.int8_cpu,
        target_agreement=args.target_agreement,
        max_accuracy_drop=args.max_accuracy_drop / 100 if args.max_accuracy_drop is not None else None,
        validate=not args.no_validate,
        bench=not args.no_bench,
    )
    if args.max_accuracy_drop is not None and not args.val_data:
        raise UsageError("--max-accuracy-drop needs labelled --val-data (class subfolders) to measure accuracy on.")
    if (args.calib_data or args.target_agreement is not None or args.max_accuracy_drop is not None
            or args.int8_cpu != "auto") and not args.int8:
        raise UsageError("--calib-data, --int8-cpu, --target-agreement and --max-accuracy-drop apply to INT8: add --int8.")
    result = run_export(req, _console(args))
    print(result.folder)
    return result.exit_code


def cmd_validate(args) -> int:
    from deploy.validate import ValidateRequest, format_validation, run_validation
    from partialnet.files import json_text

    req = ValidateRequest(
        folder=args.folder,
        data=args.data,
        samples=args.samples,
        backends=args.backends,
        max_top1_drop=args.max_top1_drop,
        min_agreement=args.min_agreement,
        threads=args.threads,
        batch_size=args.batch_size,
        seed=args.seed,
        allow_pickle=args.allow_pickle,
        labels=args.labels,
        class_index=args.class_index,
        workers=args.workers,
        cluster=args.cluster,
        resume=args.resume,
        save_logits=args.save_logits,
    )
    result = run_validation(req, _console(args))
    print(json_text(result.document) if args.json else format_validation(result.document))
    return ExitStatus.OK if result.passed else ExitStatus.GATE_FAILED


def cmd_bench(args) -> int:
    from deploy.bench import BenchRequest, BenchSettings, format_bench, parse_batch_sizes, run_bench
    from partialnet.files import json_text

    if args.streams is not None and args.mode != "throughput":
        raise UsageError("--streams applies to --mode throughput.")
    settings = BenchSettings(batch_sizes=parse_batch_sizes(args.batch_sizes), threads=args.threads,
                             warmup_s=args.warmup_s, duration_s=args.duration_s, mode=args.mode, streams=args.streams)
    req = BenchRequest(folder=args.folder, backends=args.backends, settings=settings, allow_pickle=args.allow_pickle)
    result = run_bench(req, _console(args))
    print(json_text(result.document) if args.json else format_bench(result.document))
    return ExitStatus.OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from deploy import backends as registry  # light: backend libraries load only when a backend is used

    names = registry.names()
    eager = registry.EAGER.name
    float_help = ", ".join(f"{p} ({b.name})" for b in registry.artifact_backends() for p in b.float_precisions
                           if p != "fp32")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the Python stack on errors")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress or notes on stderr")

    parser = _Parser(prog=PROG, description="Export, run and validate PartialNet models.", parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="the variants and the plug-in zoo, with params, MACs at 224 px and defaults")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("info", parents=[common], help="the resolved architecture, params, MACs, checkpoint facts")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("predict", parents=[common], help="top-k classes for images or a preprocessed array",
                       description="TARGET is a variant name (eager only) or an export folder (any backend).")
    _add_model_args(p)
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--backend", default=eager,
                   help=f"{eager} or one of {', '.join(names)} (those need an export folder)")
    p.add_argument("--precision", default=None,
                   help="artifact precision: fp32, fp16, bf16, int8 (default fp32); int8@tensorrt is the TensorRT "
                        "Q/DQ ONNX run here, int8+entropy TensorRT's entropy-calibrated engine")
    p.add_argument("--inputs", help="preprocessed float32 NCHW array (.npy) instead of images")
    p.add_argument("--save-logits", help="write raw float32 logits [batch, classes] to this .npy")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-logits file")
    p.add_argument("--topk", type=argtypes.positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--labels", help="text file with one class name per line")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--threads", type=argtypes.threads, default=None, help="CPU threads")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("export", parents=[common], help="reparameterize, export ONNX, check against eager",
                       description="MODEL is a variant or zoo name (see 'deploy list'), FILE.py:FACTORY or "
                                   "package.module:FACTORY (a function returning an nn.Module classifier; loading "
                                   "a file runs its code).")
    _add_model_args(p)
    p.add_argument("--weights", "-w", help="state dict for a FACTORY's model, loaded strictly (.pth, .safetensors, "
                   "Lightning .ckpt); default: fresh seeded weights")
    p.add_argument("--num-classes", type=argtypes.positive_int, default=None,
                   help="passed to the factory (or the variant) as num_classes")
    p.add_argument("--mean", type=argtypes.rgb_triple, default=None, help="R,G,B normalization mean (default ImageNet's)")
    p.add_argument("--std", type=argtypes.positive_triple, default=None, help="R,G,B normalization std (default ImageNet's)")
    p.add_argument("--crop-ratio", type=argtypes.fraction, default=None,
                   help="center-crop ratio: resize to N / ratio, crop N (default the model's, 0.9)")
    p.add_argument("--interpolation", choices=["bicubic", "bilinear"], default=None,
                   help="resize interpolation (default the model's, bicubic)")
    p.add_argument("--output", "-o", help="export folder (default: exports/VARIANT[_SIZE])")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("--opset", type=argtypes.positive_int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default torchscript: fast, and the graph is simplified anyway)")
    p.add_argument("--no-reparam", action="store_true", help="export the training-form graph (BNs, PAT_sp unmerged)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--no-check", action="store_true", help="skip the post-export check against eager")
    p.add_argument("--val-data", help="images for the checks: folder (class subfolders = labels), .txt list, or .npy")
    p.add_argument("--threads", type=argtypes.threads, default=None, help="CPU threads for runtimes")
    p.add_argument("--backends", help=f"comma-separated: {','.join(names)} (default: every backend usable "
                   "here; a requested one that cannot run here is reported as skipped, with the reason)")
    p.add_argument("--int8", action="store_true", help="also build INT8 artifacts for every backend, calibrated")
    p.add_argument("--calib-data", help="calibration images: folder (recursive; class subfolders are sampled "
                   "evenly), .txt list of paths, or preprocessed .npy (default: an embedded set, said plainly)")
    p.add_argument("--calib-size", type=argtypes.positive_int, default=512, help="calibration images (default 512, or all)")
    p.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation range calibration (default minmax)")
    p.add_argument("--int8-cpu", choices=["auto", "any", "vnni"], default="auto",
                   help="CPUs the OpenVINO INT8 weights must be exact on: 'any' (7-bit weights, no int8 overflow on "
                   "any x86 CPU), 'vnni' (8-bit, exact only with VNNI/AMX: Ice Lake, Zen 4 and newer) or 'auto' "
                   "(this machine's kind; default). ONNX Runtime picks exact kernels at load time by itself")
    p.add_argument("--target-agreement", type=argtypes.fraction, default=None,
                   help="keep the most sensitive blocks in float until INT8 agrees with eager on this fraction of top-1")
    p.add_argument("--max-accuracy-drop", type=argtypes.non_negative_float, default=None,
                   help="INT8 may lose at most this many points of top-1 on labelled --val-data (sensitivity pass, "
                   "and NNCF's accuracy-controlled quantization for OpenVINO)")
    p.add_argument("--no-validate", action="store_true", help="skip 'deploy validate' at the end of the export")
    p.add_argument("--no-bench", action="store_true", help="skip the short latency run (and its plot)")
    p.add_argument("--precisions", default="fp32",
                   help=f"comma-separated float precisions to build besides fp32: {float_help}")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("validate", parents=[common], help="accuracy and drift of every artifact against eager, gated",
                       description="Run eager and every artifact of an export folder on the same images; exit 3 if a "
                                   "tolerance or gate fails. Writes DIR/validation.json and DIR/validation.md.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--data", help="images: folder (class subfolders = labels, in sorted order), a flat folder with "
                   "--labels, .txt list of 'path [label]' lines, or a preprocessed float32 .npy (memory-mapped; "
                   "default: the embedded set, no labels)")
    p.add_argument("--labels", metavar="FILE", help="ground truth of a flat --data folder (ImageNet's validation "
                   "layout): Kaggle's LOC_val_solution.csv (ImageId,PredictionString) or a val.txt of 'name label'")
    p.add_argument("--class-index", metavar="FILE", help="class name (synset) to index: JSON, 'synset index' lines, "
                   "or one synset per line in index order; for labels or subfolders named by synset")
    p.add_argument("--workers", type=argtypes.non_negative_int, default=None,
                   help="processes decoding images ahead of the runners (default: the usable cores; 0 decodes in "
                        "this process)")
    p.add_argument("--cluster", type=argtypes.cluster, default=None, metavar="SPEC",
                   help="local:N (a Dask LocalCluster of N processes on 127.0.0.1) or tcp://HOST:PORT (a running "
                        "Dask scheduler); needs the cluster extra")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted validation of the same inputs from its state in DIR")
    p.add_argument("--save-logits", metavar="OUT", help="write each runner's logits as OUT/<key>.npy plus "
                   "OUT/files.txt (a new or empty folder)")
    p.add_argument("--samples", type=argtypes.positive_int, default=None,
                   help="images to use, sampled with --seed (default: all of --data, or 64 of the embedded set)")
    p.add_argument("--backends", help="comma-separated backends to validate (default: every artifact in the manifest)")
    p.add_argument("--max-top1-drop", type=argtypes.non_negative_float, default=None, metavar="P",
                   help="fail if an artifact's top-1 is more than P percentage points below eager's (needs labels)")
    p.add_argument("--min-agreement", type=argtypes.non_negative_float, default=None, metavar="A",
                   help="fail if an artifact's top-1 agrees with eager's on less than fraction A of the images")
    p.add_argument("--threads", type=argtypes.threads, default=None, help="CPU threads for eager and the runtimes")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling images and the bootstrap (default 0)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary pickled code (only for files you trust)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("bench", parents=[common], help="latency or throughput of eager and every artifact, each in "
                       "its own process",
                       description="Time eager and every artifact of an export folder, each in a worker process of its "
                                   "own, round-robin on the same inputs, one computing at a time. Writes "
                                   "DIR/bench.json, DIR/bench.md and DIR/bench.png.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--backends", help="comma-separated backends to time (default: every artifact in the manifest)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--mode", choices=["latency", "throughput"], default="latency",
                   help="latency: one request at a time (OpenVINO LATENCY hint; default); throughput: as many requests "
                        "in flight as each runtime serves best (OpenVINO THROUGHPUT hint and async queue, ONNX Runtime "
                        "concurrent runs, eager batched calls)")
    p.add_argument("--streams", type=argtypes.positive_int, default=None,
                   help="throughput mode: parallel streams (default: each runtime's choice; ONNX Runtime: one per core)")
    p.add_argument("--threads", type=argtypes.threads, default=None,
                   help="CPU threads for eager and the runtimes (default: each library's own default)")
    p.add_argument("--warmup-s", type=argtypes.non_negative_float, default=1.0,
                   help="untimed seconds per runner and batch size before timing (default 1; at least one call)")
    p.add_argument("--duration-s", type=argtypes.positive_float, default=5.0,
                   help="timed seconds per runner and batch size (default 5; at least 5 calls)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary pickled code (only for files you trust)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_bench)
    from deploy.serving.parser import add_parsers as add_serving_parsers
    add_serving_parsers(sub, common)  # serve, triton, loadtest
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in argv
    from runtimes.telemetry import disable_telemetry

    disable_telemetry()
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Image paths may follow options (`predict VARIANT --checkpoint C a.jpg b.jpg`); argparse stops filling a
        # nargs='*' positional at the first option, so leftover non-option words are the rest of the images.
        if extra and hasattr(args, "images") and not any(e.startswith("-") for e in extra):
            args.images = list(args.images) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        handler: Callable[[argparse.Namespace], int] = args.handler
        return int(handler(args))
    except DeployError as e:
        if show_tb:
            raise
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except OSError as e:  # a write some library made itself: full disk, read-only folder
        from partialnet.files import os_error

        if show_tb:
            raise
        known = os_error(e)
        if known is None:
            return _internal(e)
        print(f"{PROG}: error: {_one_line(str(known))}", file=sys.stderr)
        return int(known.exit_code)
    except Exception as e:  # anything unforeseen still ends as one line, not a traceback
        if show_tb:
            raise
        return _internal(e)


def _internal(e: BaseException) -> int:
    text = _one_line(str(e))
    text = text if len(text) <= 300 else text[:297] + "..."
    print(f"{PROG}: error: internal error: {type(e).__name__}: {text} (rerun with --traceback)", file=sys.stderr)
    return int(ExitStatus.FAILURE)


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
