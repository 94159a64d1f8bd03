"""Run an evaluation grid on Ray: the grid's samples are spread over worker processes (on this
machine or on a cluster), and the results file gets the same rows a serial
:func:`tokensparse.eval.runner.run_grid` writes (``tokensparse eval ... --ray [ADDRESS]``).

Ray is optional (``pip install 'tokensparse[ray]'``); nothing else in tokensparse imports it.

How it runs, and why:

* **One sample per task.** The unit of work is one sample's missing runs, dense first, executed by
  :func:`tokensparse.eval.runner.run_sample_runs` -- the function the serial runner calls. The
  dense teacher-forced logits that the method runs' fidelity is measured against therefore never
  leave the process that computed them, and a sample's rows do not depend on where it ran.
* **Workers are Ray actors that load the model once.** A model is far too large to ship per task,
  so each actor calls ``loader()`` (a picklable zero-argument callable returning ``(model,
  tokenizer)``, e.g. :class:`LocalModel`) in its constructor, pins ``torch.set_num_threads``, warms
  up once, and then takes sample after sample. Every worker must load the same weights: their
  fingerprints are compared before anything runs.
* **The driver plans and writes.** Planning (what is done, what is left) is the serial runner's
  (:func:`~tokensparse.eval.runner.prepare_run`), so resume works the same way; the driver appends
  each sample's rows as soon as the sample finishes, so an interrupted run keeps every finished
  sample. Rows are therefore in completion order, not plan order; compare runs by ``key``
  (:func:`~tokensparse.eval.runner.row_differences`). Samples are handed out longest first (prompt
  length × runs), which shortens the tail of a sweep; it does not change any row.
* **What may differ from a serial run** is listed once, in
  :data:`tokensparse.eval.runner.VOLATILE_FIELDS` (times, memory, load, ``env``; Ray rows carry
  ``env["ray"]`` = worker index, worker count, node address). Every other field is identical, floats
  bit for bit, when the serial run uses the same torch thread count as each Ray worker (a different
  thread count changes the order of floating-point reductions, hence the last bits).
* **Peers (kvpress) run in the driver**, after the Ray part, exactly as the serial runner runs them
  (their own environment in a subprocess, one call per peer entry and placement); the driver loads
  the model itself for them, only when peer runs are left, and checks it has the workers'
  fingerprint. Their preflight (environment present, float32 model) happens before any sample runs.
* **Cluster.** ``address=None`` starts a private local Ray instance with ``workers ×
  threads_per_worker`` CPUs (no dashboard) and shuts it down at the end; any other address
  (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) connects to an existing cluster, which must
  have the model at the same path on every node (Ray's own assumption for code, too). Each actor
  asks for ``threads_per_worker`` CPUs, so Ray never puts more workers on a node than it has cores.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections import deque
from pathlib import Path

from .grid import Grid

__all__ = ["LocalModel", "RayUnavailable", "RayRunError", "run_grid_ray", "import_ray"]

INSTALL_HINT = "pip install 'tokensparse[ray]'"


class RayUnavailable(RuntimeError):
    """Ray is not installed (it is an optional extra)."""


class RayRunError(RuntimeError):
    """The Ray run cannot go on: no connection to the cluster, a worker that cannot load the model or
    loads other weights, a worker that dies. Rows written before it are kept (a rerun resumes)."""


def import_ray():
    """The ``ray`` module, or :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"running an evaluation on Ray needs the ray package, which is not installed "
                             f"({e}); install it with: {INSTALL_HINT}") from None
    return ray


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """Loader of the bundled SmolLM2 (``path=None``) or a local Hugging Face model directory, through
    :func:`tokensparse.load_model`. Picklable, so it can be sent to Ray workers, which each call it
    once; on a cluster, ``path`` must exist on every node. ``rope_scaling``: as
    :func:`tokensparse.load_model`'s (the grid's ``rope_scaling``)."""

    path: str | None = None
    rope_scaling: dict | None = None

    def __call__(self):
        import tokensparse as ts

        return ts.load_model(self.path, rope_scaling=self.rope_scaling)


