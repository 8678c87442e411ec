"""`deploy loadtest`: concurrent requests to a Triton server, latency and errors, and optionally every answer checked.

Measurement here, judgement at the end: each request records its latency and either its logits' largest difference
from the local runner (--verify) or the kind of error it got; the summary counts them and decides the exit code.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import numpy as np

from partialnet.errors import DeployError, UsageError

from .extra import require
from .models import IMAGE_INPUT, IMAGE_SUFFIX, decode_image


@dataclass
class LoadTestRequest:
    url: str
    data: str
    concurrency: int = 8
    requests: int = 1000
    batch: int = 1
    model_name: str | None = None
    verify: Path | None = None
    backend: str | None = None  # with verify: deploy/backends names it (None: the reference ONNX's backend)
    precision: str | None = None
    tolerance: float = 1e-4
    timeout_s: float = 60.0
    images: bool = True
    threads: int | None = None


@dataclass
class LoadTestResult:
    document: dict
    exit_code: int


@dataclass
class Payload:
    """What is sent: tensors to the tensor model, or encoded image bytes to the image model, one row per sample."""

    model: str
    input_name: str
    datatype: str
    rows: list  # np.ndarray [3, N, N] per row, or bytes per row
    names: list[str] = field(default_factory=list)

    def batch(self, index: int, size: int) -> tuple[list[int], np.ndarray]:
        idx = [(index * size + k) % len(self.rows) for k in range(size)]
        if self.datatype == "BYTES":
            return idx, np.array([self.rows[i] for i in idx], dtype=np.object_)
        return idx, np.stack([self.rows[i] for i in idx]).astype(np.float32, copy=False)


def parse_url(url: str) -> tuple[str, str]:
    """('http' or 'grpc', 'host:port') from http://HOST:PORT or grpc://HOST:PORT."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "grpc") or not parts.hostname or not parts.port:
        raise UsageError(f"URL {url!r} must be http://HOST:PORT (KServe v2 HTTP) or grpc://HOST:PORT.")
    if parts.path not in ("", "/"):
        raise UsageError(f"URL {url!r} has a path; give only the server, e.g. http://127.0.0.1:8000 "
                         f"(the model is --model-name).")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}"


def _client(scheme: str, address: str, timeout_s: float):
    if scheme == "grpc":
        import tritonclient.grpc as tc

        return tc, tc.InferenceServerClient(address)
    import tritonclient.http as tc

    return tc, tc.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)


def _error_kind(e: Exception) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(e, InferenceServerException):
        text = " ".join(str(e.message() or "").split())
        # Triton prefixes messages with the request id; the kind is what follows it.
        if text.startswith("[request id:"):
            text = text.split("]", 1)[-1].strip()
        return f"{e.status() or 'error'}: {text[:160]}"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def load_payload(req: LoadTestRequest, model: str, pp) -> Payload:
    """The samples to send, read from --data: a preprocessed .npy, or image files (sent encoded unless --no-images)."""
    path = Path(req.data)
    if path.suffix.lower() == ".npy":
        from deploy.inputs import load_npy

        arr = load_npy(path)
        if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[1] != 3 or len(arr) == 0:
            raise UsageError(f"--data {path} holds {arr.dtype} {list(arr.shape)}; expected preprocessed float32 "
                             f"[N, 3, S, S] with N >= 1.")
        return Payload(model, "input", "FP32", list(arr), [f"{path.name}[{i}]" for i in range(len(arr))])
    from calibration.sources import image_files

    files, _, _, _ = image_files(path)
    if not files:
        raise UsageError(f"--data {path} has no images (jpg, png, webp, bmp) and is not a .npy array.")
    if req.images:
        return Payload(model + IMAGE_SUFFIX, IMAGE_INPUT, "BYTES", [Path(f).read_bytes() for f in files],
                       [str(f) for f in files])
    if pp is None:
        raise UsageError("--no-images preprocesses the images here: give --verify DIR, whose manifest has the "
                         "preprocessing.")
    from partialnet.preprocess import load_image, preprocess_image

    return Payload(model, "input", "FP32", [preprocess_image(load_image(f), pp) for f in files], [str(f) for f in files])


def reference_logits(req: LoadTestRequest, payload: Payload, log) -> tuple[np.ndarray, str]:
    """The local runner's logits for every sample, preprocessed here exactly as the server does."""
    from deploy.backends import open_artifact
    from deploy.predict import run_batched
    from export.manifest import Manifest
    from partialnet.variants import Preprocess

    manifest = Manifest.load(req.verify)
    from deploy import backends

    backend = req.backend or backends.reference_backend().name
    runner, art = open_artifact(Path(req.verify), manifest, backend, req.precision, req.threads)
    try:
        if payload.datatype == "BYTES":
            pp = Preprocess.from_dict(manifest.preprocess)
            x = np.stack([decode_image(b, pp) for b in payload.rows])
        else:
            x = np.stack(payload.rows)
        log(f"verify: local {art.backend} {art.precision} ({art.path}) on {len(x)} samples")
        return run_batched(runner, x.astype(np.float32, copy=False), 8), f"{art.key} ({art.path})"
    finally:
        runner.close()


def _wait_ready(tc, client, model: str, url: str) -> None:
    try:
        live = client.is_server_ready()
    except Exception as e:
        raise DeployError(f"cannot reach a Triton server at {url} ({_error_kind(e)}); start one with "
                          f"'deploy serve DIR'.") from None
    if not live:
        raise DeployError(f"the server at {url} is not ready yet; retry when /v2/health/ready answers 200.")
    try:
        ready = client.is_model_ready(model)
    except Exception as e:
        raise DeployError(f"cannot ask {url} about model {model!r} ({_error_kind(e)}).") from None
    if not ready:
        raise DeployError(f"model {model!r} is not ready on {url}; check --model-name (default: the variant).")


