"""The `serve`, `triton` and `loadtest` subcommands: parsers and thin handlers that import their modules late."""
from __future__ import annotations

import argparse
from pathlib import Path

from deploy import argtypes


def _log(args):
    from partialnet.console import Console

    return Console(quiet=getattr(args, "quiet", False))


def _backend(args) -> str:
    """--backend, or the backend that runs the reference ONNX (the registry knows which)."""
    from deploy import backends

    return args.backend or backends.reference_backend().name


def cmd_serve(args) -> int:
    from .server import ServeRequest, run_serve

    req = ServeRequest(
        folder=Path(args.folder), backend=_backend(args), precision=args.precision, host=args.host, port=args.port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, threads=args.threads,
        model_name=args.model_name, quiet=args.quiet, server_log=args.server_log,
    )
    return run_serve(req, log=_log(args))


def cmd_triton(args) -> int:
    from .repository import RepositoryRequest, write_repository

    req = RepositoryRequest(
        folder=Path(args.folder), output=Path(args.output), force=args.force, max_batch=args.max_batch,
        max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, model_name=args.model_name,
        backend=_backend(args), precision=args.precision,
    )
    result = write_repository(req, log=_log(args))
    for line in result.summary():
        print(line)
    return 0


def cmd_loadtest(args) -> int:
    import json

    from .loadtest import LoadTestRequest, format_loadtest, run_loadtest

    req = LoadTestRequest(
        url=args.url, data=args.data, concurrency=args.concurrency, requests=args.requests, batch=args.batch,
        model_name=args.model_name, verify=Path(args.verify) if args.verify else None, backend=_backend(args),
        precision=args.precision, tolerance=args.tolerance, timeout_s=args.timeout_s, images=args.send_images,
    )
    result = run_loadtest(req, log=_log(args))
    print(json.dumps(result.document, indent=2) if args.json else format_loadtest(result.document))
    return result.exit_code


def _model_args(p: argparse.ArgumentParser, *, batching: bool = True) -> None:
    p.add_argument("--model-name", default=None, help="served model name (default: the manifest's variant, e.g. "
                   "partialnet_t0; the image model is NAME_image)")
    if batching:
        p.add_argument("--max-batch", type=argtypes.positive_int, default=8,
                       help="largest batch Triton's dynamic batcher forms, and most images per request (default 8)")
        p.add_argument("--max-queue-delay-us", type=argtypes.non_negative_int, default=500,
                       help="how long a request may wait for others to batch with, in microseconds (default 500)")
        p.add_argument("--instances", type=argtypes.positive_int, default=1,
                       help="model instances (each its own runner; default 1)")


def add_parsers(subparsers, common_parent: argparse.ArgumentParser) -> None:
    """Register `serve`, `triton` and `loadtest` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", parents=[common_parent], help="a Triton server (KServe v2 HTTP/gRPC, metrics) running an artifact",
        description="Serve an export folder's artifact with Triton (PyTriton's bundled tritonserver, CPU): model NAME "
                    "takes 'input' FP32 [-1, 3, N, N] and returns 'logits'; NAME_image takes encoded images (BYTES) "
                    "and applies the manifest's preprocessing. Binds 127.0.0.1 unless --host says otherwise. Stops on "
                    "SIGTERM or Ctrl+C after draining in-flight requests. Needs the serve extra.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--backend", default=None, help="the artifact's backend (see 'deploy validate DIR'; default: the "
                   "one that runs the reference ONNX)")
    p.add_argument("--precision", default=None, help="artifact precision: fp32, bf16, fp16, int8 (default fp32)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=argtypes.port, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=argtypes.port, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=argtypes.port, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--threads", type=argtypes.threads, default=None, help="CPU threads per runner")
    p.add_argument("--server-log", action="store_true", help="show tritonserver's own log on stderr")
    _model_args(p)
    p.set_defaults(handler=cmd_serve)

    p = subparsers.add_parser(
        "triton", parents=[common_parent], help="write a Triton model repository for an export folder",
        description="Write a Triton model repository: one model per artifact (onnxruntime_onnx, openvino, "
                    "tensorrt_plan; for NVIDIA's official Triton container, which has those backends) and the "
                    "Python-backend models NAME and NAME_image that 'deploy serve' runs.")
    p.add_argument("folder", metavar="DIR", help="export folder made by 'deploy export'")
    p.add_argument("--output", "-o", required=True, metavar="REPO", help="model repository folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing repository folder")
    p.add_argument("--backend", default=None,
                   help="artifact the Python-backend models run (default: the one that runs the reference ONNX)")
    p.add_argument("--precision", default=None, help="its precision (default fp32)")
    _model_args(p)
    p.set_defaults(handler=cmd_triton)

    p = subparsers.add_parser(
        "loadtest", parents=[common_parent], help="throughput, latency and errors of a served model; --verify answers",
        description="Send requests from several threads to a Triton server (tritonclient): throughput, p50/p90/p99 "
                    "latency, errors by kind. With --verify DIR every answer is compared with the local runner of "
                    "the same artifact on the same input. Exit 1 on any error or mismatch.")
    p.add_argument("url", help="server URL: http://HOST:PORT (KServe v2 HTTP) or grpc://HOST:PORT")
    p.add_argument("--data", required=True, help="preprocessed float32 .npy (sent to NAME), or images: a folder or a "
                   ".txt list (sent as encoded bytes to NAME_image, unless --no-images)")
    p.add_argument("--concurrency", type=argtypes.positive_int, default=8, help="client threads (default 8)")
    p.add_argument("--requests", type=argtypes.positive_int, default=1000, help="requests in all (default 1000)")
    p.add_argument("--batch", type=argtypes.positive_int, default=1, help="images per request (default 1)")
    p.add_argument("--model-name", default=None, help="served tensor model (default: the only non-image model the "
                   "server has, or the --verify manifest's variant)")
    p.add_argument("--no-images", dest="send_images", action="store_false",
                   help="preprocess image files here and send tensors to NAME instead of bytes to NAME_image")
    p.add_argument("--verify", metavar="DIR", default=None,
                   help="export folder served: compare every answer with its local runner")
    p.add_argument("--backend", default=None, help="with --verify: the served artifact's backend (default: the one "
                   "that runs the reference ONNX)")
    p.add_argument("--precision", default=None, help="with --verify: its precision (default fp32)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="with --verify: largest allowed |served - local| logit difference (default 1e-4)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout in seconds (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(handler=cmd_loadtest)