class _SampleWorker:
    """The body of a Ray actor: one model, one thread count, many samples (see the module docstring)."""

    def __init__(self, loader, grid: Grid, threads: int, command: str | None, index: int, workers: int,
                 address: str):
        import ray
        import torch

        from .env import environment
        from .runner import model_id

        torch.set_num_threads(threads)
        self.model, self.tokenizer = loader()
        self.grid = grid
        self.minfo = model_id(self.model)
        self.env = environment(self.model, command)
        self.env["ray"] = {"worker": index, "workers": workers, "node": ray.util.get_node_ip_address(),
                           "address": address}
        self.warm = False

    def info(self) -> dict:
        return {"model": self.minfo, "env": self.env}

    def run(self, sspec, todo: list, run_id: str) -> list[dict]:
        from .runner import _warm_up, run_sample_runs

        if not self.warm:  # as the serial runner: one untimed generation before the first timed run
            _warm_up(self.model)
            self.warm = True
        return run_sample_runs(self.model, self.tokenizer, sspec, todo, self.grid, run_id=run_id,
                               minfo=self.minfo, env=self.env)


def run_grid_ray(loader, grid: Grid, out: str | Path, *, address: str | None = None, workers: int = 2,
                 threads_per_worker: int = 1, progress: bool = True, command: str | None = None,
                 skip_peers: bool | None = None, peer_model_dir: str | Path | None = None,
                 start_timeout_s: float = 1800.0) -> dict:
    """:func:`tokensparse.eval.runner.run_grid` with the samples run by ``workers`` Ray actors of
    ``threads_per_worker`` torch threads each; returns the same summary dict.

    ``loader`` is a picklable zero-argument callable returning ``(model, tokenizer)`` (e.g.
    :class:`LocalModel`); each worker calls it once. ``address``: ``None`` or ``"local"`` starts a
    private local Ray instance (shut down at the end); anything else is passed to ``ray.init`` to
    join an existing cluster. If this process is already connected to Ray (``ray.init`` was called),
    that connection is used and ``address`` must be ``None``. ``start_timeout_s`` bounds the wait
    for the workers to load the model (on a busy cluster they wait for free CPUs).

    Raises :class:`RayUnavailable` without Ray, ``ValueError`` for bad arguments and
    :class:`RayRunError` when the cluster cannot be reached or a worker cannot start, loads other
    weights than the others, or dies; the rows of every sample finished before a failure are in the
    results file, so a rerun resumes. Peer errors are the serial runner's.
    """
    from . import runner

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be an integer >= 1, got {threads_per_worker!r}")
    if not callable(loader):
        raise ValueError(f"loader must be a callable returning (model, tokenizer), got {loader!r}")
    ray = import_ray()

    started = False
    if ray.is_initialized():
        if address is not None:
            raise ValueError(f"this process is already connected to Ray; pass address=None to use that connection "
                             f"(got address={address!r})")
        where, label = "the current Ray connection", "connected"
    elif address in (None, "local"):
        ray.init(address="local", num_cpus=workers * threads_per_worker, include_dashboard=False)
        started, where, label = True, f"a local Ray instance ({workers * threads_per_worker} CPUs)", "local"
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayRunError(f"cannot connect to the Ray cluster at {address!r}: {type(e).__name__}: {e}") from None
        where, label = f"the Ray cluster at {address}", str(address)
    actors: list = []
    try:
        cls = ray.remote(num_cpus=threads_per_worker, max_restarts=0)(_SampleWorker)
        print(f"{grid.name}: starting {workers} Ray workers × {threads_per_worker} torch threads on {where}; "
              "each loads the model", file=sys.stderr)
        actors = [cls.remote(loader, grid, threads_per_worker, command, i, workers, label) for i in range(workers)]
        infos = _gather_infos(ray, actors, start_timeout_s, workers * threads_per_worker)
        minfo = infos[0]["model"]
        for i, info in enumerate(infos[1:], 1):
            if (info["model"]["fingerprint"], info["model"]["dtype"]) != (minfo["fingerprint"], minfo["dtype"]):
                raise RayRunError(f"Ray worker {i} loaded other weights than worker 0 ({info['model']} vs {minfo}); "
                                   "every node must have the same model at the same path")
        if (why := runner.rope_mismatch(grid, minfo)) is not None:
            raise RayRunError(f"Ray workers: {why}")

        prep = runner.prepare_run(grid, out, minfo, skip_peers,
                                  f"{workers} Ray workers × {threads_per_worker} torch threads")
        peer_model = peer_setup = None
        if prep.n_peer_todo:  # the driver runs the peers; check them before any sample runs
            peer_model = _driver_model(loader, minfo, threads_per_worker)
            peer_setup = runner._peer_preflight(grid, peer_model[0], minfo, prep.peer_plan, peer_model_dir)

        run_id = runner.new_run_id()
        log = runner.RowLog(prep.path)
        _run_samples(ray, actors, prep.plan, run_id, log, total=prep.n_todo, desc=grid.name, progress=progress)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception as e:  # cleanup only: the run's own error (if any) is the one to raise
                print(f"warning: could not stop a Ray worker: {type(e).__name__}: {e}", file=sys.stderr)
        if started:
            ray.shutdown()

    p_ran = p_err = 0
    if peer_model is not None:
        from .env import environment

        model, tokenizer = peer_model
        p_ran, p_err = runner.run_peers(prep, model=model, tokenizer=tokenizer, grid=grid, minfo=minfo,
                                        env=environment(model, command), run_id=run_id, samples={}, setup=peer_setup)
    return prep.summary(log.ran + p_ran, log.errors + p_err)


