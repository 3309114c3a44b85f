"""The process-start tricks of molopt.startup that no other test file pins: each test fails
when its trick is removed (the others: see the module docstring of molopt.startup)."""

import os
import subprocess
import sys
import threading
import time
import types
from importlib.metadata import version
from pathlib import Path

import ase.io
import pytest
from ase import Atoms
from conftest import rattled_cluster

import molopt
from molopt import startup

ROOT = Path(molopt.__file__).resolve().parents[1]


def run_python(code: str, *args: str, **env: str | None) -> subprocess.CompletedProcess:
    """``python -c code args`` with this tree's molopt first on the path."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    for name, value in env.items():
        if value is None:
            environment.pop(name)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def test_xla_flags_follow_the_jaxlib_release():
    """YNNPACK fusions are turned off for jaxlib releases known to have the flag, without
    losing the user's other flags or overriding a fusion type they chose; releases not known
    to have it get nothing (the flag would abort them); importing molopt._jax in a fresh
    process sets it before JAX's backend starts."""
    assert startup.xla_flags("0.10.2", "") == startup.YNN_OFF
    assert startup.xla_flags("0.10.0", "--xla_a=1") == f"--xla_a=1 {startup.YNN_OFF}"
    chosen = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    assert startup.xla_flags("0.10.2", chosen) == chosen
    for release in ("0.4.30", "0.9.0", "0.1.0", None):
        assert startup.xla_flags(release, "--xla_a=1") == "--xla_a=1"
    proc = run_python(
        "import os, molopt._jax; print(repr(os.environ.get('XLA_FLAGS', '')))", XLA_FLAGS=None
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = startup.xla_flags(version("jaxlib"), "")
    assert proc.stdout.strip() == repr(expected)
    if version("jaxlib").startswith(startup.YNN_RELEASES):
        assert expected == startup.YNN_OFF


def test_an_unknown_xla_flag_aborts_jax():
    """Why the flag above is set only for known releases: XLA refuses to start (the process
    dies) with a flag its release does not know."""
    proc = run_python(
        "import jax; print(jax.numpy.zeros(1))", XLA_FLAGS="--xla_molopt_no_such_flag"
    )
    assert proc.returncode != 0
    assert "xla_molopt_no_such_flag" in proc.stderr


def test_relax_drops_compiled_code_at_the_mapping_cap(monkeypatch):
    """Every relaxation first checks the process's memory mappings: at the cap (simulated)
    JAX's compiled code is dropped before anything is compiled, and the relaxation still
    converges (its programs compiled again)."""
    import jax

    if startup._map_limit() is None:
        pytest.skip("no /proc/sys/vm/max_map_count on this system")
    cleared = []
    clear_caches = jax.clear_caches

    def spy():
        cleared.append(True)
        clear_caches()

    monkeypatch.setattr(jax, "clear_caches", spy)
    monkeypatch.setattr(startup, "_map_limit", lambda: 10)  # as if at the cap
    s = rattled_cluster(8, seed=3)
    relaxed = molopt.relax(Atoms(numbers=s.numbers, positions=s.positions), "argon", fmax=1e-2)
    assert cleared
    assert relaxed.info["molopt_status"] == "converged"


_PROGRAM = """
import atexit
import sys

atexit.register(lambda: sys.stderr.write("interpreter teardown ran\\n"))
sys.stdout.write("still in Python's buffer\\n")  # (a pipe: block-buffered, not yet written)
sys.argv[0] = "molopt"
from molopt.cli import main

main()
"""


def test_the_program_skips_teardown_once_jax_has_run(tmp_path):
    """The console entry point ends a command that computed without the interpreter's
    teardown (no exit handler runs), its outputs complete and what the process wrote still
    in Python's buffers flushed; a usage error, before JAX is imported, exits as usual."""
    s = rattled_cluster(8, seed=1)
    ase.io.write(tmp_path / "a.xyz", Atoms(numbers=s.numbers, positions=s.positions))
    relax = ["relax", str(tmp_path / "a.xyz"), "-o", str(tmp_path / "o"), "-q"]
    ran = run_python(_PROGRAM, *relax, PYTHONUNBUFFERED=None)
    assert ran.returncode == 0, ran.stderr[-3000:]  # 0: converged
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.extxyz", "a.h5md"]
    assert ase.io.read(tmp_path / "o" / "a.extxyz").info["molopt_status"] == "converged"
    assert ran.stdout == "still in Python's buffer\n"
    assert "interpreter teardown ran" not in ran.stderr
    usage = run_python(_PROGRAM, "relax", str(tmp_path / "missing.xyz"))
    assert usage.returncode == 2 and "missing.xyz" in usage.stderr
    assert "interpreter teardown ran" in usage.stderr


def test_build_on_first_use_makes_one_object_for_all_threads(monkeypatch):
    """A name built on first use is built once, whichever threads ask at the same time, and
    is then a plain module attribute; other names are still missing."""
    module = types.ModuleType("molopt_test_lazy")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    built = []

    def build():
        built.append(True)
        time.sleep(0.05)  # a slow build: the other threads arrive while it runs
        return object()

    module.__getattr__ = startup.build_on_first_use(module.__name__, Thing=build)
    barrier, seen = threading.Barrier(8), []

    def ask():
        barrier.wait()
        seen.append(module.Thing)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(seen) == 8 and len({id(x) for x in seen}) == 1
    assert module.__dict__["Thing"] is seen[0]
    with pytest.raises(AttributeError, match="Other"):
        module.Other  # noqa: B018


def test_the_slow_ml_dtypes_release_is_not_installed():
    """pyproject excludes ml_dtypes 0.7.0 (whose import alone costs every molopt process
    0.5-1.2 s on these machines); a fresh install resolves another."""
    assert version("ml_dtypes") != "0.7.0"


def test_a_relaxation_does_not_import_pydantic(tmp_path):
    """typer 0.29 coerces every command-line option through pydantic, whose import and
    adapters took ~0.15 s of each `molopt relax`; pyproject keeps typer below it. Whatever
    typer a fresh install resolves, a relaxation must not pay for pydantic."""
    ase.io.write(tmp_path / "a.xyz", Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]]))
    program = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from molopt.cli import app\n"
        f"args = ['relax', {str(tmp_path / 'a.xyz')!r}, '-o', {str(tmp_path / 'o')!r}, '-q']\n"
        "result = CliRunner().invoke(app, args)\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydantic'))\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "[]"
