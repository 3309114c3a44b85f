"""``molopt relax`` on a Dask cluster: a ``LocalCluster`` of worker processes, a running
scheduler, or Slurm/PBS/LSF/SGE jobs through dask-jobqueue (``pip install 'molopt[dask]'``).

The client plans as a single process does (reads the inputs, chooses potentials, compares
with earlier outputs) and records what needs no relaxing; the rest goes out as tasks, groups
of structures sized like a batch (by atoms), each relaxed on a worker by the same
:func:`molopt.run.relax_files` a single process runs, restricted to its members. A worker keeps
its compiled programs across tasks (one process, JAX's caches) and shares the persistent
compilation cache (``MOLOPT_CACHE_DIR`` on a shared path).

What makes a lost worker cost only its unfinished structures is what makes several processes
on one directory safe: outputs are renamed into place whole, a structure is claimed (a lock
that dies with its process) before it is relaxed, and a structure whose outputs are complete
is not relaxed again. Dask runs a lost worker's task again elsewhere; what that worker had
finished comes back as already done and is reported as it was. A task that keeps killing its
workers is split into one task per structure, and a structure that still does is recorded as
``failed`` instead of being retried forever.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from molopt.config import JOBQUEUE, parse_cluster
from molopt.errors import ConfigError

#: keys of the ``[cluster]`` table that are molopt's own (the rest go to dask-jobqueue)
OWN_KEYS = ("jobs", "minimum_jobs", "maximum_jobs")
#: new tasks a structure gets after Dask gave up on one (each of which Dask itself retries
#: ``distributed.scheduler.allowed-failures`` times) before it is recorded as failed
RESUBMIT = 2
#: Dask settings of the schedulers molopt starts (``--cluster``). A worker that dies makes
#: Dask suspect every task it was *processing*, and by default a scheduler sends a worker
#: more tasks than it has threads (``worker-saturation`` 1.1: two for one thread), so a
#: structure queued behind one that kills its worker was suspected with it, and after enough
#: kills recorded ``failed`` though it never ran. With 1.0 a worker holds only the tasks it
#: runs. Molopt's tasks are batches of seconds or more, so nothing is lost by not queueing
#: ahead. A scheduler started by the user (``--scheduler``) should be started with it too:
#: ``DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0``.
SCHEDULER_CONFIG = {"distributed.scheduler.worker-saturation": 1.0}


def worker_environment() -> dict:
    """What each worker process needs in its environment: no preallocation of a GPU's whole
    memory (several workers, or a worker and the host, share one)."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}


