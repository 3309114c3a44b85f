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


def test_plot_and_hessian_outputs_are_renamed_into_place_whole(results, tmp_path, monkeypatch):
    """The image is written under a temporary name in the format of the final name's
    extension, then renamed; a write that fails leaves the earlier file as it was and no
    temporary file behind."""
    import matplotlib.figure

    traj = str(results / "results" / "ar55-cluster.h5md")
    for name, magic in (("p.svg", b"<?xml"), ("p.pdf", b"%PDF")):
        r = runner.invoke(app, ["plot", traj, "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / name).read_bytes().startswith(magic)
    hessian = tmp_path / "h.json"
    relaxed = str(results / "results" / "ar55-cluster.extxyz")
    r = runner.invoke(app, ["hessian", relaxed, "-p", "argon", "-o", str(hessian)])
    assert r.exit_code == 0, r.output
    assert len(json.loads(hessian.read_text())["frequencies_cm1"]) == 3 * 55
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "p.pdf", "p.svg"]

    def half_then_die(fig, path, *args, **kwargs):
        Path(path).write_bytes(b"<?xml half")
        raise OSError("disk full")

    before = (tmp_path / "p.svg").read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_die)
    r = runner.invoke(app, ["plot", traj, "-o", str(tmp_path / "p.svg"), "--force"])
    assert r.exit_code == 2 and "cannot write" in r.output and "disk full" in r.output
    assert (tmp_path / "p.svg").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.json", "p.pdf", "p.svg"]


def test_plot_draws_each_trajectorys_energy_and_fmax(results, monkeypatch):
    """The figure holds, per trajectory, E - E(final) and fmax (log scale) against the step,
    read here with h5py alone, and the fmax target as a line (fails when a curve is not drawn
    or is drawn from the wrong data)."""
    import h5py
    import matplotlib.figure

    saved = []

    def keep(fig, path, *args, **kwargs):
        saved.append(fig)
        Path(path).write_bytes(b"")  # renamed into place

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    files = [results / "results" / "ar108-fcc.h5md", results / "results" / "ar55-cluster.h5md"]
    r = runner.invoke(app, ["plot", *map(str, files), "-o", str(results / "p.png")])
    assert r.exit_code == 0, r.output
    (fig,) = saved
    ax_e, ax_f = fig.axes
    assert ax_f.get_yscale() == "log"
    energy_lines = {line.get_label(): line for line in ax_e.get_lines()}
    fmax_lines = {line.get_label(): line for line in ax_f.get_lines()}
    assert set(energy_lines) == {"ar108-fcc", "ar55-cluster"}
    for path in files:
        with h5py.File(path) as f:
            step = f["particles/trajectory/position/step"][()]
            energy = f["observables/potential_energy/value"][()]
            fmax = f["observables/fmax/value"][()]
        assert len(step) > 10
        e_line, f_line = energy_lines[path.stem], fmax_lines[path.stem]
        np.testing.assert_array_equal(e_line.get_xdata(), step)
        np.testing.assert_allclose(e_line.get_ydata(), energy - energy[-1], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(f_line.get_xdata(), step)
        np.testing.assert_array_equal(f_line.get_ydata(), fmax)
    np.testing.assert_allclose(fmax_lines["fmax target"].get_ydata(), [1e-3, 1e-3])
    saved.clear()
    r = runner.invoke(app, ["plot", str(files[0]), "-o", str(results / "a.png"), "--no-relative"])
    (fig,) = saved
    with h5py.File(files[0]) as f:
        energy = f["observables/potential_energy/value"][()]
    np.testing.assert_array_equal(fig.axes[0].get_lines()[0].get_ydata(), energy)


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


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", line)]


def _check_h5py(results, stdout):
    """status, last step, final energy, max |F| of results/ar108-fcc.h5md."""
    relaxed = ase.io.read(results / "results" / "ar108-fcc.extxyz")
    status, step, energy, force = stdout.split()
    assert status == "converged" and int(step) > 10
    assert float(energy) == pytest.approx(relaxed.get_potential_energy(), abs=1e-9)
    assert float(force) == pytest.approx(np.abs(relaxed.get_forces()).max(), rel=1e-6)
    assert float(force) < 1e-3


def _check_mdanalysis(results, stdout):
    """Every tenth frame's number, step, energy and box; then the atoms selected by element,
    their mean position and the max force (kJ/mol/A) of the last frame, against h5py's
    reading of the same file."""
    import h5py

    with h5py.File(results / "results" / "ar108-fcc.h5md") as f:
        energy = f["observables/potential_energy/value"][()]
        positions = f["particles/trajectory/position/value"][-1]
        forces = f["particles/trajectory/force_ev/value"][-1]
        edges = f["particles/trajectory/box/edges/value"][()]
    lines = stdout.strip().splitlines()
    frames = lines[:-1]
    assert len(frames) == len(range(0, len(energy), 10))
    for k, line in zip(range(0, len(energy), 10), frames, strict=True):
        values = _numbers(line)
        assert values[:2] == [k, k]
        assert values[2] == pytest.approx(energy[k], abs=1e-9)
        np.testing.assert_allclose(values[3:6], np.linalg.norm(edges[k], axis=1), rtol=1e-6)
    values = _numbers(lines[-1])
    assert values[0] == len(positions)  # every atom selected by its element
    np.testing.assert_allclose(values[1:4], positions.mean(axis=0), atol=1e-4)
    assert values[4] == pytest.approx(forces.max() * 96.485332, rel=1e-5)


def _check_api(results, stdout):
    """The API relaxes the rattled Ar13 icosahedron as ASE's own LBFGS does (same fmax)."""
    from ase.calculators.lj import LennardJones as AseLJ

    energy, status = stdout.split()
    atoms = Icosahedron("Ar", 2, latticeconstant=5.26)
    atoms.rattle(0.1, seed=1)
    atoms.calc = AseLJ(epsilon=0.0104, sigma=3.40, rc=8.5, smooth=False)
    LBFGS(atoms, logfile=None).run(fmax=1e-3)
    assert status == "converged"
    assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-9)


