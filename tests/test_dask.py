"""molopt relax on Dask (LocalCluster with 2 worker processes on CI's 2 cores): the same
records as one process; a worker killed mid-run, a client killed mid-run, a structure that
keeps killing its worker, a scheduler that cannot be reached; Slurm job scripts."""

import os
import signal
import subprocess
import threading
import time

import pytest
from test_faults import assert_whole, command, make_inputs, records_of

distributed = pytest.importorskip("distributed")

from molopt import config  # noqa: E402
from molopt.run import relax_files  # noqa: E402


def settings_for(out_dir, **more):
    return config.build(None, potential="argon", fmax=1e-3, out_dir=str(out_dir), **more)


def by_input(records):
    return {(r["input"], r["index"]): r for r in records}


@pytest.fixture(scope="module")
def local_cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster


def test_cluster_records_equal_a_single_process(tmp_path, local_cluster):
    make_inputs(tmp_path / "in", 12)
    alone = relax_files([str(tmp_path / "in")], settings_for(tmp_path / "one"))
    notes, workers = [], []
    spread = relax_files(
        [str(tmp_path / "in")],
        settings_for(tmp_path / "many", scheduler=local_cluster.scheduler_address),
        on_note=notes.append,
        on_workers=workers.append,
    )
    assert any("2 worker(s)" in n for n in notes)
    # a scheduler of Dask's defaults (saturation 1.1) is told how to start one like molopt's
    assert any("WORKER_SATURATION=1.0" in n for n in notes)
    assert workers[0] == 2  # the progress display's workers alive
    with distributed.Client(local_cluster) as client:  # each worker chose its device
        chosen = client.run(lambda dask_worker: hasattr(dask_worker, "_molopt_device"))
    assert list(chosen.values()) == [True, True]
    a, b = by_input(alone.records), by_input(spread.records)
    assert a.keys() == b.keys() and len(b) == 12
    for k in a:
        assert b[k]["status"] == a[k]["status"] == "converged"
        assert b[k]["steps"] == a[k]["steps"]
        assert b[k]["energy"] == pytest.approx(a[k]["energy"], abs=1e-12)
    assert_whole(tmp_path / "many", [f"s{k:02d}" for k in range(12)])
    again = relax_files(  # resume: everything is done
        [str(tmp_path / "in")],
        settings_for(tmp_path / "many", scheduler=local_cluster.scheduler_address),
    )
    assert [r["status"] for r in again.records] == ["skipped"] * 12


def test_a_worker_killed_mid_run(tmp_path, local_cluster):
    n = 16
    make_inputs(tmp_path / "in", n, size=30)
    out_dir = tmp_path / "out"
    client = distributed.Client(local_cluster)
    pids = list(client.run(os.getpid).values())
    client.close()

    def kill_one_when_work_is_done():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out_dir.glob("*.h5md")):
            time.sleep(0.05)
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_one_when_work_is_done)
    killer.start()
    summary = relax_files(
        [str(tmp_path / "in")],
        settings_for(out_dir, scheduler=local_cluster.scheduler_address, batch_size=2),
    )
    killer.join()
    records = summary.records
    assert len(records) == n and len(by_input(records)) == n  # each exactly once
    assert all(r["status"] == "converged" for r in records)
    assert_whole(out_dir, [f"s{k:02d}" for k in range(n)])
    single = by_input(relax_files([str(tmp_path / "in")], settings_for(tmp_path / "one")).records)
    for k, r in by_input(records).items():
        assert r["steps"] == single[k]["steps"]
        assert r["energy"] == pytest.approx(single[k]["energy"], abs=1e-12)


