"""Reading structures: formats, frames, constraints, and every kind of bad input."""

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111
from ase.constraints import FixAtoms, FixBondLength

from molopt.errors import ConfigError
from molopt.io.read import discover, read_frames


def argon_pair():
    return Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("a.xyz", None),
        ("a.extxyz", None),
        ("a.cif", None),
        ("POSCAR", "vasp"),
        ("a.traj", None),
        ("a.pdb", None),
        ("a.json", None),
    ],
)
def test_reads_common_formats(tmp_path, name, fmt):
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
    path = tmp_path / name
    ase.io.write(path, atoms, format=fmt)
    (frame,) = read_frames(path)
    assert frame.error is None
    assert frame.structure.n_atoms == 4
    np.testing.assert_allclose(frame.structure.positions, atoms.positions, atol=1e-4)
    assert frame.structure.pbc.all()


def test_multi_frame_files_and_index(tmp_path):
    images = [argon_pair() for _ in range(4)]
    for k, a in enumerate(images):
        a.positions[1, 0] += 0.1 * k
    path = tmp_path / "traj.extxyz"
    ase.io.write(path, images)
    frames = read_frames(path)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [f.stem for f in frames] == [f"traj-{k}" for k in range(4)]
    (last,) = read_frames(path, index="-1")
    assert last.index is None and last.stem == "traj"
    assert last.structure.positions[1, 0] == pytest.approx(4.1)
    picked = read_frames(path, index="::2")
    assert [f.index for f in picked] == [0, 2]
    assert picked[1].structure.positions[1, 0] == pytest.approx(4.0)


def test_fix_atoms_carried_from_extxyz_and_traj(tmp_path):
    slab = fcc111("Ar", size=(2, 2, 3), a=5.26, vacuum=5.0)
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    for name in ("slab.extxyz", "slab.traj"):
        ase.io.write(tmp_path / name, slab)
        (frame,) = read_frames(tmp_path / name)
        assert frame.structure.fixed.tolist() == [True] * 4 + [False] * 8
        assert frame.structure.pbc.tolist() == [True, True, False]


@pytest.mark.parametrize(
    "content,reason",
    [
        ("", "file is empty"),
        ("this is not a structure\n", "cannot be read"),
        ("2\n\nAr 0 0 0\nAr nan 0 0\n", "non-finite"),
        ("2\n\nAr 0 0 0\nAr 0.01 0 0\n", "on top of each other"),
    ],
)
def test_bad_inputs_give_reasons(tmp_path, content, reason):
    path = tmp_path / "bad.xyz"
    path.write_text(content)
    (frame,) = read_frames(path)
    assert frame.structure is None
    assert reason in frame.error


def test_unsupported_constraint_is_refused(tmp_path):
    atoms = argon_pair()
    atoms.set_constraint(FixBondLength(0, 1))
    ase.io.write(tmp_path / "c.traj", atoms)
    (frame,) = read_frames(tmp_path / "c.traj")
    assert "FixBondLength" in frame.error


def test_overlap_with_periodic_image_is_detected(tmp_path):
    atoms = Atoms("Ar2", positions=[[0, 0, 0], [4.99, 0, 0]], cell=[5.0, 5.0, 5.0], pbc=True)
    ase.io.write(tmp_path / "p.extxyz", atoms)
    (frame,) = read_frames(tmp_path / "p.extxyz")
    assert "on top of each other" in frame.error


def test_discover_directory_skips_non_structures(tmp_path):
    ase.io.write(tmp_path / "a.xyz", argon_pair())
    ase.io.write(tmp_path / "b.cif", bulk("Ar", "fcc", a=5.26))
    (tmp_path / "notes.txt").write_text("not a structure")
    (tmp_path / "README.md").write_text("# hello")
    (tmp_path / "empty.xyz").write_text("")
    names = [p.name for p in discover([str(tmp_path)])]
    assert names == ["a.xyz", "b.cif", "empty.xyz"]


def test_discover_globs_and_missing_paths(tmp_path):
    ase.io.write(tmp_path / "a.xyz", argon_pair())
    ase.io.write(tmp_path / "b.xyz", argon_pair())
    assert [p.name for p in discover([str(tmp_path / "*.xyz")])] == ["a.xyz", "b.xyz"]
    with pytest.raises(ConfigError, match="no such file"):
        discover([str(tmp_path / "missing.xyz")])
    with pytest.raises(ConfigError, match="no structure files"):
        discover([str(tmp_path / "*.cif")])