def _gather_infos(ray, actors: list, timeout: float, cpus: int) -> list[dict]:
    """Wait for every worker to have loaded the model; clear errors when one cannot."""
    refs = [a.info.remote() for a in actors]
    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        have = ray.cluster_resources().get("CPU", 0)
        raise RayRunError(f"the Ray workers did not start within {timeout:g} s: they need {cpus} CPUs in all "
                           f"(the cluster has {have:g}, some perhaps in use), and each loads the model") from None
    except ray.exceptions.RayError as e:
        raise RayRunError(f"a Ray worker could not load the model: {_ray_cause(e)}") from None


def _driver_model(loader, minfo: dict, threads: int):
    """The model in the driver, for the peers; it must be the workers' model."""
    import torch

    from .runner import model_id

    torch.set_num_threads(threads)  # the peer worker gets the driver's thread count, as in a serial run
    model, tokenizer = loader()
    mine = model_id(model)
    if (mine["fingerprint"], mine["dtype"]) != (minfo["fingerprint"], minfo["dtype"]):
        raise RayRunError(f"the model loaded in the driver for the peers ({mine}) is not the Ray workers' ({minfo})")
    return model, tokenizer


def _run_samples(ray, actors: list, plan: list, run_id: str, log, *, total: int, desc: str, progress: bool) -> None:
    """Hand out samples to idle workers, longest first, and append each sample's rows as it finishes.

    A worker that dies or raises (``run_sample_runs`` turns a run's own errors into rows, so this
    means a crashed process, e.g. out of memory) stops the hand-out: the samples still running
    elsewhere are collected and written, then :class:`RayRunError` names the sample that failed."""
    from tqdm.auto import tqdm

    queue = deque(sorted(plan, key=lambda item: -item[0].length * len(item[1])))  # stable: plan order on ties
    idle = list(actors)
    running: dict = {}  # object ref -> (actor, sample spec, todo)
    failure = None
    bar = tqdm(total=total, desc=desc, unit="run", disable=not progress)
    t0 = time.monotonic()
    try:
        while running or (queue and failure is None):
            while idle and queue and failure is None:
                actor = idle.pop()
                sspec, todo = queue.popleft()
                running[actor.run.remote(sspec, todo, run_id)] = (actor, sspec, todo)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, sspec, todo = running.pop(ref)
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as e:
                failure = failure or (sspec, e)
                continue  # the actor is not reused: it may be dead
            expected = [key for _, _, key in todo]
            if [r.get("key") for r in rows] != expected:
                raise RayRunError(f"a Ray worker returned rows {[r.get('key') for r in rows]} for the runs "
                                   f"{expected} of {_sample_label(sspec)}")
            for row in rows:
                log.add(row)
            bar.update(len(rows))
            bar.set_postfix_str(f"{len(running)} samples running, {len(queue)} queued")
            idle.append(actor)
    finally:
        bar.close()
    if failure is not None:
        sspec, e = failure
        raise RayRunError(f"a Ray worker failed on {_sample_label(sspec)} after {time.monotonic() - t0:.0f} s: "
                           f"{_ray_cause(e)}; the rows of the samples finished so far are in {log.path}, "
                           "rerun to resume")


def _sample_label(sspec) -> str:
    return f"sample {sspec.task} L={sspec.length} depth={sspec.depth} seed={sspec.seed} index={sspec.index}"


def _ray_cause(e: Exception) -> str:
    """What went wrong in a worker, in one line: the original exception when Ray kept it (a task
    error), else the first line of Ray's message (what happened to the actor) and its last line (for
    an actor whose constructor raised, the exception at the end of the traceback Ray embeds)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and type(cause).__module__.split(".")[0] != "ray":
        return f"{type(cause).__name__}: {cause}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # Ray colours the actor's name
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
