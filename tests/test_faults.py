"""Faults that must lose nothing: deleted or replaced outputs, kill -9 leftovers, several
processes on one directory, a peer killed mid-run, and a disk that fills up."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ase.io
import h5py
import pytest
from ase import Atoms
from conftest import rattled_cluster

from molopt import config
from molopt.io import atomic
from molopt.io import results as out
from molopt.run import relax_files


def make_inputs(directory, n, size=8):
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        s = rattled_cluster(size + k % 5, seed=k)
        ase.io.write(directory / f"s{k:02d}.xyz", Atoms(numbers=s.numbers, positions=s.positions))


def command(inputs, out_dir, *extra):
    return [sys.executable, "-m", "molopt.cli", "relax", str(inputs), "-o", str(out_dir)] + [
        "--json",
        "--potential",
        "argon",
        "--fmax",
        "1e-3",
        *extra,
    ]


def records_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_whole(out_dir, stems):
    """Every structure's two outputs exist, belong to one run, and nothing temporary is left."""
    for stem in stems:
        state, params = out.previous_run(out_dir, stem)
        assert state == "complete", (stem, state)
        with h5py.File(out_dir / f"{stem}.h5md") as f:
            assert f["particles/trajectory/position/value"].shape[0] >= 1
    assert not list(out_dir.glob(".*.tmp")), list(out_dir.glob(".*.tmp"))
    assert not list(out_dir.glob(".*.molopt-claim"))


def run_api(inputs, out_dir, **overrides):
    settings = config.build(None, potential="argon", fmax=1e-3, out_dir=str(out_dir), **overrides)
    return relax_files([str(inputs)], settings)


# -- resume needs every output of the same run ------------------------------------------------


def test_a_deleted_or_replaced_output_is_made_again(tmp_path):
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    make_inputs(inputs, 3)
    first = run_api(inputs, out_dir)
    assert [r["status"] for r in first.records] == ["converged"] * 3
    (out_dir / "s00.extxyz").unlink()  # deleted
    shutil.copy(inputs / "s01.xyz", out_dir / "s01.extxyz")  # replaced by another file
    notes = []
    settings = config.build(None, potential="argon", fmax=1e-3, out_dir=str(out_dir))
    second = relax_files([str(inputs)], settings, on_note=notes.append)
    status = {r["input"].rsplit("/", 1)[1]: r["status"] for r in second.records}
    assert status == {"s00.xyz": "converged", "s01.xyz": "converged", "s02.xyz": "skipped"}
    assert any("miss an output" in n for n in notes)
    assert_whole(out_dir, ["s00", "s01", "s02"])
    third = run_api(inputs, out_dir)
    assert [r["status"] for r in third.records] == ["skipped"] * 3


# -- leftovers of dead processes --------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_runs_are_removed_and_only_those(tmp_path):
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    make_inputs(inputs, 2)
    out_dir.mkdir()
    host = atomic.owner_tag().rsplit("-", 1)[0]
    dead = dead_pid()
    dead_files = [
        out_dir / f".molopt-template.{host}-{dead}.tmp",
        out_dir / f".s07.h5md.{host}-{dead}.tmp",
    ]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [
            out_dir / f".s08.h5md.{host}-{live.pid}.tmp",  # a live process's
            out_dir / f".s09.h5md.otherhost-{dead}.tmp",  # another machine's: cannot judge
            out_dir / ".notes.tmp",  # not molopt's
        ]
        # another machine's, of a structure this run relaxes: its claim says no one else writes
        claimed = out_dir / f".s00.extxyz.otherhost-{dead}.tmp"
        for p in dead_files + kept + [claimed]:
            p.write_bytes(b"half")
        result = run_api(inputs, out_dir)
        assert result.exit_code == 0
        assert not any(p.exists() for p in dead_files)
        assert all(p.exists() for p in kept)
        assert not claimed.exists()
    finally:
        live.kill()
        live.wait()


