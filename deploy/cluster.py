"""`deploy validate --cluster`: the batches split into shards, measured by Dask workers, their sums added here.

`local:N` starts a Dask distributed LocalCluster of N worker processes bound to 127.0.0.1; `tcp://HOST:PORT` uses a
running scheduler whose workers can read the export folder and the images at the same paths. Each worker opens the
export's runners once (cached per process) and returns, per shard, its `RunSums` and logits; the parent adds them,
so the figures are those of one process on the same batches. Dask is the optional `cluster` extra.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from partialnet.errors import DeployError, UsageError

from .streaming import Measurer, ShardResult, merge_results, runs

INSTALL = 'pip install -c constraints.txt -e ".[cluster]"'
SHARD_BATCHES = 16  # at most this many batches per task: a shard's logits stay small
IN_FLIGHT = 2  # shards queued per worker
CONNECT_TIMEOUT_S = 30


def require_dask() -> None:
    """A one-line error, with the install command, when the cluster extra is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError(f"--cluster needs Dask distributed, which is not installed; install the cluster extra: "
                         f"{INSTALL}") from None


@dataclass(frozen=True)
class Plan:
    """What a worker needs to open the export's runners itself (picklable)."""

    folder: str
    keys: list[str]  # artifact rows, eager excluded
    threads: int | None
    allow_pickle: bool
    pairs: list[tuple[str, str]]
    num_classes: int


_MEASURERS: dict[str, Measurer] = {}


def _measurer(plan: Plan) -> Measurer:
    """The worker process's runners for `plan`, opened on its first shard."""
    if repr(plan) not in _MEASURERS:
        from export.manifest import Manifest
        from runtimes.telemetry import disable_telemetry

        from . import backends
        from .backends import RunnerOptions
        from .opening import open_export

        disable_telemetry()
        export = open_export(plan.folder, allow_pickle=plan.allow_pickle)
        manifest: Manifest = export.manifest
        options = RunnerOptions(threads=plan.threads)
        eager = export.eager_runner(options)
        runners = {eager.key: eager.runner}
        for art in manifest.artifacts:
            if art.key in plan.keys:
                runners[art.key] = backends.open_row(export.folder, art, options)
        _MEASURERS[repr(plan)] = Measurer(runners, eager.key, export.model, plan.pairs, plan.num_classes)
    return _MEASURERS[repr(plan)]


def run_shard(plan: Plan, part: Any, labels: np.ndarray | None, batch_size: int, first: int, count: int) -> ShardResult:
    """Batches first .. first + count - 1, whose rows `part` holds: the task a worker runs."""
    m = _measurer(plan)
    return merge_results(list(m.results(part, labels, batch_size, range(count), 0, first_index=first)))


def shards(todo: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Runs of consecutive batch numbers, at most `size` long: (first, count)."""
    return runs(todo, size)


def connect(spec: str) -> tuple[Any, Any]:
    """(client, cluster or None) for local:N or tcp://HOST:PORT."""
    require_dask()
    import dask
    from distributed import Client, LocalCluster

    if spec.startswith("local:"):
        n = int(spec.split(":", 1)[1])
        # Dask sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) in its workers; the runtimes must see what this process
        # sees, or their thread counts, and with them the logits' last bits, would differ from a single-process run.
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   scheduler_port=0, dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    try:
        return Client(spec, timeout=CONNECT_TIMEOUT_S), None
    except (OSError, TimeoutError) as e:
        raise DeployError(f"cannot reach the Dask scheduler at {spec} ({e}); start one (dask scheduler) or use "
                          f"--cluster local:N.") from e


def cluster_results(spec: str, plan: Plan, source: Any, labels: np.ndarray | None, batch_size: int,
                    todo: Sequence[int]) -> Iterator[ShardResult]:
    """Each shard's result as its worker finishes it; a few shards queued per worker, no more."""
    from distributed import as_completed

    client, cluster = connect(spec)
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        size = max(1, min(SHARD_BATCHES, -(-len(todo) // (4 * workers))))
        queue = iter(shards(todo, size))

        def submit(first: int, count: int):
            rows = slice(first * batch_size, (first + count) * batch_size)
            lab = None if labels is None else labels[rows]
            return client.submit(run_shard, plan, source.part(rows.start, rows.stop), lab, batch_size, first, count,
                                 pure=False)

        pending = as_completed([submit(*s) for _, s in zip(range(workers * IN_FLIGHT), queue)])
        for fut in pending:
            result = fut.result()
            fut.release()
            nxt = next(queue, None)
            if nxt is not None:
                pending.add(submit(*nxt))
            yield result
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
