"""The `deploy` command: a thin argparse layer over plain functions in deploy/.

Results go to stdout, notes and progress to stderr. Every error is one line on stderr and an exit code:
0 success, 1 failure, 2 usage error, 3 a validation gate failed. `--traceback` shows the stack.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from partialnet.errors import DeployError, UsageError

PROG = "deploy"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _input_size(text: str) -> int:
    value = _positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(
            f"input size {value} is not a multiple of 32 (the last stage works on N/32 maps); try {max(32, round(value / 32) * 32)}"
        )
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {value}")
    return value


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
    p.add_argument("--input-size", type=_input_size, default=None, help="input resolution N (multiple of 32)")


def _load(args) -> "object":
    from partialnet import build_model

    return build_model(args.variant, args.checkpoint, spatial_attn=args.spatial_attn, allow_pickle=args.allow_pickle,
                       log=_stderr(args))


def _stderr(args) -> Callable[[str], None]:
    """Where notes go: stderr, or nowhere with --quiet."""
    if getattr(args, "quiet", False):
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr)


# --------------------------------------------------------------------------- handlers


def cmd_list(args) -> int:
    from deploy.catalog import format_table, variant_rows

    rows = variant_rows()
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_info(args) -> int:
    from deploy.catalog import format_info, model_info

    lm = _load(args)
    info = model_info(lm, args.input_size or lm.variant.preprocess.input_size)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_predict(args) -> int:
    from pathlib import Path

    import numpy as np

    from deploy.inputs import gather_inputs, read_labels
    from deploy.predict import format_topk, run_batched, topk

    target = Path(args.variant)
    if target.is_dir():
        runner, pp, fixed = _artifact_runner(args, target)
    else:
        if args.backend != "eager":
            raise UsageError(
                f"--backend {args.backend} runs an export folder; {args.variant!r} is a variant name, which runs only "
                f"with --backend eager. Export it first: deploy export {args.variant}."
            )
        from runtimes.eager import EagerRunner

        lm = _load(args)
        size = args.input_size or lm.variant.preprocess.input_size
        pp = lm.variant.preprocess.at(size)
        runner, fixed = EagerRunner(lm.model, None if args.inputs else size, threads=args.threads), None
    if fixed is not None and args.input_size and args.input_size != fixed:
        raise UsageError(f"this export is fixed at {fixed} px; --input-size {args.input_size} cannot apply.")
    x, names = gather_inputs(args.images, args.inputs, pp)
    try:
        logits = run_batched(runner, x, args.batch_size)
    finally:
        runner.close()
    if args.save_logits:
        from partialnet.files import atomic_save_npy

        atomic_save_npy(args.save_logits, logits.astype(np.float32), force=args.force)
    labels = read_labels(args.labels, logits.shape[1]) if args.labels else None
    idx, probs = topk(logits, args.topk)
    print(format_topk(names, idx, probs, labels))
    return 0


def _artifact_runner(args, folder):
    """A runner for an export folder's artifact, with the preprocessing recorded in its manifest."""
    from deploy.backends import open_artifact
    from export.manifest import Manifest
    from partialnet.variants import Preprocess

    manifest = Manifest.load(folder)
    pp = Preprocess.from_dict(manifest.preprocess)
    if args.backend == "eager":
        from deploy.reference import eager_from_manifest
        from runtimes.eager import EagerRunner

        model = eager_from_manifest(manifest, allow_pickle=args.allow_pickle, log=_stderr(args))
        return EagerRunner(model, manifest.input_size, threads=args.threads), pp, manifest.input_size
    runner, _ = open_artifact(folder, manifest, args.backend, args.precision, args.threads)
    return runner, pp, manifest.input_size


def cmd_export(args) -> int:
    from deploy.pipeline import ExportRequest, run_export

    req = ExportRequest(
        variant=args.variant,
        checkpoint=args.checkpoint,
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
        precisions=tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
        int8=args.int8,
        calib_data=args.calib_data,
        calib_size=args.calib_size,
        calib_method=args.calib_method,
        int8_cpu=args.int8_cpu,
        target_agreement=args.target_agreement,
        max_accuracy_drop=args.max_accuracy_drop / 100 if args.max_accuracy_drop is not None else None,
        validate=not args.no_validate,
        bench=not args.no_bench,
        quiet=args.quiet,
    )
    if args.max_accuracy_drop is not None and not args.val_data:
        raise UsageError("--max-accuracy-drop needs labelled --val-data (class subfolders) to measure accuracy on.")
    if (args.calib_data or args.target_agreement is not None or args.max_accuracy_drop is not None
            or args.int8_cpu != "auto") and not args.int8:
        raise UsageError("--calib-data, --int8-cpu, --target-agreement and --max-accuracy-drop apply to INT8: add --int8.")
    result = run_export(req, log=_stderr(args))
    print(result.folder)
    return result.exit_code


def cmd_validate(args) -> int:
    from deploy.validate import ValidateRequest, format_validation, run_validation

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
    )
    result = run_validation(req, log=_stderr(args), show_progress=not args.quiet)
    print(json.dumps(result.document, indent=2) if args.json else format_validation(result.document))
    return 0 if result.passed else 3


