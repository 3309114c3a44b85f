"""What the outputs keep: the input's per-atom arrays, the atoms' identity for MDAnalysis,
and one combined file for a multi-frame input."""

import warnings

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from conftest import rattled_cluster

from molopt import config
from molopt.run import relax_files


def relax(inputs, out_dir, **overrides):
    settings = config.build(None, out_dir=str(out_dir), **overrides)
    return relax_files([str(p) for p in inputs], settings)


def test_per_atom_arrays_survive_into_the_outputs(tmp_path):
    water = molecule("H2O")
    water.set_tags([7, 8, 9])
    water.set_initial_charges([-0.8, 0.4, 0.4])
    water.set_masses([16.0, 2.014, 2.014])  # heavy water
    water.new_array("label", np.array([3, 1, 2]))
    ase.io.write(tmp_path / "water.extxyz", water)
    summary = relax([tmp_path / "water.extxyz"], tmp_path / "out", steps=5)
    assert summary.records[0]["status"] in ("converged", "not_converged")
    relaxed = ase.io.read(tmp_path / "out" / "water.extxyz")
    np.testing.assert_array_equal(relaxed.get_tags(), [7, 8, 9])
    np.testing.assert_allclose(relaxed.get_initial_charges(), [-0.8, 0.4, 0.4])
    np.testing.assert_allclose(relaxed.get_masses(), [16.0, 2.014, 2.014])
    np.testing.assert_array_equal(relaxed.arrays["label"], [3, 1, 2])
    with h5py.File(tmp_path / "out" / "water.h5md") as f:
        traj = f["particles/trajectory"]
        np.testing.assert_allclose(traj["mass"][()], [16.0, 2.014, 2.014])
        np.testing.assert_allclose(traj["charge"][()], [-0.8, 0.4, 0.4])


def test_mdanalysis_selects_atoms_by_element_without_warnings(tmp_path):
    mda = pytest.importorskip("MDAnalysis")
    import molopt.mdanalysis  # noqa: F401  (registers the H5MD topology reader)

    ase.io.write(tmp_path / "ethanol.xyz", molecule("CH3CH2OH"))
    relax([tmp_path / "ethanol.xyz"], tmp_path / "out", steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MDAnalysis warned on every open without it
        u = mda.Universe(str(tmp_path / "out" / "ethanol.h5md"))
    assert len(u.select_atoms("element O")) == 1
    assert len(u.select_atoms("element C")) == 2
    assert len(u.select_atoms("name H")) == 6
    assert list(u.atoms.types[:3]) == [a.symbol for a in molecule("CH3CH2OH")][:3]
    np.testing.assert_allclose(u.atoms.masses, molecule("CH3CH2OH").get_masses())
    u.trajectory[-1]
    relaxed = ase.io.read(tmp_path / "out" / "ethanol.extxyz")
    np.testing.assert_allclose(u.atoms.positions, relaxed.positions, atol=1e-4)


def test_a_multi_frame_input_gets_one_combined_output(tmp_path):
    frames = []
    for k in range(3):
        s = rattled_cluster(8 + k, seed=k)
        frames.append(Atoms(numbers=s.numbers, positions=s.positions))
    ase.io.write(tmp_path / "many.extxyz", frames)
    out_dir = tmp_path / "out"
    relax([tmp_path / "many.extxyz"], out_dir, potential="argon", fmax=1e-3)
    combined = ase.io.read(out_dir / "many-all.extxyz", ":")
    assert [a.info["molopt_index"] for a in combined] == [0, 1, 2]
    for k, atoms in enumerate(combined):
        alone = ase.io.read(out_dir / f"many-{k}.extxyz")
        np.testing.assert_array_equal(atoms.positions, alone.positions)
        assert atoms.get_potential_energy() == alone.get_potential_energy()
    # a rerun with everything skipped leaves it as it is; a lost frame output is made again
    before = (out_dir / "many-all.extxyz").stat().st_mtime_ns
    relax([tmp_path / "many.extxyz"], out_dir, potential="argon", fmax=1e-3)
    assert (out_dir / "many-all.extxyz").stat().st_mtime_ns == before
    (out_dir / "many-all.extxyz").unlink()
    relax([tmp_path / "many.extxyz"], out_dir, potential="argon", fmax=1e-3)
    assert len(ase.io.read(out_dir / "many-all.extxyz", ":")) == 3


def test_long_trajectories_are_written_on_the_writer_thread(tmp_path, monkeypatch):
    """Frames past the buffer go to the file from the writer thread while the engine goes on
    (at most two writes queued per trajectory): the same file as written at the end; a write
    error there fails that structure alone."""
    import errno

    from molopt.io import h5md

    for k in range(2):
        s = rattled_cluster(13, seed=k)
        ase.io.write(tmp_path / f"c{k}.xyz", Atoms(numbers=s.numbers, positions=s.positions))
    inputs = [str(tmp_path / "c0.xyz"), str(tmp_path / "c1.xyz")]
    relax(inputs, tmp_path / "once")
    threads = set()
    write_blocks = h5md.TrajectoryWriter.write_blocks

    def recording(self, blocks):
        import threading

        threads.add(threading.current_thread().name)
        return write_blocks(self, blocks)

    monkeypatch.setattr(h5md.TrajectoryWriter, "write_blocks", recording)
    monkeypatch.setattr(h5md, "BUFFER_BYTES", 1)  # every block streams
    relax(inputs, tmp_path / "streamed")
    assert threads and all(name.startswith("molopt-writer") for name in threads)
    for k in range(2):
        once = h5md.read(tmp_path / "once" / f"c{k}.h5md")
        streamed = h5md.read(tmp_path / "streamed" / f"c{k}.h5md")
        for key in ("step", "positions", "forces", "energy", "fmax"):
            np.testing.assert_array_equal(once[key], streamed[key])

    def failing(self, blocks):
        if "c1" in self.path.name:
            raise OSError(errno.EACCES, "Permission denied")
        return write_blocks(self, blocks)

    monkeypatch.setattr(h5md.TrajectoryWriter, "write_blocks", failing)
    summary = relax(inputs, tmp_path / "broken")
    status = {r["input"].rsplit("/", 1)[-1]: r for r in summary.records}
    assert status["c0.xyz"]["status"] == "converged"
    assert status["c1.xyz"]["status"] == "failed"
    assert "Permission denied" in status["c1.xyz"]["error"]
    assert not list((tmp_path / "broken").glob(".*.tmp"))
    assert not (tmp_path / "broken" / "c1.h5md").exists()
