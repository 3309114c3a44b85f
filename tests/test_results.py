"""Reading results: info, convert, plot, the Python API, the ASE calculator, README examples."""

import json
import re
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.cluster import Icosahedron
from ase.optimize import BFGS, LBFGS
from typer.testing import CliRunner

import molopt
from molopt.ase import MoloptCalculator
from molopt.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Real outputs of `molopt relax` on the shipped examples (plus a cell relaxation)."""
    work = tmp_path_factory.mktemp("results")
    examples = ROOT / "data" / "examples"
    out = work / "results"  # the README examples read results/ar108-fcc.h5md
    r = runner.invoke(
        app,
        [
            "relax",
            str(examples / "ar108-fcc.extxyz"),
            str(examples / "ar55-cluster.xyz"),
            "-o",
            str(out),
            "--fmax",
            "1e-3",
        ],
    )
    assert r.exit_code == 0, r.output
    crystal = bulk("Ar", "fcc", a=5.0, cubic=True)
    ase.io.write(work / "cell.extxyz", crystal)
    r = runner.invoke(
        app,
        [
            "relax",
            str(work / "cell.extxyz"),
            "-o",
            str(work / "cellout"),
            "--relax-cell",
            "--fmax",
            "1e-4",
        ],
    )
    assert r.exit_code == 0, r.output
    return work


def test_info_table_and_json(results):
    r = runner.invoke(app, ["info", str(results / "results"), "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["counts"] == {"converged": 2}
    by_name = {Path(t["file"]).name: t for t in data["trajectories"]}
    ar108 = by_name["ar108-fcc.h5md"]
    assert ar108["formula"] == "Ar108" and ar108["n_atoms"] == 108
    assert ar108["n_frames"] == ar108["steps"] + 1 and ar108["potential"] == "argon"
    assert ar108["final_fmax"] < 1e-3 and ar108["final_energy"] < ar108["initial_energy"]
    table = runner.invoke(app, ["info", str(results / "results" / "ar55-cluster.h5md")])
    assert table.exit_code == 0 and "Ar55" in table.stdout
    assert runner.invoke(app, ["info", str(results / "nothing-here")]).exit_code == 2


@pytest.mark.parametrize(
    "name,frames,count",
    [
        ("all.extxyz", ":", None),
        ("last.cif", "-1", 1),
        ("every5.traj", "::5", "five"),
        ("POSCAR", "-1", 1),
        ("last.xyz", "-1", 1),
    ],
)
def test_convert(results, name, frames, count):
    traj = results / "results" / "ar108-fcc.h5md"
    data = molopt.read_trajectory(traj, as_atoms=False)
    out = results / name
    fmt = ["--format", "vasp"] if name == "POSCAR" else []
    r = runner.invoke(app, ["convert", str(traj), str(out), "--frames", frames, *fmt])
    assert r.exit_code == 0, r.output
    images = ase.io.read(out, ":", format="vasp" if name == "POSCAR" else None)
    n = len(data["step"])
    expected = {None: n, 1: 1, "five": len(range(0, n, 5))}[count]
    assert len(images) == expected
    frame = -1 if count != "five" else (n - 1) // 5 * 5
    # compare modulo the cell: CIF wraps atoms into it
    delta = np.linalg.solve(
        images[-1].cell.array.T, (images[-1].positions - data["positions"][frame]).T
    ).T
    assert np.abs(delta - np.round(delta)).max() < 1e-5
    if name.endswith(("extxyz", "traj")):
        assert images[-1].get_potential_energy() == pytest.approx(
            data["energy"][-1 if count != "five" else (n - 1) // 5 * 5]
        )
        assert images[0].get_forces().shape == (108, 3)


def test_convert_errors(results):
    traj = results / "results" / "ar108-fcc.h5md"
    assert (
        runner.invoke(
            app, ["convert", str(traj), str(results / "x.xyz"), "--frames", "9999"]
        ).exit_code
        == 2
    )
    assert (
        runner.invoke(
            app, ["convert", str(results / "missing.h5md"), str(results / "x.xyz")]
        ).exit_code
        == 2
    )


def test_plot_writes_an_image(results):
    out = results / "plot.png"
    r = runner.invoke(
        app, ["plot", str(results / "results"), str(results / "cellout"), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    from PIL import Image

    with Image.open(out) as image:
        width, height = image.size
        assert width > 800 and height > 800
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # lines, not a blank canvas


def test_read_trajectory_api(results):
    traj = results / "cellout" / "cell.h5md"
    frames = molopt.read_trajectory(traj)
    arrays = molopt.read_trajectory(traj, as_atoms=False)
    assert len(frames) == len(arrays["step"])
    last = frames[-1]
    np.testing.assert_allclose(last.cell.array, arrays["cell"][-1])
    assert last.get_potential_energy() == pytest.approx(arrays["energy"][-1])
    assert np.abs(last.get_stress()).max() < 1e-4
    assert molopt.read_trajectory(traj, frames=-1)[0].info["step"] == arrays["step"][-1]


def test_relax_api_matches_ase_optimizer():
    atoms = Icosahedron("Ar", 2, latticeconstant=5.26)
    atoms.rattle(0.1, seed=1)
    original = atoms.positions.copy()
    relaxed = molopt.relax(atoms, potential="argon", optimizer="lbfgs", fmax=1e-5)
    assert np.array_equal(atoms.positions, original)  # input untouched
    assert relaxed.info["molopt_status"] == "converged"
    reference = atoms.copy()
    reference.calc = MoloptCalculator("argon")
    opt = LBFGS(reference, logfile=None)
    opt.run(fmax=1e-5)
    assert relaxed.get_potential_energy() == pytest.approx(
        reference.get_potential_energy(), abs=1e-8
    )
    assert relaxed.info["molopt_steps"] == opt.nsteps
    many = molopt.relax([atoms, atoms.copy()], potential=molopt.load_potential("argon"))
    assert len(many) == 2 and all(a.info["molopt_status"] == "converged" for a in many)


def test_ase_calculator_relaxes_to_the_cli_minimum(tmp_path):
    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    crystal.rattle(0.15, seed=7)
    ase.io.write(tmp_path / "c.extxyz", crystal)
    r = runner.invoke(
        app,
        [
            "relax",
            str(tmp_path / "c.extxyz"),
            "-o",
            str(tmp_path),
            "--fmax",
            "1e-5",
            "--optimizer",
            "lbfgs",
            "--json",
        ],
    )
    assert r.exit_code == 2 and "would overwrite the input" in r.stderr
    r = runner.invoke(
        app,
        [
            "relax",
            str(tmp_path / "c.extxyz"),
            "-o",
            str(tmp_path / "o"),
            "--fmax",
            "1e-5",
            "--optimizer",
            "lbfgs",
            "--json",
        ],
    )
    cli_energy = json.loads(r.stdout.splitlines()[0])["energy"]
    crystal.calc = MoloptCalculator("argon")
    assert crystal.get_stress().shape == (6,)
    BFGS(crystal, logfile=None).run(fmax=1e-5)
    assert crystal.get_potential_energy() == pytest.approx(cli_energy, abs=1e-8)


def readme_examples():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(# example: [^\n]+\n.*?)```", text, re.S)


@pytest.mark.parametrize("code", readme_examples(), ids=lambda c: c.splitlines()[0][11:])
def test_readme_examples_run(results, code):
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=results, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