def visible_gpus(environ=None) -> list[str]:
    """The GPUs this host lets a process see: the entries of ``CUDA_VISIBLE_DEVICES`` when it
    is set (as Slurm and PBS set it for a job's GPUs), else ``/dev/nvidia0``, ``/dev/nvidia1``,
    ... (none on a machine without NVIDIA GPUs)."""
    environ = os.environ if environ is None else environ
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip() and d.strip() != "-1"]
    import re
    from pathlib import Path

    found = [p.name for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    return sorted((name[len("nvidia") :] for name in found), key=int)


def choose_device(environ=None, lock_dir: str | None = None):
    """One GPU for this worker process: the first of :func:`visible_gpus` whose slot lock
    (``flock`` on ``<lock_dir>/molopt-gpu-<id>.lock``, held while the process lives) no other
    process of this host holds; ``CUDA_VISIBLE_DEVICES`` is set to it, before JAX starts a
    backend. When every GPU is taken (more workers than GPUs) the worker shares one, chosen
    by its pid. Returns (the GPU id or None without GPUs, the lock's open file or None)."""
    import fcntl
    import tempfile

    environ = os.environ if environ is None else environ
    gpus = visible_gpus(environ)
    if not gpus:
        return None, None
    lock_dir = lock_dir or tempfile.gettempdir()
    for gpu in gpus:
        handle = open(os.path.join(lock_dir, f"molopt-gpu-{gpu}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu, handle
    gpu = gpus[os.getpid() % len(gpus)]
    environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu, None


def _device_plugin():
    """A Dask worker plugin that gives each worker process its own GPU at start
    (:func:`choose_device`), kept by the scheduler for workers that join later."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OneDevicePerWorker(WorkerPlugin):
        name = "molopt-one-device-per-worker"

        def setup(self, worker):
            gpu, handle = choose_device()
            worker._molopt_device = (gpu, handle)  # the lock lives as long as the worker

    return OneDevicePerWorker()


def open_client(settings):
    """(client, cluster or None) for the settings' ``scheduler`` or ``cluster``; a clear
    :class:`ConfigError` when Dask is missing, the scheduler cannot be reached or no worker
    joins within ``cluster_timeout`` seconds."""
    try:
        from distributed import Client
    except ImportError:
        raise ConfigError(
            "--cluster and --scheduler need Dask: pip install 'molopt[dask]'"
        ) from None
    timeout = settings.cluster_timeout
    os.environ.update(worker_environment())  # local workers inherit it
    cluster = None
    if settings.scheduler:
        try:
            client = Client(settings.scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"cannot reach the Dask scheduler at {settings.scheduler} within "
                f"{timeout:g} s ({exc.__class__.__name__}: {exc})"
            ) from None
    else:
        import dask

        kind, n = parse_cluster(settings.cluster)
        options = dict(settings.cluster_options)
        with dask.config.set(SCHEDULER_CONFIG):  # read when the scheduler starts
            cluster = _start_cluster(kind, n, options)
        client = Client(cluster)
    try:
        client.register_plugin(_device_plugin())
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        close(client, cluster)
        raise ConfigError(
            f"no Dask worker joined within {timeout:g} s (the jobs may be queued: raise "
            "cluster_timeout, or check the queue)"
        ) from None
    return client, cluster


def _saturation(client) -> float | None:
    """The scheduler's ``worker-saturation``, or None where it cannot be read."""
    try:
        return float(
            client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION)
        )
    except Exception:  # an older or locked-down scheduler: no warning, no failure
        return None


def _start_cluster(kind: str, n: int | None, options: dict):
    """A ``LocalCluster`` of ``n`` one-thread worker processes, or a dask-jobqueue cluster
    scaled (or adapting) as the ``[cluster]`` table says."""
    if kind == "local":
        from distributed import LocalCluster

        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit=options.pop("memory", None) or 0,
        )
    cluster, own = jobqueue_cluster(kind, options)
    if "minimum_jobs" in own or "maximum_jobs" in own:
        cluster.adapt(
            minimum_jobs=own.get("minimum_jobs", 0),
            maximum_jobs=own.get("maximum_jobs", own.get("minimum_jobs", 1)),
        )
    else:
        cluster.scale(jobs=own.get("jobs", 1))
    return cluster


def jobqueue_cluster(kind: str, options: dict):
    """(dask-jobqueue cluster of ``kind``, molopt's own keys) from a ``[cluster]`` table; no
    job is submitted yet. Each job's script exports :func:`worker_environment` first."""
    try:
        import dask_jobqueue
    except ImportError:
        msg = f"--cluster {kind} needs dask-jobqueue: pip install 'molopt[dask]'"
        raise ConfigError(msg) from None
    options = dict(options)
    own = {k: options.pop(k) for k in OWN_KEYS if k in options}
    prologue = [f"export {k}={v}" for k, v in worker_environment().items()]
    options["job_script_prologue"] = prologue + list(options.get("job_script_prologue", []))
    try:
        return getattr(dask_jobqueue, JOBQUEUE[kind])(**options), own
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[cluster] table for {kind}: {exc}") from None


def close(client, cluster) -> None:
    for thing in (client, cluster):
        if thing is not None:
            try:
                thing.close()
            except Exception:  # pragma: no cover - closing a broken connection
                pass


def groups_of(members: list, sizes: list[int], max_atoms: int, max_structures: int) -> list:
    """Members in tasks of at most ``max_structures`` structures and (unless one alone is
    bigger) ``max_atoms`` atoms, in order."""
    groups, current, atoms = [], [], 0
    for member, n in zip(members, sizes, strict=True):
        if current and (atoms + n > max_atoms or len(current) >= max_structures):
            groups.append(current)
            current, atoms = [], 0
        current.append(member)
        atoms += n
    if current:
        groups.append(current)
    return groups


def run_tasks(
    task: Callable,
    members: list,
    sizes: list[int],
    settings,
    deliver: Callable[[tuple, dict], None],
    fail: Callable[[tuple, str], None],
    note: Callable[[str], None],
    on_workers: Callable[[int], None] | None = None,
) -> None:
    """Relax ``members`` (path, index, stem) on the cluster of ``settings``: each task calls
    ``task(group, settings)`` on a worker (:func:`molopt.run.relax_members`); ``deliver``
    gets each member's record, ``fail`` each member lost for good with the reason;
    ``on_workers`` the number of workers alive whenever it changes (also noted)."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    worker_settings = dataclasses.replace(
        settings, cluster=None, scheduler=None, cluster_options={}, json=False
    )
    client, cluster = open_client(settings)
    futures = {}
    tries: dict = {}
    watcher = None
    try:
        workers = len(client.scheduler_info().get("workers", {}))
        note(f"Dask: {workers} worker(s) at {client.scheduler.address}")
        saturation = _saturation(client)
        if saturation is not None and saturation > 1:
            note(
                f"the scheduler hands a worker more tasks than it runs (worker-saturation "
                f"{saturation:g}): a structure that kills its worker may have the structures "
                "queued behind it judged with it; start the scheduler with "
                "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION=1.0"
            )
        # tasks sized like a batch, but at least four per worker so that all are busy
        per_task = max(1, -(-sum(sizes) // (4 * max(workers, 1))))
        from molopt.potentials.base import BATCH_ATOMS

        max_atoms = min(settings.max_batch_atoms or BATCH_ATOMS, per_task)
        groups = groups_of(members, sizes, max_atoms, settings.batch_size)
        note(f"Dask: {len(groups)} task(s) of up to {max_atoms} atoms")

        def submit(group):
            future = client.submit(task, group, worker_settings, pure=False)
            futures[future] = group
            return future

        pending = as_completed([submit(g) for g in groups])

        def workers_changed(alive: int) -> None:
            note(f"Dask: {alive} worker(s) alive")
            if on_workers is not None:
                on_workers(alive)

        if on_workers is not None:
            on_workers(workers)
        watcher = _WorkerWatch(client, workers, workers_changed)
        for future in pending:
            group = futures.pop(future)
            try:
                records = future.result()
            except KilledWorker as exc:
                if len(group) > 1:  # which structure kills it? one task each
                    note(
                        f"a task of {len(group)} structures killed its workers; "
                        "retrying them one by one"
                    )
                    for member in group:
                        pending.add(submit([member]))
                else:
                    # a task queued on a worker that another task killed is suspected too:
                    # a structure gets RESUBMIT fresh tasks before it is judged
                    member = group[0]
                    tries[member] = tries.get(member, 0) + 1
                    if tries[member] <= RESUBMIT:
                        pending.add(submit(group))
                    else:
                        fail(member, f"killed the Dask worker relaxing it repeatedly ({exc})")
                continue
            except Exception as exc:  # an error of the task itself
                for member in group:
                    fail(member, f"the Dask task failed: {exc.__class__.__name__}: {exc}")
                continue
            by_frame = {(r["input"], r["index"]): r for r in records}
            for member in group:
                rec = by_frame.get((member[0], member[1]))
                if rec is None:
                    fail(member, "its Dask task returned no record for it")
                else:
                    deliver(member, rec)
    finally:
        if watcher is not None:
            watcher.stop()
        if futures:
            client.cancel(list(futures))
        close(client, cluster)


class _WorkerWatch:
    """A daemon thread that reads the number of workers alive from the client's view of the
    scheduler every ``interval`` seconds and reports each change (a worker lost while every
    task is still running shows at once, not when a task next finishes)."""

    def __init__(self, client, seen: int, report: Callable[[int], None], interval: float = 1.0):
        import threading

        self.client, self.seen, self.report = client, seen, report
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self.thread.start()

    def _watch(self, interval: float) -> None:
        while not self.done.wait(interval):
            try:
                alive = len(self.client.scheduler_info().get("workers", {}))
            except Exception:  # pragma: no cover - the client is closing
                return
            if alive != self.seen:
                self.seen = alive
                self.report(alive)

    def stop(self) -> None:
        self.done.set()