def _check_differentiable(results, stdout):
    """da/dsigma of relaxed fcc argon from implicit differentiation equals a central finite
    difference of lattice constants relaxed by ASE (FrechetCellFilter, ASE's LennardJones)."""
    from ase.calculators.lj import LennardJones as AseLJ
    from ase.filters import FrechetCellFilter

    def lattice(sigma):
        atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
        atoms.calc = AseLJ(epsilon=0.0104, sigma=sigma, rc=8.5, smooth=False)
        LBFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-7, steps=2000)
        return atoms.cell.lengths().mean()

    a, dadsigma = _numbers(stdout)
    assert a == pytest.approx(lattice(3.40), abs=1e-6)
    h = 1e-3
    finite_difference = (lattice(3.40 + h) - lattice(3.40 - h)) / (2 * h)
    assert dadsigma == pytest.approx(finite_difference, rel=1e-4)


README_CHECKS = {
    "h5py": _check_h5py,
    "MDAnalysis": _check_mdanalysis,
    "API": _check_api,
    "differentiable": _check_differentiable,
}


def test_every_readme_example_is_checked():
    names = [code.splitlines()[0][11:] for code in readme_examples()]
    assert sorted(names) == sorted(README_CHECKS)
    text = (ROOT / "README.md").read_text()
    assert text.count("```python") == len(names)  # no Python block escapes the checks


def _example_params():
    """The README's examples; the differentiable one (18 s: it fits, then relaxes) runs with
    ``-m slow``, test_differentiable.py checks the same API by default."""
    for code in readme_examples():
        name = code.splitlines()[0][11:]
        marks = pytest.mark.slow if name == "differentiable" else ()
        yield pytest.param(code, id=name, marks=marks)


@pytest.mark.parametrize("code", list(_example_params()))
def test_readme_examples_run(results, code):
    """Each Python example in the README runs as written, and what it prints is right."""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=results, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    README_CHECKS[code.splitlines()[0][11:]](results, proc.stdout)
