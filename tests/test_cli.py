"""The command line, end to end through Typer's CliRunner."""

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from conftest import EXAMPLES, rattled_cluster
from typer.testing import CliRunner

from molopt import config as settings_config
from molopt.cli import app
from molopt.io import h5md
from molopt.potentials import registry
from molopt.run import relax_files

runner = CliRunner()
KEYS = ["input", "index", "output", "status", "energy", "fmax", "steps", "error"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def write_cluster(path, n=13, seed=0):
    s = rattled_cluster(n, seed=seed)
    ase.io.write(path, Atoms(numbers=s.numbers, positions=s.positions))
    return path


def test_relax_one_file(tmp_path):
    src = write_cluster(tmp_path / "ar13.xyz")
    result = invoke("relax", src, "--out-dir", tmp_path / "out", "--json", "--fmax", "0.01")
    assert result.exit_code == 0, result.output
    (rec,) = records(result)
    assert list(rec)[: len(KEYS)] == KEYS
    assert rec["status"] == "converged" and rec["fmax"] < 0.01 and rec["index"] is None
    assert Path(rec["output"]) == tmp_path / "out" / "ar13.h5md"
    relaxed = ase.io.read(tmp_path / "out" / "ar13.extxyz")
    assert relaxed.get_potential_energy() == pytest.approx(rec["energy"])
    assert np.abs(relaxed.get_forces()).max() < 0.01
    assert "using potential 'argon'" in result.stderr


def test_shipped_example_relaxes(tmp_path):
    result = invoke("relax", Path(EXAMPLES) / "ar108-fcc.extxyz", "-o", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    (rec,) = records(result)
    relaxed = ase.io.read(tmp_path / "ar108-fcc.extxyz")
    assert relaxed.get_stress().shape == (6,)  # periodic: stress written


def test_missing_file_and_bad_options_exit_2(tmp_path):
    result = invoke("relax", tmp_path / "nope.xyz")
    assert result.exit_code == 2
    assert "nope.xyz" in result.stderr and "Traceback" not in result.output
    src = write_cluster(tmp_path / "a.xyz")
    assert invoke("relax", src, "--optimizer", "newton").exit_code == 2
    assert invoke("relax", src, "--fmax", "abc").exit_code == 2
    assert invoke("relax", src, "--fmax", "-1").exit_code == 2
    assert invoke("relax", src, "--shard", "3/2").exit_code == 2
    result = invoke("relax", src, "--potential", "unobtainium")
    assert result.exit_code == 2 and "argon" in result.stderr  # lists what is available


def test_no_potential_covers_input(tmp_path):
    ase.io.write(tmp_path / "nacl.xyz", Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]]))
    result = invoke("relax", tmp_path / "nacl.xyz", "-o", tmp_path, "--json")
    assert result.exit_code == 1
    (rec,) = records(result)
    assert rec["status"] == "failed" and "no shipped potential covers Na, Cl" in rec["error"]


def test_each_structure_gets_the_potential_that_covers_it(tmp_path):
    """A directory needing different shipped potentials: each structure its own, said in its
    record and the log; the one nothing covers fails alone."""
    d = tmp_path / "in"
    d.mkdir()
    write_cluster(d / "ar.xyz")
    ase.io.write(d / "water.xyz", molecule("H2O"))
    ase.io.write(d / "cu.xyz", Atoms("Cu2", positions=[[0, 0, 0], [2.3, 0, 0]]))
    ase.io.write(d / "nacl.xyz", Atoms("NaCl", positions=[[0, 0, 0], [2.4, 0, 0]]))
    result = invoke("relax", d, "-o", tmp_path / "out", "--json", "--steps", "3")
    by_file = {Path(r["input"]).name: r for r in records(result)}
    assert by_file["ar.xyz"]["potential"] == "argon"
    assert by_file["water.xyz"]["potential"] == "nn-gfn2-chno"
    assert by_file["cu.xyz"]["potential"] == registry.choose([29]).name
    assert by_file["nacl.xyz"]["status"] == "failed"
    assert all(by_file[n]["status"] != "failed" for n in ("ar.xyz", "water.xyz", "cu.xyz"))
    assert "using potential 'argon' for 1 structure" in result.stderr
    assert "using potential 'nn-gfn2-chno' for 1 structure" in result.stderr
    for name in ("ar", "water", "cu"):
        params = h5md.read_parameters(tmp_path / "out" / f"{name}.h5md")
        assert params["potential_name"] == by_file[f"{name}.xyz"]["potential"]