def cmd_bench(args) -> int:
    from deploy.bench import BenchRequest, format_bench, parse_batch_sizes, run_bench

    req = BenchRequest(
        folder=args.folder,
        backends=args.backends,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        threads=args.threads,
        warmup_s=args.warmup_s,
        duration_s=args.duration_s,
        allow_pickle=args.allow_pickle,
    )
    result = run_bench(req, log=_stderr(args), show_progress=not args.quiet)
    print(json.dumps(result.document, indent=2) if args.json else format_bench(result.document))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the Python stack on errors")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress or notes on stderr")

    parser = _Parser(prog=PROG, description="Export, run and validate PartialNet models.", parents=[common])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", parents=[common], help="the variants with params, MACs at 224 px and defaults")
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
    p.add_argument("--backend", default="eager",
                   help="eager, onnxruntime, openvino or tensorrt (the last three need an export folder)")
    p.add_argument("--precision", default=None, help="artifact precision: fp32, fp16, bf16, int8 (default fp32)")
    p.add_argument("--inputs", help="preprocessed float32 NCHW array (.npy) instead of images")
    p.add_argument("--save-logits", help="write raw float32 logits [batch, classes] to this .npy")
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-logits file")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--labels", help="text file with one class name per line")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads")
    p.set_defaults(handler=cmd_predict)

    p = sub.add_parser("export", parents=[common], help="reparameterize, export ONNX, check against eager")
    _add_model_args(p)
    p.add_argument("--output", "-o", help="export folder (default: exports/VARIANT[_SIZE])")
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx exporter (default torchscript: fast, and the graph is simplified anyway)")
    p.add_argument("--no-reparam", action="store_true", help="export the training-form graph (BNs, PAT_sp unmerged)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--no-check", action="store_true", help="skip the post-export check against eager")
    p.add_argument("--val-data", help="images for the checks: folder (class subfolders = labels), .txt list, or .npy")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for runtimes")
    p.add_argument("--backends", help="comma-separated: onnxruntime,openvino,tensorrt (default: every backend usable "
                   "here; a requested one that cannot run here is reported as skipped, with the reason)")
    p.add_argument("--int8", action="store_true", help="also build INT8 artifacts for every backend, calibrated")
    p.add_argument("--calib-data", help="calibration images: folder (recursive; class subfolders are sampled "
                   "evenly), .txt list of paths, or preprocessed .npy (default: an embedded set, said plainly)")
    p.add_argument("--calib-size", type=_positive_int, default=512, help="calibration images (default 512, or all)")
    p.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="activation range calibration (default minmax)")
    p.add_argument("--int8-cpu", choices=["auto", "any", "vnni"], default="auto",
                   help="CPUs the OpenVINO INT8 weights must be exact on: 'any' (7-bit weights, no int8 overflow on "
                   "any x86 CPU), 'vnni' (8-bit, exact only with VNNI/AMX: Ice Lake, Zen 4 and newer) or 'auto' "
                   "(this machine's kind; default). ONNX Runtime picks exact kernels at load time by itself")
    p.add_argument("--target-agreement", type=_fraction, default=None,
                   help="keep the most sensitive blocks in float until INT8 agrees with eager on this fraction of top-1")
    p.add_argument("--max-accuracy-drop", type=_non_negative_float, default=None,
                   help="INT8 may lose at most this many points of top-1 on labelled --val-data (sensitivity pass, "
                   "and NNCF's accuracy-controlled quantization for OpenVINO)")
    p.add_argument("--no-validate", action="store_true", help="skip 'deploy validate' at the end of the export")
    p.add_argument("--no-bench", action="store_true", help="skip the short latency run (and its plot)")
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated float precisions to build besides fp32: fp16 (tensorrt), bf16 (openvino)")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("validate", parents=[common], help="accuracy and drift of every artifact against eager, gated",
                       description="Run eager and every artifact of an export folder on the same images; exit 3 if a "
                                   "tolerance or gate fails. Writes DIR/validation.json and DIR/validation.md.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--data", help="images: folder (class subfolders = labels, in sorted order), .txt list of "
                   "'path [label]' lines, or a preprocessed float32 .npy (default: the embedded set, no labels)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="images to use, sampled with --seed (default: all of --data, or 64 of the embedded set)")
    p.add_argument("--backends", help="comma-separated backends to validate (default: every artifact in the manifest)")
    p.add_argument("--max-top1-drop", type=_non_negative_float, default=None, metavar="P",
                   help="fail if an artifact's top-1 is more than P percentage points below eager's (needs labels)")
    p.add_argument("--min-agreement", type=_non_negative_float, default=None, metavar="A",
                   help="fail if an artifact's top-1 agrees with eager's on less than fraction A of the images")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for eager and the runtimes")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling images and the bootstrap (default 0)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a checkpoint that needs arbitrary pickled code (only for files you trust)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("bench", parents=[common], help="latency of eager and every artifact, interleaved in one run",
                       description="Time eager and every artifact of an export folder round-robin on the same inputs. "
                                   "Writes DIR/bench.json, DIR/bench.md and DIR/bench.png.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--backends", help="comma-separated backends to time (default: every artifact in the manifest)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for eager and the runtimes (default: each library's own default)")
    p.add_argument("--warmup-s", type=_non_negative_float, default=1.0,
                   help="untimed seconds per runner and batch size before timing (default 1; at least one call)")
    p.add_argument("--duration-s", type=_positive_float, default=5.0,
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
        return handler(args)
    except DeployError as e:
        if show_tb:
            raise
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen still ends as one line, not a traceback
        if show_tb:
            raise
        print(f"{PROG}: error: internal error: {type(e).__name__}: {_one_line(str(e))} (rerun with --traceback)",
              file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
