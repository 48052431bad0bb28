"""The benchmark's cells as Ray tasks: ``lightning-wm benchmark --workers N`` (or ``--ray_address`` for a cluster).

Ray fills the benchmark's cell cache; :meth:`Benchmark.run` then assembles the table from it in the driver, so the
rows (and the false-accusation counts, which need every scheme's marked model) are exactly those of a sequential
run. The dependencies are kept by two waves: first every unmarked model and every embedding (independent of each
other), then every attack (each needs its scheme's embedding). Each task runs its cell with the cell's own Trainer
and asks Ray for one CPU and ``gpus_per_cell`` GPUs; cache files are written to a name of their own and renamed
(:mod:`lightning_wm.benchmark.cache`), so concurrent workers never tear one.

Scaling model: a wave of n independent cells on N workers takes about ⌈n / N⌉ × the longest cell; the quickstart
has 10 unmarked models and embeddings and 49 attack cells, so its wall time shrinks close to N× until N reaches the
cells of a wave, less the driver's final assembly (the null verifications and the false-accusation counts, run
once, sequentially) and Ray's start-up (seconds on one machine).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm.auto import tqdm

from lightning_wm.benchmark.matrix import Benchmark, quiet_lightning


def run_on_ray(
    bench: Benchmark, workers: int, address: str | None = None, gpus_per_cell: float = 0.0
) -> list[dict[str, Any]]:
    """Compute every cell of ``bench`` as Ray tasks, then return ``bench.run()`` (which reads them from the cache).

    Args:
        bench: the benchmark; it is sent to every worker (its models, data module and schemes must pickle).
        workers: CPUs of the local Ray instance (ignored with ``address``: the cluster's own resources count).
        address: an existing Ray cluster (``ray://host:10001`` or ``auto``); None starts a local instance.
        gpus_per_cell: GPUs each cell asks for (e.g. 1 on a GPU machine, 0.5 to share one GPU between two cells).

    Raises:
        ImportError: Ray is not installed, with the command that installs it.
    """
    try:
        import ray
    except ImportError:
        raise ImportError('--workers needs Ray: pip install -e ".[ray]" (or pip install "ray>=2.9")') from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            num_cpus=None if address else workers,
            include_dashboard=False,
            log_to_driver=bench.verbose,
            configure_logging=False,
        )
    try:
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_cell)(_run_cell)
        first_wave = ray.put(_for_workers(bench, bench.rerun))
        first = [task.remote(first_wave, "null", name, index) for name, index in _null_cells(bench)]
        first += [task.remote(first_wave, "embed", name, None) for name in bench.schemes]
        ray.get(first)
        second_wave = ray.put(_for_workers(bench, set()))
        rerun = bench.rerun
        ray.get(
            [
                task.remote(second_wave, "attack", name, (attack, name in rerun))
                for name in bench.schemes
                for attack in bench.attacks
            ]
        )
    finally:
        if started_here:
            ray.shutdown()
    bench.rerun = set()
    try:
        return bench.run()
    finally:
        bench.rerun = rerun


def _for_workers(bench: Benchmark, rerun: set[str]) -> Benchmark:
    """The benchmark as a worker runs it: no progress bar, and ``rerun`` for its wave (the embeddings of the second
    wave, done by the first, are read from the cache)."""
    worker = copy.copy(bench)
    worker.progress = False
    worker.rows = []
    worker._nulls = {}
    worker.rerun = set(rerun)
    return worker


def _null_cells(bench: Benchmark) -> list[tuple[str, int]]:
    """One (scheme, index) per distinct unmarked model: schemes sharing a template share their unmarked models."""
    seen: set[int] = set()
    cells = []
    for name in bench.schemes:
        template = bench.scheme_models.get(name, bench.model)
        if id(template) not in seen:
            seen.add(id(template))
            cells += [(name, index) for index in range(bench.null_models)]
    return cells


def _run_cell(bench: Benchmark, kind: str, scheme_name: str, arg: Any) -> None:
    """One cell in a Ray worker: it writes its result to the shared cache (and returns nothing)."""
    torch.set_num_threads(1)
    template = bench.scheme_models.get(scheme_name, bench.model)
    bar = tqdm(disable=True)
    with quiet_lightning(not bench.verbose):
        if kind == "null":
            bench.null_model(template, int(arg), bar)
            return
        scheme = bench.schemes[scheme_name]
        marked, key, embed = bench.embed(scheme_name, scheme, template, bar)
        if kind == "attack":
            attack, rerun = arg
            bench.attack(embed["cell"], attack, bench.attacks[attack], marked, key, scheme, rerun)