def test_not_converged_exit_1(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    result = invoke("relax", src, "-o", tmp_path / "o", "--steps", "2", "--fmax", "1e-6", "--json")
    assert result.exit_code == 1
    (rec,) = records(result)
    assert rec["status"] == "not_converged" and rec["steps"] == 2


def test_directory_with_bad_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_cluster(d / "good1.xyz", seed=1)
    write_cluster(d / "good2.xyz", seed=2)
    (d / "empty.xyz").write_text("")
    (d / "nan.xyz").write_text("2\n\nAr 0 0 0\nAr nan 0 0\n")
    (d / "overlap.xyz").write_text("2\n\nAr 0 0 0\nAr 0 0 0.01\n")
    (d / "kr.xyz").write_text("2\n\nKr 0 0 0\nAr 4 0 0\n")
    (d / "notes.txt").write_text("ignored")
    result = invoke("relax", d, "-o", tmp_path / "out", "--json", "--potential", "argon")
    assert result.exit_code == 1
    by_name = {Path(r["input"]).name: r for r in records(result)}
    assert set(by_name) == {
        "good1.xyz",
        "good2.xyz",
        "empty.xyz",
        "nan.xyz",
        "overlap.xyz",
        "kr.xyz",
    }
    assert by_name["good1.xyz"]["status"] == by_name["good2.xyz"]["status"] == "converged"
    reasons = {
        "empty.xyz": "empty",
        "nan.xyz": "non-finite",
        "overlap.xyz": "on top of each",
        "kr.xyz": "Kr not covered",
    }
    for name, reason in reasons.items():
        assert by_name[name]["status"] == "failed"
        assert name in by_name[name]["error"] and reason in by_name[name]["error"]
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert outputs == ["good1.extxyz", "good1.h5md", "good2.extxyz", "good2.h5md"]


def test_rerun_skips_and_changed_settings_refuse(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    out = tmp_path / "o"
    first = invoke("relax", src, "-o", out, "--json", "--fmax", "0.01")
    assert first.exit_code == 0
    again = invoke("relax", src, "-o", out, "--json", "--fmax", "0.01")
    assert again.exit_code == 0
    (rec,) = records(again)
    assert rec["status"] == "skipped" and rec["energy"] == records(first)[0]["energy"]
    changed = invoke("relax", src, "-o", out, "--fmax", "0.001")
    assert changed.exit_code == 2 and "--overwrite" in changed.stderr
    forced = invoke("relax", src, "-o", out, "--fmax", "0.001", "--overwrite", "--json")
    assert forced.exit_code == 0 and records(forced)[0]["fmax"] < 0.001


def test_duplicate_stems_are_an_error_before_work(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_cluster(tmp_path / "x" / "same.xyz")
    write_cluster(tmp_path / "y" / "same.xyz", seed=3)
    result = invoke("relax", tmp_path / "x", tmp_path / "y", "-o", tmp_path / "o")
    assert result.exit_code == 2 and "same.h5md" in result.stderr
    assert not (tmp_path / "o").exists()


def test_multi_frame_outputs(tmp_path):
    images = []
    for seed in range(3):
        s = rattled_cluster(8, seed=seed)
        images.append(Atoms(numbers=s.numbers, positions=s.positions))
    ase.io.write(tmp_path / "many.extxyz", images)
    result = invoke("relax", tmp_path / "many.extxyz", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0
    assert [r["index"] for r in records(result)] == [0, 1, 2] or sorted(
        r["index"] for r in records(result)
    ) == [0, 1, 2]
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    each = [f"many-{k}.{ext}" for k in range(3) for ext in ("extxyz", "h5md")]
    assert names == sorted(each + ["many-all.extxyz"])  # and every frame in one file
    result = invoke(
        "relax", tmp_path / "many.extxyz", "-o", tmp_path / "o2", "--index", "-1", "--json"
    )
    assert [r["index"] for r in records(result)] == [None]
    assert (tmp_path / "o2" / "many.h5md").exists()


def test_config_file_and_flag_precedence(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    config = tmp_path / "c.toml"
    config.write_text('optimizer = "lbfgs"\nfmax = 0.002\nsteps = 3\n')
    result = invoke(
        "relax", src, "-o", tmp_path / "o", "--config", config, "--steps", "500", "--json"
    )
    (rec,) = records(result)
    assert rec["status"] == "converged" and rec["fmax"] < 0.002
    from molopt.io.h5md import read_parameters

    params = read_parameters(tmp_path / "o" / "a.h5md")
    assert params["optimizer"] == "lbfgs" and params["max_steps"] == 500
    # run-wide parameters come from the run's template file, the structure's own from close()
    assert params["status"] == "converged" and params["input"] == str(src)
    assert params["molopt_version"] and params["device"].startswith("cpu")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.extxyz", "a.h5md"]
    bad = tmp_path / "bad.toml"
    bad.write_text("fmaks = 0.1\n")
    result = invoke("relax", src, "--config", bad)
    assert result.exit_code == 2 and "fmaks" in result.stderr


def test_default_preset_matches_built_in_defaults():
    from molopt.config import RunSettings, read_config

    values = read_config("default")
    values.pop("_source")
    assert RunSettings(**values) == RunSettings()


def test_relax_cell_and_pressure(tmp_path):
    atoms = bulk("Ar", "fcc", a=5.0, cubic=True)
    ase.io.write(tmp_path / "ar.extxyz", atoms)
    ase.io.write(tmp_path / "cl.xyz", Atoms("Ar2", positions=[[0, 0, 0], [3.9, 0, 0]]))
    result = invoke(
        "relax",
        tmp_path / "ar.extxyz",
        tmp_path / "cl.xyz",
        "-o",
        tmp_path / "o",
        "--relax-cell",
        "--fmax",
        "1e-4",
        "--json",
    )
    by_name = {Path(r["input"]).name: r for r in records(result)}
    assert by_name["cl.xyz"]["status"] == "failed" and "periodic" in by_name["cl.xyz"]["error"]
    assert by_name["ar.extxyz"]["status"] == "converged"
    relaxed = ase.io.read(tmp_path / "o" / "ar.extxyz")
    # zero-pressure LJ fcc lattice constant with this cutoff: larger than the 5.0 A start
    assert relaxed.cell.lengths()[0] > 5.2
    assert np.abs(relaxed.get_stress()).max() < 1e-5


def test_shards_split_without_overlap(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(5):
        write_cluster(d / f"s{k}.xyz", n=6, seed=k)
    seen = []
    for i in range(2):
        result = invoke("relax", d, "-o", tmp_path / "o", "--shard", f"{i}/2", "--json")
        seen.extend(Path(r["input"]).name for r in records(result))
    assert sorted(seen) == [f"s{k}.xyz" for k in range(5)]


def test_potentials_command():
    result = invoke("potentials")
    assert result.exit_code == 0 and "argon" in result.stdout
    listing = json.loads(invoke("potentials", "--json").stdout)
    names = {p["name"] for p in listing}
    assert {"argon", "lj-reduced", "noble-gases"} <= names


def test_help_and_version():
    assert invoke("--help").exit_code == 0
    assert "molopt" in invoke("--version").stdout


@pytest.mark.parametrize("command", ["train", "fit"])
def test_unreadable_or_unknown_config_is_a_clear_error(tmp_path, command):
    """train and fit configs: binary junk and a misspelt key both exit 2 naming the file."""
    junk = tmp_path / "junk.toml"
    junk.write_bytes(b"\xff\xfe\x00bad")
    typo = tmp_path / "typo.toml"
    typo.write_text('potential = "argon"\nlearning_rat = 0.1\n[[targets]]\nkind = "data"\n')
    data = tmp_path / "d.extxyz"
    for config in (junk, typo):
        args = ["train", str(data), "-c", str(config), "-o", str(tmp_path / "o")]
        if command == "fit":
            args = ["fit", str(config), "-o", str(tmp_path / "f.toml")]
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert str(config) in result.stderr and "Traceback" not in result.output
    assert "learning_rat" in result.stderr


def test_unusable_output_directory_is_a_clear_error(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    blocker = tmp_path / "taken"
    blocker.write_text("a file where the output directory should be\n")
    for out in (blocker, blocker / "sub"):
        result = invoke("relax", src, "-o", out, "-q")
        assert result.exit_code == 2
        assert str(out) in result.stderr and "output directory" in result.stderr
        assert "Traceback" not in result.stderr


_FAKE_ARRAY_LIBRARY = """
import os
from pathlib import Path
Path(os.environ["MARKS"], __name__).write_text("imported")
uint64 = int32 = float64 = bool_ = object()
class ndarray: pass
class Tensor: pass
"""


def test_the_program_imports_vesin_without_torch_or_cupy(tmp_path):
    """vesin imports PyTorch and CuPy when installed (2-3 s on a GPU machine): the molopt
    program refuses them to it, a library user's process imports vesin as usual, and
    PyTorch stays importable after the refusal."""
    import os
    import subprocess
    import sys

    import molopt

    fake, marks = tmp_path / "fake", tmp_path / "marks"
    for name in ("torch", "cupy"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(_FAKE_ARRAY_LIBRARY)
    root = Path(molopt.__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{root}", MARKS=str(marks))

    def child(args, out_name):
        marks.mkdir()
        proc = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = sorted(p.name for p in marks.iterdir())
        marks.rename(tmp_path / out_name)
        return proc.stdout, imported

    # the program: a periodic crystal (its neighbour list comes from vesin)
    stdout, imported = child(
        [
            "-m",
            "molopt.cli",
            "relax",
            str(Path(EXAMPLES) / "ar108-fcc.extxyz"),
            "-p",
            "argon",
            "-o",
            str(tmp_path / "out"),
            "-q",
            "--json",
        ],
        "program",
    )
    assert json.loads(stdout.splitlines()[-1])["status"] == "converged"
    assert imported == []
    # after the refusal, the process can still import PyTorch itself
    code = (
        "import sys; from molopt import _vesin; _vesin.standalone(); v = _vesin.vesin();"
        "assert not v._neighbors.HAS_TORCH and 'torch' not in sys.modules;"
        "import torch; print(torch.Tensor.__name__)"
    )
    stdout, imported = child(["-c", code], "after")
    assert stdout.strip() == "Tensor" and imported == ["torch"]
    # a library user's process: vesin gets both, as it would without molopt
    code = "from molopt import _vesin; v = _vesin.vesin(); print(v._neighbors.HAS_TORCH)"
    stdout, imported = child(["-c", code], "library")
    assert stdout.strip() == "True" and imported == ["cupy", "torch"]


def ase_argon():
    from ase.calculators.lj import LennardJones as AseLJ

    return AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5, smooth=False)


def test_pressure_flag_is_in_gpa(tmp_path):
    """``--pressure`` is GPa: the relaxed cell is ASE's FrechetCellFilter minimum under the same
    pressure in eV/A^3, and the stress written balances it (fails without the conversion)."""
    from ase.filters import FrechetCellFilter
    from ase.optimize import LBFGS

    from molopt.config import GPA
    from molopt.io.h5md import read_parameters

    atoms = bulk("Ar", "fcc", a=5.2, cubic=True)
    atoms.rattle(0.02, seed=4)
    ase.io.write(tmp_path / "ar.extxyz", atoms)
    result = invoke(
        "relax",
        tmp_path / "ar.extxyz",
        "-o",
        tmp_path / "o",
        "--relax-cell",
        "--pressure",
        "0.5",
        "--optimizer",
        "lbfgs",
        "--fmax",
        "1e-5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    relaxed = ase.io.read(tmp_path / "o" / "ar.extxyz")
    p = 0.5 * GPA
    np.testing.assert_allclose(relaxed.get_stress(), [-p, -p, -p, 0, 0, 0], atol=1e-6)
    reference = atoms.copy()
    reference.calc = ase_argon()
    LBFGS(FrechetCellFilter(reference, scalar_pressure=p), logfile=None).run(fmax=1e-5)
    np.testing.assert_allclose(relaxed.cell.array, reference.cell.array, atol=1e-4)
    assert relaxed.get_volume() < 5.2**3 * 0.99  # compressed, not the zero-pressure cell
    assert read_parameters(tmp_path / "o" / "ar.h5md")["pressure_GPa"] == 0.5


def test_shards_are_the_files_at_i_mod_n(tmp_path):
    """``--shard I/N`` relaxes the sorted files at positions I, I+N, ...: each shard exactly
    its part, none empty, none overlapping (fails if every file goes to one shard)."""
    d = tmp_path / "in"
    d.mkdir()
    for k in range(7):
        write_cluster(d / f"s{k}.xyz", n=6, seed=k)
    names = [f"s{k}.xyz" for k in range(7)]
    for n in (2, 3):
        for i in range(n):
            out = tmp_path / f"o{i}of{n}"
            result = invoke("relax", d, "-o", out, "--shard", f"{i}/{n}", "--json")
            assert result.exit_code == 0, result.output
            got = sorted(Path(r["input"]).name for r in records(result))
            assert got == names[i::n]
            assert sorted(p.name for p in out.glob("*.h5md")) == [
                x.replace(".xyz", ".h5md") for x in names[i::n]
            ]


def test_recursive_mirrors_the_input_tree(tmp_path):
    """``--recursive`` finds structures in subfolders and writes each one's outputs in the same
    relative folder under --out-dir, so a/POSCAR and b/POSCAR do not collide; without it only
    the top folder is searched."""
    d = tmp_path / "in"
    (d / "a").mkdir(parents=True)
    (d / "b" / "deep").mkdir(parents=True)
    write_cluster(d / "top.xyz", n=6, seed=1)
    for k, sub in enumerate(("a", "b", "b/deep")):
        s = rattled_cluster(5 + k, seed=10 + k)
        ase.io.write(
            d / sub / "POSCAR",
            Atoms(numbers=s.numbers, positions=s.positions, cell=[20, 20, 20], pbc=True),
            format="vasp",
        )
    flat = invoke("relax", d, "-o", tmp_path / "flat", "--json", "-p", "argon")
    assert [Path(r["input"]).name for r in records(flat)] == ["top.xyz"]
    deep = invoke("relax", d, "-o", tmp_path / "o", "--json", "-p", "argon", "--recursive")
    assert deep.exit_code == 0, deep.output
    by_input = {Path(r["input"]).relative_to(d).as_posix(): r for r in records(deep)}
    assert set(by_input) == {"top.xyz", "a/POSCAR", "b/POSCAR", "b/deep/POSCAR"}
    for rel, rec in by_input.items():
        stem = rel.removesuffix(".xyz")
        assert Path(rec["output"]) == tmp_path / "o" / f"{stem}.h5md"
        relaxed = ase.io.read(tmp_path / "o" / f"{stem}.extxyz", format="extxyz")
        n_atoms = len(ase.io.read(d / rel))
        assert len(relaxed) == n_atoms and relaxed.get_potential_energy() == rec["energy"]
    again = invoke("relax", d, "-o", tmp_path / "o", "--json", "-p", "argon", "--recursive")
    assert {r["status"] for r in records(again)} == {"skipped"}


def test_traj_interval_samples_every_nth_step(tmp_path):
    """``--traj-interval N`` keeps steps 0, N, 2N, ... and the last; 0 keeps the first and the
    last; the kept frames are those of the full trajectory."""
    from molopt.api import read_trajectory

    src = write_cluster(tmp_path / "a.xyz", n=13, seed=5)
    full = {}
    for interval in (1, 5, 0):
        out = tmp_path / f"o{interval}"
        result = invoke(
            "relax", src, "-o", out, "--fmax", "1e-3", "--traj-interval", interval, "--json"
        )
        assert result.exit_code == 0, result.output
        (rec,) = records(result)
        data = read_trajectory(out / "a.h5md", as_atoms=False)
        last = rec["steps"]
        assert last > 20
        if interval == 1:
            expected = list(range(last + 1))
            full = {int(s): e for s, e in zip(data["step"], data["energy"], strict=True)}
        elif interval == 0:
            expected = [0, last]
        else:
            expected = sorted(set(range(0, last + 1, interval)) | {last})
        assert data["step"].tolist() == expected
        assert data["energy"].tolist() == [full[s] for s in expected]
        assert data["parameters"]["trajectory_interval"] == interval


def test_maxstep_flag_is_ases_maxstep(tmp_path):
    """``--maxstep`` reaches the optimizer: FIRE with maxstep 0.05 takes ASE's FIRE(maxstep=
    0.05) steps exactly, which differ from the default's."""
    from ase.optimize import FIRE

    src = write_cluster(tmp_path / "a.xyz", n=13, seed=6)
    steps = {}
    for maxstep in (0.05, 0.2):
        atoms = ase.io.read(src)
        atoms.calc = ase_argon()
        opt = FIRE(atoms, maxstep=maxstep, logfile=None)
        opt.run(fmax=1e-3, steps=5000)
        out = tmp_path / f"o{maxstep}"
        result = invoke("relax", src, "-o", out, "--fmax", "1e-3", "--maxstep", maxstep, "--json")
        (rec,) = records(result)
        assert rec["status"] == "converged"
        assert rec["steps"] == opt.nsteps
        assert rec["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        steps[maxstep] = rec["steps"]
    assert steps[0.05] != steps[0.2]


def test_max_batch_atoms_bounds_each_batch(tmp_path, monkeypatch):
    """``--max-batch-atoms`` and ``--batch-size`` bound every compiled batch; a structure bigger
    than the bound runs alone; results equal those of one big batch."""
    from molopt import engine

    launched = []
    original = engine.Engine._launch

    def spy(self, items, *args, **kwargs):
        launched.append([it.structure.n_atoms for it in items])
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(engine.Engine, "_launch", spy)
    d = tmp_path / "in"
    d.mkdir()
    for k, n in enumerate((13, 13, 13, 13, 40, 13)):
        write_cluster(d / f"c{k}.xyz", n=n, seed=k)
    together = invoke("relax", d, "-o", tmp_path / "big", "--fmax", "1e-3", "--json")
    assert max(sum(b) for b in launched) == 105
    launched.clear()
    bounded = invoke(
        "relax",
        d,
        "-o",
        tmp_path / "small",
        "--fmax",
        "1e-3",
        "--json",
        "--max-batch-atoms",
        "30",
    )
    assert bounded.exit_code == 0, bounded.output
    assert [40] in launched and all(sum(b) <= 30 for b in launched if b != [40])
    assert {len(b) for b in launched} == {1, 2}
    launched.clear()
    counted = invoke("relax", d, "-o", tmp_path / "two", "--fmax", "1e-3", "--batch-size", "2")
    assert counted.exit_code == 0 and max(len(b) for b in launched) == 2
    first = {Path(r["input"]).name: r for r in records(together)}
    for r in records(bounded):
        assert r["steps"] == first[Path(r["input"]).name]["steps"]
        assert r["energy"] == pytest.approx(first[Path(r["input"]).name]["energy"], abs=1e-10)


def test_skin_flag_reaches_the_neighbour_lists(tmp_path, monkeypatch):
    """``--skin`` is the Verlet skin of the lists the engine builds (and a config's value
    unless a flag overrides it)."""
    from molopt import neighbors

    skins = []
    original = neighbors.build

    def spy(*args, **kwargs):
        skins.append(args[5] if len(args) > 5 else kwargs["skin"])
        return original(*args, **kwargs)

    monkeypatch.setattr(neighbors, "build", spy)
    src = tmp_path / "ar.extxyz"
    ase.io.write(src, bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2))
    assert invoke("relax", src, "-o", tmp_path / "o1", "--skin", "0.3").exit_code == 0
    assert skins and set(skins) == {0.3}
    skins.clear()
    config = tmp_path / "c.toml"
    config.write_text("skin = 0.6\n")
    assert invoke("relax", src, "-o", tmp_path / "o2", "-c", config).exit_code == 0
    assert set(skins) == {0.6}
    skins.clear()
    assert invoke("relax", src, "-o", tmp_path / "o3", "-c", config, "--skin", "0.2").exit_code == 0
    assert set(skins) == {0.2}


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("tight", dict(optimizer="lbfgs", fmax=1e-3, steps=20000, precision="float64")),
        ("cell", dict(optimizer="fire", fmax=0.01, relax_cell=True)),
        (
            "screening",
            dict(optimizer="fire2", fmax=0.05, precision="float32", trajectory_interval=0),
        ),
    ],
)
def test_presets_set_what_they_say(tmp_path, preset, expected):
    """Each shipped preset's settings reach the run (recorded in /parameters) and act."""
    from molopt.api import read_trajectory

    atoms = bulk("Ar", "fcc", a=5.1, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=2)
    ase.io.write(tmp_path / "ar.extxyz", atoms)
    result = invoke("relax", tmp_path / "ar.extxyz", "-o", tmp_path / "o", "-c", preset, "--json")
    assert result.exit_code == 0, result.output
    (rec,) = records(result)
    assert rec["status"] == "converged" and rec["fmax"] < expected["fmax"]
    data = read_trajectory(tmp_path / "o" / "ar.h5md", as_atoms=False)
    settings = data["parameters"]["settings"]
    for key, value in expected.items():
        assert settings[key] == value, key
    if preset == "cell":
        assert np.abs(data["cell"][-1] - data["cell"][0]).max() > 0.05  # the cell moved
        assert "stress" in data
    if preset == "screening":
        assert len(data["step"]) == 2 and data["parameters"]["precision"] == "float32"


def test_help_does_not_import_jax():
    """``molopt --help`` and ``molopt relax --help`` stay instant: no JAX, no ASE io."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom molopt.cli import app\n"
        "for args in (['--help'], ['relax', '--help'], ['train', '--help']):\n"
        "    try:\n        app(args)\n    except SystemExit as e:\n        assert e.code == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'ase')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--fmax" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_progress_counts_structures_as_they_finish_and_the_summary_names_the_slowest(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(24):
        write_cluster(d / f"c{k:02d}.xyz", n=8 + k % 6, seed=k)
    calls = []
    settings = settings_config.build(
        None, potential="argon", out_dir=str(tmp_path / "o"), batch_size=4
    )
    relax_files([str(d)], settings, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 24) and calls[-1] == (24, 24)
    assert [c[0] for c in calls] == list(range(25))  # one step per finished structure
    result = invoke("relax", d, "-o", tmp_path / "o2", "--potential", "argon")
    assert "relaxed 24 structures" in result.stderr and "structures/s" in result.stderr
    assert "slowest:" in result.stderr
    slow = result.stderr.split("slowest:", 1)[1].strip().splitlines()
    assert len(slow) == 5 and all(line.strip().startswith("converged") for line in slow)
    seconds = [float(line.rsplit(" s", 1)[0].rsplit(None, 1)[1]) for line in slow]
    assert seconds == sorted(seconds, reverse=True)
