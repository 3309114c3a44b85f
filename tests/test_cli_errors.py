"""What a user reads when something is wrong (issue 22): no command clobbers a file, files
that are not trajectories, nothing to relax, the reason given for each mistake, inputs that
would lose data (a truncated multi-frame file, a disordered CIF), a Hessian away from a
minimum, and help and logs that read well."""

import json
import re
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
import typer
from ase import Atoms
from conftest import rattled_cluster
from typer.testing import CliRunner

from molopt.cli import app

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def records(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def one_clear_line(result, *names):
    """Exit 2, no traceback, one line on stderr naming every one of ``names``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def write_cluster(path, n=6, seed=0):
    s = rattled_cluster(n, seed=seed)
    ase.io.write(path, Atoms(numbers=s.numbers, positions=s.positions))
    return path


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A finished relaxation: (trajectory, its extxyz output)."""
    work = tmp_path_factory.mktemp("relaxed")
    src = write_cluster(work / "ar6.xyz")
    result = invoke("relax", src, "-p", "argon", "-o", work / "out", "-q", "--fmax", "1e-3")
    assert result.exit_code == 0, result.output
    return work / "out" / "ar6.h5md", work / "out" / "ar6.extxyz"


# -- 1. no command clobbers a file ----------------------------------------------------------


def test_convert_never_replaces_a_file_unless_asked(trajectory, tmp_path):
    traj, relaxed = trajectory
    before = relaxed.read_bytes()
    line = one_clear_line(invoke("convert", traj, relaxed), relaxed)
    assert "already exists" in line and "--overwrite" in line
    assert relaxed.read_bytes() == before  # the relax output is intact
    target = tmp_path / "last.xyz"
    target.write_text("mine\n")
    one_clear_line(invoke("convert", traj, target, "--frames", "-1"), target)
    assert target.read_text() == "mine\n"
    for flag in ("--overwrite", "--force"):
        result = invoke("convert", traj, target, "--frames", "-1", flag)
        assert result.exit_code == 0, result.output
        assert len(ase.io.read(target, ":")) == 1
    fresh = tmp_path / "fresh.extxyz"
    assert invoke("convert", traj, fresh).exit_code == 0 and fresh.stat().st_size > 0


def test_every_command_that_writes_refuses_an_existing_file(trajectory, tmp_path):
    traj, _ = trajectory
    taken = {name: tmp_path / name for name in ("p.png", "h.json", "fit.toml", "parity.png")}
    for path in taken.values():
        path.write_text("keep me\n")
    dimer = tmp_path / "ar2.xyz"
    ase.io.write(dimer, Atoms("Ar2", positions=[[0, 0, 0], [3.9, 0, 0]]))
    attempts = {
        "p.png": ["plot", traj, "-o", taken["p.png"]],
        "h.json": ["hessian", dimer, "-p", "argon", "-o", taken["h.json"]],
        "fit.toml": ["fit", "fit-argon", "-o", taken["fit.toml"]],
        "parity.png": ["evaluate", "argon", traj, "--plot", taken["parity.png"]],
    }
    for name, args in attempts.items():
        one_clear_line(invoke(*args), taken[name])
        assert taken[name].read_text() == "keep me\n", name
    result = invoke("hessian", dimer, "-p", "argon", "-o", taken["h.json"], "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(taken["h.json"].read_text())["n_atoms"] == 2


def test_train_refuses_an_out_holding_an_earlier_training(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "state.json").write_text("{}")
    data = write_cluster(tmp_path / "d.extxyz")
    line = one_clear_line(invoke("train", data, "-c", "train-emt-metals", "-o", out), out)
    assert "--resume" in line and "--overwrite" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_clear_line(invoke("train", data, "-c", "train-emt-metals", "-o", blocker), blocker)
    assert "is a file" in line


# -- 2. files that are not molopt trajectories ----------------------------------------------


@pytest.fixture
def not_trajectories(tmp_path):
    """name -> (path, words of the reason)."""
    with h5py.File(tmp_path / "other.h5md", "w") as f:
        f["data"] = np.arange(3)
    ase.io.write(tmp_path / "s.extxyz", Atoms("Ar", positions=[[0, 0, 0]]))
    (tmp_path / "notes.txt").write_text("1 2 3\n")
    (tmp_path / "folder").mkdir()
    return {
        "hdf5": (tmp_path / "other.h5md", "not a molopt trajectory"),
        "extxyz": (tmp_path / "s.extxyz", "not an HDF5 file"),
        "text": (tmp_path / "notes.txt", "not an HDF5 file"),
        "directory": (tmp_path / "folder", "no molopt trajectories"),
        "missing": (tmp_path / "gone.h5md", "no such file"),
    }


@pytest.mark.parametrize("kind", ["hdf5", "extxyz", "text", "directory", "missing"])
@pytest.mark.parametrize("command", ["info", "plot", "convert"])
def test_not_a_trajectory_is_one_clear_line(not_trajectories, tmp_path, kind, command):
    path, reason = not_trajectories[kind]
    if command == "convert" and kind == "directory":
        reason = "is a directory"
    args = {
        "info": ["info", path],
        "plot": ["plot", path, "-o", tmp_path / "out.png"],
        "convert": ["convert", path, tmp_path / "out.extxyz"],
    }[command]
    assert reason in one_clear_line(invoke(*args), path)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.extxyz").exists()


def test_an_unsupported_output_format_is_refused_before_reading(trajectory, tmp_path, monkeypatch):
    import molopt.api
    import molopt.io.h5md

    def no_reading(*args, **kwargs):
        raise AssertionError("the trajectory was read")

    monkeypatch.setattr(molopt.api, "read_trajectory", no_reading)
    monkeypatch.setattr(molopt.io.h5md, "read", no_reading)
    traj, _ = trajectory
    assert "--format" in one_clear_line(invoke("convert", traj, tmp_path / "x.nosuchformat"))
    line = one_clear_line(invoke("convert", traj, tmp_path / "x.xyz", "--format", "nosuch"))
    assert "nosuch" in line
    line = one_clear_line(invoke("plot", traj, "-o", tmp_path / "x.xyz"))
    assert "png" in line  # says which formats it writes


def test_a_single_frame_format_with_many_frames_is_refused(trajectory, tmp_path):
    traj, _ = trajectory
    target = tmp_path / "POSCAR"
    line = one_clear_line(invoke("convert", traj, target, "--format", "vasp"), target)
    assert "--frames -1" in line and not target.exists()
    # a writer that fails half-way (VASP needs a cell, the cluster has none) leaves no file
    result = invoke("convert", traj, target, "--format", "vasp", "--frames", "-1")
    assert "cannot write" in one_clear_line(result, target)
    assert list(tmp_path.iterdir()) == []


# -- 3. nothing to do -----------------------------------------------------------------------


def test_nothing_to_relax_says_what_was_searched(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_clear_line(invoke("relax", empty, "-o", tmp_path / "o"), empty)
    assert "empty directory" in line
    tree = tmp_path / "calcs"
    for name in ("a", "b"):
        (tree / name).mkdir(parents=True)
        write_cluster(tree / name / "cluster.xyz")
    line = one_clear_line(invoke("relax", tree, "-o", tmp_path / "o"), tree)
    assert "--recursive" in line
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("no structure here\n")
    assert "notes.txt" in one_clear_line(invoke("relax", docs, "-o", tmp_path / "o"), docs)
    pattern = str(tmp_path / "*.cif")
    one_clear_line(invoke("relax", pattern, "-o", tmp_path / "o"), pattern)
    pattern = str(tree / "*")  # matches the sub-directories only
    assert "--recursive" in one_clear_line(invoke("relax", pattern, "-o", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# -- 4. the right reason --------------------------------------------------------------------


def test_paths_of_the_wrong_kind_are_named_as_such(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    line = one_clear_line(invoke("relax", src, "-p", folder, "-o", tmp_path / "o"), folder)
    assert "is a directory" in line
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    line = one_clear_line(invoke("relax", src, "-p", "argon", "-o", blocker, "-q"), blocker)
    assert "is a file" in line and "File exists" not in line
    missing = tmp_path / "missing.toml"
    for args in (
        ["train", src, "-c", missing, "-o", tmp_path / "t"],
        ["fit", missing, "-o", tmp_path / "f.toml"],
        ["relax", src, "-c", missing],
    ):
        line = one_clear_line(invoke(*args), missing)
        assert "no such file" in line and "TOML" not in line
    line = one_clear_line(invoke("fit", folder, "-o", tmp_path / "f.toml"), folder)
    assert "is a directory" in line
    from molopt.analysis.fitting import FitConfig
    from molopt.errors import ConfigError
    from molopt.training.train import TrainConfig

    for reader in (TrainConfig.from_toml, FitConfig.from_toml):  # the library's own readers
        with pytest.raises(ConfigError, match="no such file") as missing_file:
            reader(missing)
        assert "TOML" not in str(missing_file.value)
        with pytest.raises(ConfigError, match="is a directory"):
            reader(folder)
    line = one_clear_line(invoke("hessian", tmp_path, "-p", "argon"), tmp_path)
    assert "is a directory" in line


def test_a_malformed_index_is_a_usage_error_up_front(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    for bad in ("abc", "1:2:3:4", "::0", "1.5"):
        line = one_clear_line(invoke("relax", src, "--index", bad, "-o", tmp_path / "o"), bad)
        assert "index" in line
        assert "index" in one_clear_line(invoke("hessian", src, "--index", bad), bad)
    assert not (tmp_path / "o").exists()


def test_an_index_past_the_end_fails_with_the_frame_count(tmp_path):
    clusters = [rattled_cluster(4, seed=k) for k in range(3)]
    frames = [Atoms(numbers=s.numbers, positions=s.positions) for s in clusters]
    ase.io.write(tmp_path / "three.extxyz", frames)
    for index in ("7", "5:9"):
        args = ["-p", "argon", "--index", index, "-o", tmp_path / "o", "--json", "-q"]
        result = invoke("relax", tmp_path / "three.extxyz", *args)
        assert result.exit_code == 1
        (rec,) = records(result)
        assert rec["status"] == "failed"
        assert "has 3 frames" in rec["error"] and "Iteration" not in rec["error"]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--fmax", "inf"),
        ("--fmax", "nan"),
        ("--fmax", "0"),
        ("--steps", "-1"),
        ("--pressure", "nan"),
        ("--maxstep", "nan"),
        ("--maxstep", "inf"),
        ("--skin", "inf"),
    ],
)
def test_values_that_make_no_sense_are_refused_up_front(tmp_path, flag, value):
    src = write_cluster(tmp_path / "a.xyz")
    cell = ["--relax-cell"] if flag == "--pressure" else []
    result = invoke("relax", src, "-p", "argon", flag, value, *cell, "-o", tmp_path / "o")
    line = one_clear_line(result, flag.lstrip("-"))
    assert "explod" not in line
    assert not (tmp_path / "o").exists()


def test_nan_in_a_config_file_is_refused(tmp_path):
    src = write_cluster(tmp_path / "a.xyz")
    config = tmp_path / "c.toml"
    config.write_text("relax_cell = true\npressure = nan\n")
    line = one_clear_line(invoke("relax", src, "-c", config, "-o", tmp_path / "o"), config)
    assert "pressure" in line and "finite" in line
    training = tmp_path / "train.toml"
    training.write_text('name = "x"\nlearning_rate = inf\n')
    line = one_clear_line(invoke("train", src, "-c", training, "-o", tmp_path / "t"), training)
    assert "learning_rate" in line and "finite" in line
    fitting = tmp_path / "fit.toml"
    fitting.write_text('potential = "argon"\n[[targets]]\nkind = "data"\nweight = nan\n')
    line = one_clear_line(invoke("fit", fitting, "-o", tmp_path / "f.toml"), fitting)
    assert "targets[0].weight" in line and "finite" in line


def test_presets_belong_to_their_command(tmp_path):
    from molopt import config as cfg

    src = write_cluster(tmp_path / "a.xyz")
    line = one_clear_line(invoke("relax", src, "-c", "train-emt-metals"), "train-emt-metals")
    assert "molopt train" in line
    assert "train-" not in line.split("presets:")[1] and "fit-" not in line.split("presets:")[1]
    shipped = Path(cfg.preset_directories()[0])
    line = one_clear_line(invoke("relax", src, "-c", shipped / "train-emt-metals.toml"))
    assert "molopt train" in line  # the preset's file named by its path
    line = one_clear_line(invoke("relax", src, "-c", "nosuch"), "nosuch")
    assert "tight" in line and "train-" not in line and "fit-" not in line
    data = write_cluster(tmp_path / "d.extxyz")
    line = one_clear_line(invoke("train", data, "-c", "tight", "-o", tmp_path / "t"), "tight")
    assert "molopt relax" in line
    assert "fit-argon" in one_clear_line(invoke("fit", "tight", "-o", tmp_path / "f.toml"))
    assert set(cfg.presets("relax")) >= {"default", "tight", "cell", "screening"}
    assert all(name.startswith("train-") for name in cfg.presets("train"))
    assert set(cfg.presets("fit")) == {"fit-argon"}
    assert cfg.config_path("fit-argon", "fit").name == "fit-argon.toml"


# -- 5. inputs that would lose data ---------------------------------------------------------


def test_a_truncated_multi_frame_file_keeps_its_complete_frames(tmp_path):
    frames = [
        Atoms(numbers=s.numbers, positions=s.positions)
        for s in (rattled_cluster(4, seed=k) for k in range(5))
    ]
    ase.io.write(tmp_path / "whole.extxyz", frames)
    lines = (tmp_path / "whole.extxyz").read_text().splitlines(keepends=True)
    per_frame = len(lines) // 5
    cut = tmp_path / "cut.extxyz"
    cut.write_text("".join(lines[: 2 * per_frame + 3]))  # in the middle of frame 2's atoms
    result = invoke("relax", cut, "-p", "argon", "-o", tmp_path / "o", "--json", "-q")
    assert result.exit_code == 1, result.output
    by_index = {r["index"]: r for r in records(result)}
    assert sorted(by_index) == [0, 1, 2]
    assert by_index[0]["status"] == by_index[1]["status"] == "converged"
    assert by_index[2]["status"] == "failed"
    assert "frame 2" in by_index[2]["error"] and "cut short" in by_index[2]["error"]
    assert (tmp_path / "o" / "cut-1.extxyz").exists()
    assert not (tmp_path / "o" / "cut-2.extxyz").exists()


PARTIAL_CIF = """data_mixed
_cell_length_a 5.64
_cell_length_b 5.64
_cell_length_c 5.64
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Ar1 Ar 0.0 0.0 0.0 0.5
Kr1 Kr 0.0 0.0 0.0 0.5
Ar2 Ar 0.5 0.5 0.5 1.0
"""


def test_a_cif_with_partial_occupancies_is_refused_with_the_reason(tmp_path):
    (tmp_path / "mixed.cif").write_text(PARTIAL_CIF)
    ordered = PARTIAL_CIF.replace("Kr1 Kr 0.0 0.0 0.0 0.5\n", "").replace(" 0.5\n", " 1.0\n", 1)
    (tmp_path / "ordered.cif").write_text(ordered)
    result = invoke("relax", tmp_path, "-p", "noble-gases", "-o", tmp_path / "o", "--json", "-q")
    by_name = {Path(r["input"]).name: r for r in records(result)}
    assert by_name["mixed.cif"]["status"] == "failed"
    assert "partially occupied" in by_name["mixed.cif"]["error"]
    assert "Ar 0.5 + Kr 0.5" in by_name["mixed.cif"]["error"]
    assert by_name["ordered.cif"]["status"] != "failed"


# -- 6. a Hessian away from a minimum -------------------------------------------------------


def test_hessian_says_when_the_structure_is_not_at_a_minimum(tmp_path):
    """A Lennard-Jones dimer (reduced units: sigma 1 A, epsilon 1 eV) stretched beyond the
    inflection point (r > (26/7)^(1/6) sigma = 1.2445 A) has a negative curvature along the
    bond: one imaginary mode. At the minimum (2^(1/6) sigma) it has none."""
    stretched = tmp_path / "stretched.xyz"
    ase.io.write(stretched, Atoms("Ar2", positions=[[0, 0, 0], [1.35, 0, 0]]))
    result = invoke("hessian", stretched, "-p", "lj-reduced", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_imaginary"] == 1 and report["at_minimum"] is False
    assert "not at a minimum" in report["warning"]
    assert "warning:" in result.stderr and "not at a minimum" in result.stderr
    table = invoke("hessian", stretched, "-p", "lj-reduced")
    assert "not at a minimum" in table.stderr and "NOT at a minimum" in table.stdout
    relaxed = tmp_path / "relaxed.xyz"
    ase.io.write(relaxed, Atoms("Ar2", positions=[[0, 0, 0], [2 ** (1 / 6), 0, 0]]))
    result = invoke("hessian", relaxed, "-p", "lj-reduced", "--json")
    report = json.loads(result.stdout)
    assert report["n_imaginary"] == 0
    assert report["at_minimum"] is True and report["warning"] is None
    assert "warning" not in result.stderr


# -- 7. help and logs -----------------------------------------------------------------------


def commands():
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_describes_every_option_and_reads_at_80_columns(name):
    command = commands()[name]
    for param in command.params:
        assert (getattr(param, "help", None) or "").strip(), f"molopt {name} {param.name}: no help"
    result = invoke(name, "--help", env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    text = result.stdout
    assert "<bool>" not in text
    for line in text.splitlines():
        assert len(line) <= 80, line
        assert not line.rstrip().endswith(("…", "-")), f"cut mid-word: {line!r}"
    words = set(re.findall(r"[A-Za-z][A-Za-z_-]+", text))
    for param in command.params:
        if param.param_type_name == "option":
            for word in re.findall(r"[A-Za-z][A-Za-z_-]+", param.help):
                assert word in words, f"{name}: help word {word!r} cut or lost"


def test_the_command_list_reads_whole_at_80_columns():
    text = invoke("--help", env={"COLUMNS": "80"}, terminal_width=80).stdout
    listed = text.split("Commands:")[1]
    for name in commands():
        assert name in listed
    assert "..." not in listed and all(len(line) <= 80 for line in text.splitlines())


def test_relax_help_shows_the_defaults_the_run_uses():
    from molopt.config import RunSettings

    text = " ".join(invoke("relax", "--help", env={"COLUMNS": "80"}).stdout.split())
    defaults = RunSettings()
    for flag, value in {
        "--optimizer": defaults.optimizer,
        "--fmax": defaults.fmax,
        "--steps": defaults.steps,
        "--precision": defaults.precision,
        "--batch-size": defaults.batch_size,
        "--traj-interval": defaults.trajectory_interval,
    }.items():
        part = text.split(flag, 1)[1].split(" --", 1)[0]
        assert f"[default: {value}]" in part, f"{flag}: {part}"
    # the skin is the potential's unless set (molopt.potentials.base.default_skin)
    from molopt.potentials.base import PotentialMethods
    from molopt.potentials.sevennet import SevenNet

    assert defaults.skin is None
    part = text.split("--skin", 1)[1].split(" --", 1)[0]
    expected = f"{PotentialMethods.default_skin}; SevenNet {SevenNet.default_skin}]"
    assert expected in part, part
    from molopt.potentials.base import BATCH_ATOMS

    assert defaults.max_batch_atoms is None
    part = text.split("--max-batch-atoms", 1)[1].split(" --", 1)[0]
    assert f"[default: {BATCH_ATOMS}; SevenNet on a CPU {SevenNet.cpu_batch_atoms}]" in part
    for flag in ("--json", "--overwrite", "--recursive", "--check-hessian"):
        assert f"[default: no-{flag[2:]}]" in text


def test_logs_get_plain_unwrapped_lines():
    """Off a terminal, a long line with numbers stays one line and a table keeps each cell
    whole (Rich would wrap at 80 columns and cut the cells)."""
    import io

    from rich.table import Table

    from molopt.cli.display import LogConsole

    stream = io.StringIO()
    console = LogConsole(file=stream, highlight=False, _environ={"COLUMNS": "80"})
    assert not console.is_terminal
    line = "structure " + " ".join(f"{k * 1.23456789:.8f}" for k in range(30))
    console.print(line)
    table = Table()
    for k in range(9):
        table.add_column(f"column number {k}")
    table.add_row(*[f"/a/long/path/to/results/structure-{k}.h5md" for k in range(9)])
    console.print(table)
    text = stream.getvalue()
    assert line in text.splitlines()
    for k in range(9):
        assert f"/a/long/path/to/results/structure-{k}.h5md" in text
        assert f"column number {k}" in text


def test_info_does_not_truncate_columns_in_a_pipe(trajectory, tmp_path):
    traj, _ = trajectory
    long_name = tmp_path / ("a-rather-long-trajectory-name-" * 3 + "ar6.h5md")
    long_name.write_bytes(traj.read_bytes())
    result = invoke("info", long_name, env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert long_name.name in result.stdout
    with h5py.File(traj) as f:
        energy = f["observables/potential_energy/value"][-1]
    assert f"{energy:.5f}" in result.stdout