def test_kill_9_leftovers_are_cleaned_by_the_rerun(tmp_path):
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    make_inputs(inputs, 16, size=30)
    proc = subprocess.Popen(
        command(inputs, out_dir, "--batch-size", "1", "--traj-interval", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # kill -9 while a trajectory is being written (its temporary file exists)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list(out_dir.glob(".*.h5md.*.tmp")) and list(out_dir.glob("*.h5md")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(out_dir.glob(".*.tmp")), "the kill came too late to leave anything"
    rerun = subprocess.run(command(inputs, out_dir), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "left by runs that died" in rerun.stderr
    assert_whole(out_dir, [f"s{k:02d}" for k in range(16)])


# -- several processes on one directory ------------------------------------------------------


def test_two_processes_share_one_directory(tmp_path):
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    n = 24
    make_inputs(inputs, n)
    args = command(inputs, out_dir, "--batch-size", "2")
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr
    recs = [records_of(stdout) for stdout, _ in outputs]
    relaxed = [[r["input"] for r in rs if r["status"] != "skipped"] for rs in recs]
    # every structure relaxed exactly once, by one of the two; each process reports all
    every = sorted(str(inputs / f"s{k:02d}.xyz") for k in range(n))
    assert sorted(relaxed[0] + relaxed[1]) == every
    assert [len(rs) for rs in recs] == [n, n], (recs, [e for _, e in outputs])
    assert all(relaxed), "one process did all the work: nothing was shared"
    for rs in recs:
        assert all(r["status"] == "converged" or r["previous_status"] == "converged" for r in rs)
    assert_whole(out_dir, [f"s{k:02d}" for k in range(n)])


def test_a_peer_killed_mid_run_leaves_its_work_to_the_other(tmp_path):
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    n = 16
    make_inputs(inputs, n, size=30)
    first = subprocess.Popen(
        command(inputs, out_dir, "--batch-size", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # the first is frozen while it holds the claim of a structure it has not finished (the
    # owner removes a claim file when done): the second cannot finish the run before the
    # first dies, however fast the first would have been (with its programs in the compile
    # cache it once finished all 16 before the kill, and its run files outlived the second's
    # clean-up of dead processes' leftovers)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list(out_dir.glob(".*.molopt-claim")):
            first.send_signal(signal.SIGSTOP)
            if list(out_dir.glob(".*.molopt-claim")):
                break
            first.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    else:
        pytest.fail("the first process never claimed a structure")
    second = subprocess.Popen(
        command(inputs, out_dir, "--batch-size", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    recs = records_of(stdout)
    assert len(recs) == n and len({r["input"] for r in recs}) == n
    assert_whole(out_dir, [f"s{k:02d}" for k in range(n)])


# -- write errors and a full disk --------------------------------------------------------------


def test_a_write_error_fails_the_structure_and_disk_full_stops_the_run(tmp_path, monkeypatch):
    """A failing writer: EACCES fails one structure alone; ENOSPC stops the run with a record
    for every structure, leaves nothing half-written, and a rerun finishes the rest."""
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    make_inputs(inputs, 8)
    real = out.write_extxyz
    calls = []

    def failing(path, result, info):
        calls.append(path.name)
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, result, info)

    monkeypatch.setattr(out, "write_extxyz", failing)
    first = run_api(inputs, out_dir, batch_size=1)
    recs = first.records
    assert len(recs) == 8 and len({r["input"] for r in recs}) == 8
    failed = [r for r in recs if r["status"] == "failed"]
    assert "Permission denied" in failed[0]["error"]
    assert any("No space left on device" in r["error"] for r in failed[1:])
    assert first.stopped and "No space left on device" in first.stopped
    written = [r for r in recs if r["status"] == "converged"]
    assert len(written) == 3  # calls 1, 3 and 4; the run stopped at the 5th
    assert_whole(out_dir, [r["output"].rsplit("/", 1)[1][:-5] for r in written])
    assert not list(out_dir.glob("*.extxyz"))[3:]  # no orphan extxyz
    assert first.exit_code == 1
    monkeypatch.setattr(out, "write_extxyz", real)
    second = run_api(inputs, out_dir, batch_size=1)
    assert sorted(r["status"] for r in second.records) == ["converged"] * 5 + ["skipped"] * 3
    assert_whole(out_dir, [f"s{k:02d}" for k in range(8)])


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
def test_a_real_full_disk(tmp_path):
    """A 1 MiB filesystem fills up mid-run: no traceback, a record for every structure, only
    whole outputs; after it grows, the same command finishes the rest."""
    inputs, out_dir = tmp_path / "in", tmp_path / "small"
    n = 30
    make_inputs(inputs, n, size=20)
    out_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(out_dir)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = command(inputs, out_dir, "--traj-interval", "1", "--batch-size", "4")
        full = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert full.returncode == 1
        assert "Traceback" not in full.stderr
        assert "No space left on device" in full.stderr
        recs = records_of(full.stdout)
        assert len(recs) == n and len({r["input"] for r in recs}) == n
        done = [r["output"].rsplit("/", 1)[1][:-5] for r in recs if r["status"] == "converged"]
        assert len(done) < n
        assert_whole(out_dir, done)
        assert len(list(out_dir.glob("*.h5md"))) == len(done)
        subprocess.run(["mount", "-o", "remount,size=64m", str(out_dir)], check=True)
        rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert_whole(out_dir, [f"s{k:02d}" for k in range(n)])
    finally:
        subprocess.run(["umount", str(out_dir)])
