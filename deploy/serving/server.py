"""`deploy serve`: a Triton server (PyTriton's bundled tritonserver) whose models run an export folder's artifact.

The artifact runs in this process with the project's own runner, exactly as `deploy predict` runs it; Triton in
front of it gives the KServe v2 HTTP/gRPC protocol, health and readiness, dynamic batching and Prometheus metrics.
Everything that can fail (the extra, the ports, the artifact's sha256) is checked before the server starts.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from partialnet.errors import DeployError, UsageError

from .extra import prepare_server_environment, require
from .models import IMAGE_INPUT, ServedModel, decode_images, run_logits, served_model

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_TIMEOUT_S = 5  # tritonserver waits this long for in-flight requests after SIGTERM


@dataclass
class ServeRequest:
    folder: Path
    backend: str  # a name from deploy/backends; the CLI defaults to the backend that runs the reference ONNX
    precision: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_queue_delay_us: int = 500
    instances: int = 1
    threads: int | None = None
    model_name: str | None = None
    quiet: bool = False
    server_log: bool = False  # echo tritonserver's own log on stderr


class PortInUse(DeployError):
    """A port the server needs is taken."""


def check_ports(host: str, ports: dict[str, int]) -> None:
    """One line per problem, before anything starts: duplicate ports, or a port something already listens on."""
    seen: dict[int, str] = {}
    for what, port in ports.items():
        if not 0 < port < 65536:
            raise UsageError(f"--{what} {port} is not a TCP port (1-65535).")
        if port in seen:
            raise UsageError(f"--{seen[port]} and --{what} are both {port}; give each endpoint its own port.")
        seen[port] = what
    for what, port in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR: a port left in TIME_WAIT by a server that just stopped is free; a listening one is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUse(f"port {port} on {host} (--{what}) is in use by another process; stop it or "
                                    f"pass another --{what}.") from None
                raise UsageError(f"cannot listen on {host}:{port} (--{what}): {e.strerror}.") from None


def _tensor_infer(runner) -> Callable:
    """The `<name>` model: requests merged by Triton's dynamic batcher, one runner call, split back."""
    from runtimes.base import INPUT_NAME, OUTPUT_NAME

    def infer(requests):
        arrays = [r[INPUT_NAME] for r in requests]
        logits = run_logits(runner, np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        out, start = [], 0
        for a in arrays:
            out.append({OUTPUT_NAME: logits[start : start + len(a)]})
            start += len(a)
        return out

    return infer


def _image_infer(runner, pp, max_images: int) -> Callable:
    """The `<name>_image` model: one request at a time (no batcher), decoded with the manifest's preprocessing."""
    from runtimes.base import OUTPUT_NAME

    def infer(requests):
        return [{OUTPUT_NAME: run_logits(runner, decode_images(r[IMAGE_INPUT], pp, max_images))} for r in requests]

    return infer


class _LogTail:
    """Where tritonserver's log lines go (PyTriton prints them on stdout): stderr, keeping the last lines for errors."""

    def __init__(self, echo: bool):
        self.echo = echo
        self.lines: deque[str] = deque(maxlen=20)
        self._partial = ""

    def write(self, text: str) -> int:
        if self.echo:
            sys.stderr.write(text)
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines.extend(line for line in done if line.strip())
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def last_error(self) -> str:
        errors = [line for line in self.lines if line[:1] == "E" or "error" in line.lower()]
        return " ".join((errors or list(self.lines) or ["no log output"])[-1].split())


class _LastLine(logging.Filter):
    """PyTriton logs a failed request's whole traceback; the server log gets its last line, the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Exception while performing inference"):
            lines = [line for line in record.getMessage().splitlines() if line.strip()]
            record.msg, record.args = "request failed: %s", (lines[-1].strip() if lines else "unknown error",)
        return True


def _one_line_request_errors() -> None:
    logger = logging.getLogger("pytriton.proxy.inference")
    if not any(isinstance(f, _LastLine) for f in logger.filters):
        logger.addFilter(_LastLine())


def open_runners(req: ServeRequest, count: int):
    """`count` runners of the requested artifact (each Triton model instance gets its own), and the artifact."""
    from deploy.backends import open_artifact
    from export.manifest import Manifest

    manifest = Manifest.load(req.folder)
    runners, art = [], None
    try:
        for _ in range(count):
            runner, art = open_artifact(Path(req.folder), manifest, req.backend, req.precision, req.threads)
            runners.append(runner)
    except BaseException:
        for r in runners:
            r.close()
        raise
    return manifest, art, runners


def endpoints(req: ServeRequest) -> str:
    host = f"[{req.host}]" if ":" in req.host else req.host
    return (f"http://{host}:{req.port} (KServe v2 HTTP), {host}:{req.grpc_port} (gRPC), "
            f"http://{host}:{req.metrics_port}/metrics (Prometheus)")


def run_serve(req: ServeRequest, log: Callable[[str], None]) -> int:
    """Start the server, block until SIGTERM or SIGINT, drain in-flight requests, and return 0."""
    require("pytriton", "tritonclient", command="serve")
    if req.max_batch < 1 or req.instances < 1:
        raise UsageError("--max-batch and --instances must be at least 1.")
    check_ports(req.host, {"port": req.port, "grpc-port": req.grpc_port, "metrics-port": req.metrics_port})
    manifest, art, runners = open_runners(req, 2 * req.instances)
    try:
        return _serve(req, manifest, art, runners, log)
    finally:
        for r in runners:
            r.close()


def _serve(req: ServeRequest, manifest, art, runners, log) -> int:
    from partialnet.variants import Preprocess

    model = served_model(manifest, req.model_name)
    pp = Preprocess.from_dict(manifest.preprocess)
    tensor_runners, image_runners = runners[: req.instances], runners[req.instances :]
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    tail = _LogTail(echo=req.server_log and not req.quiet)
    _one_line_request_errors()
    prepare_server_environment()
    triton = None
    try:
        with contextlib.redirect_stdout(tail):
            triton = _start(req, model, pp, tensor_runners, image_runners)
        where = "loopback only" if req.host in LOOPBACK else "reachable from other machines on this network"
        log(f"serving {art.backend} {art.precision} ({art.path}) of {req.folder} as models {model.name!r} (input FP32 "
            f"[-1, {', '.join(map(str, model.input_dims))}] -> logits [-1, {model.num_classes}]) and "
            f"{model.image_name!r} (encoded images)")
        log(f"listening on {req.host} ({where}): {endpoints(req)}; SIGTERM or Ctrl+C stops it")
        with contextlib.redirect_stdout(tail):
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise DeployError(f"the Triton server exited unexpectedly: {tail.last_error()}")
            log("stopping: draining in-flight requests")
            triton.stop()
            triton = None
        log("stopped")
        return 0
    finally:
        if triton is not None:
            with contextlib.redirect_stdout(tail):
                triton.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _start(req: ServeRequest, model: ServedModel, pp, tensor_runners, image_runners):
    """Bind both models and start tritonserver; any failure is one line with tritonserver's last error."""
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from runtimes.base import INPUT_NAME, OUTPUT_NAME

    config = TritonConfig(
        http_address=req.host, http_port=req.port, grpc_address=req.host, grpc_port=req.grpc_port,
        metrics_address=req.host, metrics_port=req.metrics_port, allow_metrics=True, allow_cpu_metrics=True,
        allow_gpu_metrics=False, exit_timeout_secs=DRAIN_TIMEOUT_S, strict_readiness=True, exit_on_error=True,
    )
    triton = Triton(config=config)
    try:
        triton.bind(
            model.name, [_tensor_infer(r) for r in tensor_runners],
            inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=model.input_dims)],
            outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(model.num_classes,))],
            config=ModelConfig(max_batch_size=req.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=req.max_queue_delay_us)),
            strict=True,
        )
        triton.bind(
            model.image_name, [_image_infer(r, pp, req.max_batch) for r in image_runners],
            inputs=[Tensor(name=IMAGE_INPUT, dtype=np.bytes_, shape=(-1,))],
            outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(-1, model.num_classes))],
            config=ModelConfig(batching=False),
            strict=True,
        )
        triton.run()
    except DeployError:
        triton.stop()
        raise
    except Exception as e:
        tail = sys.stdout.last_error() if isinstance(sys.stdout, _LogTail) else ""
        triton.stop()
        raise DeployError(f"the Triton server did not start ({type(e).__name__}: {' '.join(str(e).split())}); "
                          f"tritonserver said: {tail}") from e
    return triton
