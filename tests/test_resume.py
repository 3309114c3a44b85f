"""Interruption and resumption of a real `molopt relax` process; the compilation cache."""

import json
import os
import signal
import subprocess
import sys
import time

import ase.io
import h5py
import pytest
from ase import Atoms
from conftest import rattled_cluster

N_FILES = 24


def make_inputs(directory):
    directory.mkdir()
    for k in range(N_FILES):
        s = rattled_cluster(8 + k % 5, seed=k)
        ase.io.write(directory / f"s{k:02d}.xyz", Atoms(numbers=s.numbers, positions=s.positions))


def command(inputs, out, *extra):
    return [
        sys.executable,
        "-m",
        "molopt.cli",
        "relax",
        str(inputs),
        "-o",
        str(out),
        "--json",
        "--potential",
        "argon",
        "--fmax",
        "1e-3",
        *extra,
    ]


def complete_outputs(out):
    done = []
    for path in sorted(out.glob("*.h5md")):
        with h5py.File(path) as f:
            assert f["parameters"].attrs["status"] in ("converged", "not_converged")
        assert path.with_suffix(".extxyz").exists()
        done.append(path.stem)
    return done


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume(tmp_path, sig):
    inputs, out = tmp_path / "in", tmp_path / "out"
    make_inputs(inputs)
    proc = subprocess.Popen(
        command(inputs, out, "--batch-size", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.h5md"))) < 3:
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "rerun" in stderr
    finished = complete_outputs(out)
    assert 3 <= len(finished) < N_FILES
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
    first = [json.loads(line) for line in stdout.splitlines()]
    assert {r["status"] for r in first} == {"converged"}

    rerun = subprocess.run(command(inputs, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    records = [json.loads(line) for line in rerun.stdout.splitlines()]
    skipped = sorted(
        os.path.basename(r["output"])[:-5] for r in records if r["status"] == "skipped"
    )
    assert skipped == finished
    assert len(records) == N_FILES
    assert len(complete_outputs(out)) == N_FILES


def test_second_run_compiles_nothing(tmp_path):
    inputs, cache = tmp_path / "in", tmp_path / "cache"
    make_inputs(inputs)
    env = dict(os.environ, MOLOPT_CACHE_DIR=str(cache))
    first = subprocess.run(command(inputs, tmp_path / "a"), capture_output=True, env=env)
    assert first.returncode == 0
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries
    second = subprocess.run(command(inputs, tmp_path / "b"), capture_output=True, env=env)
    assert second.returncode == 0
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries


def test_signal_is_acted_on_at_a_safe_point():
    """The handler only records the signal (raising inside JAX's gc callback was swallowed
    and the interrupt lost); check() raises; a second signal raises at once."""
    from molopt import interrupt

    before = signal.getsignal(signal.SIGINT)
    with interrupt.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert interrupt.requested()  # recorded, nothing raised yet
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before and not interrupt.requested()
    interrupt.check()  # outside: nothing pending


def test_exit_codes_and_complete_output_of_the_process(tmp_path):
    """The console entry point ends the process without the interpreter's teardown once JAX
    has run: the exit code, every JSON record and every output file must still be there
    (code 1 here; 130 in the interrupt test above). A usage error (code 2) stops before
    JAX is imported and exits as usual."""
    inputs = tmp_path / "in"
    make_inputs(inputs)
    ran = subprocess.run(command(inputs, tmp_path / "a", "--steps", "3"), capture_output=True)
    assert ran.returncode == 1, ran.stderr  # not converged in 3 steps
    records = [json.loads(line) for line in ran.stdout.decode().splitlines()]
    assert len(records) == N_FILES and {r["status"] for r in records} == {"not_converged"}
    assert len(complete_outputs(tmp_path / "a")) == N_FILES
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]
    missing = subprocess.run(command(tmp_path / "nothing", tmp_path / "b"), capture_output=True)
    assert missing.returncode == 2 and b"no such file" in missing.stderr


def test_a_structure_without_its_trajectory_is_relaxed_again(tmp_path):
    """The trajectory is renamed into place last, so an extxyz without it is the output of an
    interrupted write: a rerun relaxes that structure again (same result) and skips the
    complete ones."""
    from typer.testing import CliRunner

    from molopt.cli import app

    runner = CliRunner()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):
        s = rattled_cluster(9, seed=k)
        ase.io.write(inputs / f"c{k}.xyz", Atoms(numbers=s.numbers, positions=s.positions))
    out = tmp_path / "out"
    args = ["relax", str(inputs), "-o", str(out), "--json", "-p", "argon", "--fmax", "1e-3"]
    first = {
        json.loads(x)["input"]: json.loads(x)
        for x in runner.invoke(app, args).stdout.split("\n")
        if x.startswith("{")
    }
    (out / "c0.h5md").unlink()  # as if the run died between the extxyz and the trajectory
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    records = {
        json.loads(x)["input"]: json.loads(x)
        for x in again.stdout.splitlines()
        if x.startswith("{")
    }
    c0, c1 = str(inputs / "c0.xyz"), str(inputs / "c1.xyz")
    assert records[c0]["status"] == "converged" and records[c1]["status"] == "skipped"
    assert (
        records[c0]["energy"] == first[c0]["energy"] and records[c0]["steps"] == first[c0]["steps"]
    )
    assert (out / "c0.h5md").exists()