def test_resume_after_the_client_is_killed(tmp_path):
    n = 16
    make_inputs(tmp_path / "in", n, size=30)
    out_dir = tmp_path / "out"
    args = command(tmp_path / "in", out_dir, "--cluster", "local:2", "--batch-size", "2")
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out_dir.glob("*.h5md"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the client and its local workers
    proc.wait()
    assert len(list(out_dir.glob("*.h5md"))) < n, "the kill came too late"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    records = records_of(rerun.stdout)
    assert len(records) == n and len(by_input(records)) == n
    assert_whole(out_dir, [f"s{k:02d}" for k in range(n)])


class Poison(distributed.diagnostics.plugin.WorkerPlugin):
    """On every worker (restarted ones too): a task holding ``s03`` kills its process."""

    def setup(self, worker):
        import molopt.run as run

        real = run.relax_members

        def relax_members(members, settings):
            if any(stem == "s03" for _, _, stem in members):
                os._exit(1)
            return real(members, settings)

        run.relax_members = relax_members


def test_a_structure_that_keeps_killing_its_worker_fails_alone(tmp_path):
    import dask

    from molopt.cluster import SCHEDULER_CONFIG

    make_inputs(tmp_path / "in", 6)
    # molopt's own scheduler settings (as --cluster starts it): a worker holds only the task
    # it runs, so the structures queued behind s03 are never suspected with it
    fewer = {"distributed.scheduler.allowed-failures": 1}
    with dask.config.set({**SCHEDULER_CONFIG, **fewer}):
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            with distributed.Client(cluster) as client:
                client.register_plugin(Poison())  # kept by the scheduler for new workers
            notes = []
            summary = relax_files(
                [str(tmp_path / "in")],
                settings_for(tmp_path / "out", scheduler=cluster.scheduler_address),
                on_note=notes.append,
            )
            # no nanny may be restarting a killed worker when the cluster closes (Dask's
            # teardown then fails on a process that has no pid yet)
            with distributed.Client(cluster) as client:
                client.wait_for_workers(2, timeout=60)
    status = {r["input"].rsplit("/", 1)[1]: r for r in summary.records}
    assert status["s03.xyz"]["status"] == "failed"
    assert "killed the Dask worker" in status["s03.xyz"]["error"]
    others = {status[f"s{k:02d}.xyz"]["status"]: status[f"s{k:02d}.xyz"] for k in (0, 1, 2, 4, 5)}
    assert list(others) == ["converged"], others
    assert len(summary.records) == 6


def test_the_clusters_molopt_starts_send_a_worker_only_what_it_runs(tmp_path):
    from molopt.cluster import close, open_client

    client, cluster = open_client(settings_for(tmp_path, cluster="local:1"))
    try:
        saturation = client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.WORKER_SATURATION
        )
    finally:
        close(client, cluster)
    assert saturation == 1.0


def test_an_unreachable_scheduler_is_a_usage_error(tmp_path):
    make_inputs(tmp_path / "in", 1)
    args = command(tmp_path / "in", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:9")
    result = subprocess.run(
        args + ["--cluster-timeout", "3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr


def test_slurm_jobs_from_the_cluster_table(tmp_path):
    from molopt.cluster import jobqueue_cluster

    toml = tmp_path / "slurm.toml"
    toml.write_text(
        '[cluster]\nkind = "slurm"\nqueue = "gpu"\naccount = "chem42"\ncores = 16\n'
        'memory = "64GB"\nwalltime = "02:00:00"\njob_extra_directives = ["--gres=gpu:1"]\n'
        "maximum_jobs = 8\n"
    )
    settings = config.build(str(toml))
    assert settings.cluster == "slurm" and settings.cluster_options["maximum_jobs"] == 8
    cluster, own = jobqueue_cluster("slurm", settings.cluster_options)
    script = cluster.job_script()
    cluster.close()
    assert own == {"maximum_jobs": 8}
    for line in ("#SBATCH -p gpu", "#SBATCH -A chem42", "#SBATCH -t 02:00:00", "--gres=gpu:1"):
        assert line in script
    assert "export XLA_PYTHON_CLIENT_PREALLOCATE=false" in script
    with pytest.raises(Exception, match="cluster"):
        config.build(None, cluster="kubernetes")


def test_each_worker_gets_its_own_gpu(tmp_path, monkeypatch):
    """One GPU per worker process: the first free of the GPUs the job sees, by a slot lock
    that lives with the process; a worker beyond the number of GPUs shares one."""
    from molopt.cluster import _device_plugin, choose_device, visible_gpus

    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3, 5"}) == ["3", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    envs = [{"CUDA_VISIBLE_DEVICES": "3,5"} for _ in range(3)]
    chosen = [choose_device(env, str(tmp_path)) for env in envs]
    assert [gpu for gpu, _ in chosen[:2]] == ["3", "5"]
    assert [env["CUDA_VISIBLE_DEVICES"] for env in envs[:2]] == ["3", "5"]
    assert chosen[2][0] in ("3", "5") and chosen[2][1] is None  # shares
    chosen[0][1].close()  # that worker ended: its GPU is free again
    assert choose_device({"CUDA_VISIBLE_DEVICES": "3,5"}, str(tmp_path))[0] == "3"
    # the worker plugin on real worker processes: two workers, two GPUs, one each
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,8")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(_device_plugin())
        # (by value: os.environ.get itself would carry the client's environment along)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(seen.values()) == ["7", "8"]
