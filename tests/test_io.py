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


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_files_read_like_plain_ones(tmp_path, suffix, monkeypatch):
    """Compressed trajectories (decompressed once, not re-read per frame) give the same frames
    as the plain file, with the selection and frame numbering of an index; a truncated
    compressed file fails with a reason instead of a traceback."""
    import bz2
    import gzip
    import lzma

    from molopt.training.data import read_labelled

    codec = {".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix]
    rng = np.random.default_rng(4)
    images = []
    for k in range(40):
        atoms = argon_pair()
        atoms.positions += rng.normal(0, 0.05, (2, 3))
        atoms.info["energy"] = -0.01 * k
        atoms.arrays["forces"] = rng.normal(size=(2, 3))
        images.append(atoms)
    plain = tmp_path / "t.extxyz"
    ase.io.write(plain, images)
    packed = tmp_path / f"t.extxyz{suffix}"
    packed.write_bytes(codec.compress(plain.read_bytes()))

    seen = []
    real_read = ase.io.read

    def spy(name, *args, **kwargs):
        seen.append(str(name))
        return real_read(name, *args, **kwargs)

    monkeypatch.setattr(ase.io, "read", spy)
    got, expected = read_frames(packed, "5::7"), read_frames(plain, "5::7")
    # ASE seeks back per frame, which re-decompresses a compressed stream from the start each
    # time: it must only ever see the decompressed copy
    assert seen and not any(name.endswith(suffix) for name in seen)
    assert [f.index for f in got] == [f.index for f in expected] == [5, 12, 19, 26, 33]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.structure.positions, b.structure.positions)
    labelled = read_labelled([packed])
    assert [d.energy for d in labelled] == pytest.approx([-0.01 * k for k in range(40)])
    np.testing.assert_allclose(labelled[7].forces, images[7].arrays["forces"], atol=1e-7)

    broken = tmp_path / f"cut.extxyz{suffix}"
    broken.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    (frame,) = read_frames(broken)
    assert frame.structure is None and "cannot be read" in frame.error


@pytest.mark.parametrize(
    "name, text",
    [
        ("plain.xyz", "2\n\nAr 0 0 0\nAr 0 0 3\n"),
        ("ext.extxyz", '2\nPbc="F F F"\nAr 0 0 0\nAr 0 0 3\n'),
        ("padded.xyz", " 2\n c\nAr 0 0 0\nAr 1 1 1\n"),
        ("POSCAR.xyz", "2\n\nAr 0 0 0\nAr 0 0 3\n"),  # ASE: VASP, by its name
        ("dump.xyz", "ITEM: TIMESTEP\n1\n"),  # LAMMPS dump, by its content
        ("late.xyz", "2\nITEM: TIMESTEP\n"),
        ("xsf.xyz", "3\nxsf\nATOMS\n"),
        ("pw.xyz", "1\nProgram PWSCF\nAr 0 0 0\n"),
        ("abinit.xyz", "1\nznucl 3\nAr 0 0 0\n"),
    ],
)
def test_xyz_fast_path_agrees_with_ase_detection(tmp_path, name, text):
    """The fast path names extxyz exactly where ASE's own detection would pick it, and
    otherwise leaves detection to ASE."""
    from ase.io.formats import filetype

    from molopt.io.read import xyz_format

    path = tmp_path / name
    path.write_text(text)
    fast = xyz_format(path)
    assert fast in (None, "extxyz")
    if fast is not None:
        assert filetype(str(path)) == fast
    else:
        assert name.startswith(("POSCAR", "dump", "late", "xsf", "pw", "abinit"))


def test_ase_io_import_defers_only_what_it_does_not_use(tmp_path):
    """A fresh process reads and writes structures without importing SciPy, and every name of
    the deferred ASE packages is still there (the real initializer runs on first use)."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "data" / "examples" / "ar108-fcc.extxyz"
    copy, cif = tmp_path / "ar.extxyz", tmp_path / "cu.cif"
    code = f"""
import sys
import threading
from molopt.io.ase_import import ase_io
from molopt.io.read import read_frames

assert read_frames(r"{example}")[0].structure.n_atoms == 108
aseio = ase_io()
aseio.write(r"{copy}", aseio.read(r"{example}"))
assert len(aseio.read(r"{copy}")) == 108
assert "scipy" not in sys.modules, "scipy imported"

import ase.dft
import ase.spacegroup

# two threads reach for names of a deferred package at once: both get them
barrier, errors = threading.Barrier(2), []
def first():
    barrier.wait()
    try:
        ase.dft.DOS
    except Exception as exc:
        errors.append(exc)
def second():
    barrier.wait()
    try:
        from ase.dft import monkhorst_pack
    except Exception as exc:
        errors.append(exc)
threads = [threading.Thread(target=f) for f in (first, second)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
try:  # the first access of the other package: a missing name is still an AttributeError
    ase.spacegroup.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("missing names must still raise AttributeError")
assert "crystal" in dir(ase.spacegroup) and "scipy" in sys.modules

from ase.build import bulk
aseio.write(r"{cif}", bulk("Cu", cubic=True))
import ase.dft.kpoints
from ase.spacegroup.spacegroup import Spacegroup as direct
assert ase.dft.kpoints.monkhorst_pack((2, 2, 2)).shape == (8, 3)
from ase.spacegroup import Spacegroup, crystal, get_spacegroup
assert Spacegroup is direct
from ase.dft import DOS, monkhorst_pack
assert "crystal" in ase.spacegroup.__all__ and callable(ase.dft.DOS)
al = crystal("Al", [(0, 0, 0)], spacegroup=225, cellpar=[4.05, 4.05, 4.05, 90, 90, 90])
assert len(al) == 4 and len(aseio.read(r"{cif}")) == 4
print("ok")
"""
    import os

    import molopt

    # the molopt this test imports (a source tree or an installed copy), in the child too
    env = dict(os.environ, PYTHONPATH=str(Path(molopt.__file__).resolve().parents[1]))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