def run_loadtest(req: LoadTestRequest, log: Callable[[str], None]) -> LoadTestResult:
    require("tritonclient", command="loadtest")
    scheme, address = parse_url(req.url)
    manifest = pp = None
    if req.verify is not None:
        from export.manifest import Manifest
        from partialnet.variants import Preprocess

        manifest = Manifest.load(req.verify)
        pp = Preprocess.from_dict(manifest.preprocess)
    model = req.model_name or (manifest.variant if manifest else None)
    if model is None:
        raise UsageError("give --model-name (the served model, e.g. partialnet_t0) or --verify DIR (its variant).")
    payload = load_payload(req, model, pp)
    ref, artifact = reference_logits(req, payload, log) if req.verify is not None else (None, None)

    tc, probe = _client(scheme, address, req.timeout_s)
    try:
        _wait_ready(tc, probe, payload.model, req.url)
    finally:
        probe.close()

    results: list[tuple[float, str | None, float | None]] = [None] * req.requests  # type: ignore[list-item]
    counter = iter(range(req.requests))
    lock = threading.Lock()

    def worker() -> None:
        _, client = _client(scheme, address, req.timeout_s)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                idx, x = payload.batch(i, req.batch)
                t0 = time.perf_counter()
                try:
                    inp = tc.InferInput(payload.input_name, list(x.shape), payload.datatype)
                    inp.set_data_from_numpy(x)
                    out = client.infer(payload.model, [inp], outputs=[tc.InferRequestedOutput("logits")])
                    logits = out.as_numpy("logits")
                    err = None
                except Exception as e:  # every failure is counted by kind, never fatal to the run
                    logits, err = None, _error_kind(e)
                elapsed = time.perf_counter() - t0
                diff = None
                if logits is not None and ref is not None:
                    want = ref[idx]
                    if logits.shape != want.shape:
                        err = f"shape: served logits {list(logits.shape)}, expected {list(want.shape)}"
                    else:
                        diff = float(np.abs(logits.astype(np.float64) - want).max())
                results[i] = (elapsed, err, diff)
        finally:
            client.close()

    log(f"loadtest: {req.requests} requests of {req.batch} to {payload.model!r} at {req.url} from "
        f"{req.concurrency} threads")
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(req.concurrency, req.requests))]
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    return summarize(req, payload, results, wall, artifact)


def summarize(req: LoadTestRequest, payload: Payload, results, wall: float, artifact: str | None) -> LoadTestResult:
    """Throughput, latency percentiles, errors by kind, and (with --verify) how far answers were from local."""
    ok = [r for r in results if r is not None and r[1] is None]
    errors = Counter(r[1] for r in results if r is not None and r[1] is not None)
    lat = np.array([r[0] for r in ok]) * 1e3
    doc: dict = {
        "url": req.url,
        "model": payload.model,
        "data": f"{req.data} ({len(payload.rows)} samples, {payload.datatype})",
        "requests": req.requests,
        "batch": req.batch,
        "concurrency": req.concurrency,
        "succeeded": len(ok),
        "failed": sum(errors.values()),
        "errors": dict(errors.most_common()),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2) if wall > 0 else None,
        "images_per_s": round(len(ok) * req.batch / wall, 2) if wall > 0 else None,
        "latency_ms": {k: round(float(v), 3) for k, v in (
            ("p50", np.percentile(lat, 50)), ("p90", np.percentile(lat, 90)), ("p99", np.percentile(lat, 99)),
            ("mean", lat.mean()), ("max", lat.max()))} if len(lat) else None,
    }
    failed = bool(errors)
    if artifact is not None:
        diffs = np.array([r[2] for r in ok if r[2] is not None])
        over = int((diffs > req.tolerance).sum())
        doc["verify"] = {
            "local": artifact,
            "compared": int(len(diffs)),
            "max_abs_logit_diff": float(diffs.max()) if len(diffs) else None,
            "tolerance": req.tolerance,
            "beyond_tolerance": over,
        }
        failed = failed or over > 0 or len(diffs) == 0
    return LoadTestResult(doc, 1 if failed else 0)


def format_loadtest(doc: dict) -> str:
    lines = [f"{doc['model']} at {doc['url']}: {doc['succeeded']}/{doc['requests']} requests answered "
             f"(batch {doc['batch']}, {doc['concurrency']} threads, {doc['wall_s']} s)"]
    if doc["latency_ms"]:
        lat = doc["latency_ms"]
        lines.append(f"throughput {doc['requests_per_s']} requests/s ({doc['images_per_s']} images/s); latency ms "
                     f"p50 {lat['p50']}, p90 {lat['p90']}, p99 {lat['p99']}, max {lat['max']}")
    for kind, n in doc["errors"].items():
        lines.append(f"error x{n}: {kind}")
    v = doc.get("verify")
    if v:
        verdict = "all within" if v["beyond_tolerance"] == 0 and v["compared"] else f"{v['beyond_tolerance']} beyond"
        lines.append(f"verify against local {v['local']}: {v['compared']} answers compared, largest |logit "
                     f"difference| {v['max_abs_logit_diff']}, {verdict} the tolerance {v['tolerance']}")
    return "\n".join(lines)
