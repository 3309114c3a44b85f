"""H5MD trajectories: layout, round trip through h5py, MDAnalysis, atomic writes."""

import json
import warnings

import h5py
import numpy as np
import pytest
from ase.build import bulk
from conftest import rattled_cluster, structure_from_atoms

from molopt.engine import EngineSettings, relax_structures
from molopt.io import h5md


class Collect:
    def __init__(self, directory, variable_cell=False):
        self.directory = directory
        self.variable_cell = variable_cell
        self.writers = {}
        self.results = {}

    def begin(self, key, structure):
        self.writers[key] = h5md.TrajectoryWriter(
            self.directory / f"{key}.h5md", structure.numbers, structure.pbc, self.variable_cell
        )

    def frames(self, key, block):
        self.writers[key].append(block)

    def end(self, key, result):
        self.results[key] = result
        self.writers.pop(key).close({"status": result.status, "settings": {"fmax": 1e-3}})


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory, argon):
    directory = tmp_path_factory.mktemp("h5md")
    crystal = bulk("Ar", "fcc", a=5.1, cubic=True).repeat(2)
    crystal.rattle(0.1, seed=1)
    fixed = Collect(directory)
    relax_structures(
        [("cluster", rattled_cluster(13)), ("crystal", structure_from_atoms(crystal))],
        argon,
        EngineSettings(fmax=1e-3),
        fixed,
    )
    cell = Collect(directory, variable_cell=True)
    relax_structures(
        [("cellrelax", structure_from_atoms(crystal))],
        argon,
        EngineSettings(fmax=1e-3, relax_cell=True),
        cell,
    )
    return directory, {**fixed.results, **cell.results}


def test_layout_and_units(trajectories):
    directory, _ = trajectories
    with h5py.File(directory / "crystal.h5md") as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/creator"].attrs["name"] == "molopt"
        box = f["particles/trajectory/box"]
        assert box.attrs["dimension"] == 3
        assert [b.decode() for b in box.attrs["boundary"]] == ["periodic"] * 3
        n_frames = f["particles/trajectory/position/value"].shape[0]
        assert box["edges/value"].shape == (n_frames, 3, 3)
        assert f["particles/trajectory/position/value"].attrs["unit"] == "Angstrom"
        assert f["particles/trajectory/position/time"].attrs["unit"] == "fs"
        assert f["particles/trajectory/force/value"].attrs["unit"] == "kJ mol-1 Angstrom-1"
        assert f["particles/trajectory/force_ev/value"].attrs["unit"] == "eV Angstrom-1"
        assert f["observables/potential_energy/value"].attrs["unit"] == "eV"
        assert f["observables/fmax/value"].shape == (n_frames,)
        assert f["particles/trajectory/species"].shape == (32,)
    with h5py.File(directory / "cluster.h5md") as f:
        box = f["particles/trajectory/box"]
        assert [b.decode() for b in box.attrs["boundary"]] == ["none"] * 3
        assert "edges" not in box
    for name, n_elements in (("crystal", 6), ("cluster", 5), ("cellrelax", 8)):
        with h5py.File(directory / f"{name}.h5md") as f:
            assert_units(f, n_elements)


def assert_units(f, n_elements):
    """Every time series has its ``value`` unit and a ``time`` in fs."""
    elements = [e for e in h5md.UNITS if e in f]
    assert len(elements) == n_elements
    for element in elements:
        assert f[element]["value"].attrs["unit"] == h5md.UNITS[element], element
        assert f[element]["time"].attrs["unit"] == "fs", element


def test_streamed_trajectory_equals_one_written_at_once(tmp_path, monkeypatch):
    """Past BUFFER_BYTES frames go to resizable datasets as they come: same content, units."""
    rng = np.random.default_rng(0)
    blocks = [
        {
            "step": np.arange(3 * k, 3 * k + 3),
            "positions": rng.normal(size=(3, 4, 3)),
            "forces": rng.normal(size=(3, 4, 3)),
            "energy": rng.normal(size=3),
            "fmax": rng.random(3),
            "cell": np.tile(np.eye(3) * 6.0, (3, 1, 1)),
        }
        for k in range(4)
    ]
    paths = []
    for buffer_bytes in (h5md.BUFFER_BYTES, 1):
        monkeypatch.setattr(h5md, "BUFFER_BYTES", buffer_bytes)
        path = tmp_path / f"buffer{buffer_bytes}.h5md"
        writer = h5md.TrajectoryWriter(path, [18] * 4, [True] * 3, False)
        for block in blocks:
            writer.append(block)
        writer.close({"status": "converged"})
        paths.append(path)
    once, streamed = (h5md.read(p) for p in paths)
    for key in ("step", "positions", "forces", "energy", "fmax", "cell"):
        np.testing.assert_array_equal(once[key], streamed[key])
    for path in paths:
        with h5py.File(path) as f:
            assert_units(f, 6)
            assert f["particles/trajectory/position/value"].shape == (12, 4, 3)


def test_round_trip_matches_results(trajectories):
    directory, results = trajectories
    for key in ("cluster", "crystal", "cellrelax"):
        data = h5md.read(directory / f"{key}.h5md")
        result = results[key]
        assert data["step"][0] == 0 and data["step"][-1] == result.steps
        assert len(data["step"]) == result.steps + 1
        np.testing.assert_allclose(data["positions"][-1], result.structure.positions, atol=1e-12)
        # forces are stored in single precision (h5md.SINGLE): 7 significant digits
        np.testing.assert_allclose(data["forces"][-1], result.forces, rtol=1e-6, atol=1e-9)
        assert data["forces"].dtype == np.float32
        assert data["energy"][-1] == pytest.approx(result.energy, abs=1e-12)
        assert data["fmax"][-1] < 1e-3 <= data["fmax"][0]
        assert data["parameters"]["settings"] == {"fmax": 1e-3}
    cell = h5md.read(directory / "cellrelax.h5md")
    np.testing.assert_allclose(cell["cell"][-1], results["cellrelax"].structure.cell, atol=1e-12)
    assert cell["stress"].shape == (len(cell["step"]), 3, 3)
    with h5py.File(directory / "cellrelax.h5md") as f:
        volume = f["observables/volume/value"][()]
    np.testing.assert_allclose(volume, np.abs(np.linalg.det(cell["cell"])))


def test_mdanalysis_opens_with_defaults(trajectories):
    mda = pytest.importorskip("MDAnalysis")
    directory, results = trajectories
    for key in ("cluster", "crystal", "cellrelax"):
        with warnings.catch_warnings():  # plain MDAnalysis warns that it cannot guess masses
            warnings.simplefilter("ignore")  # (test_outputs: molopt.mdanalysis ends that)
            universe = mda.Universe(str(directory / f"{key}.h5md"))
        trajectory = universe.trajectory
        assert len(trajectory) == results[key].steps + 1
        trajectory[-1]
        np.testing.assert_allclose(
            universe.atoms.positions, results[key].structure.positions, atol=1e-4
        )
        # forces in MDAnalysis units (kJ/mol/A) are the eV/A forces times 96.485
        np.testing.assert_allclose(
            trajectory.ts.forces / h5md.EV_TO_KJ_PER_MOL, results[key].forces, atol=1e-5
        )
        assert trajectory.ts.data["potential_energy"] == pytest.approx(results[key].energy)
        if key != "cluster":
            np.testing.assert_allclose(
                trajectory.ts.dimensions[:3],
                np.linalg.norm(results[key].structure.cell, axis=1),
                rtol=1e-5,
            )


def test_abort_leaves_nothing(tmp_path):
    writer = h5md.TrajectoryWriter(tmp_path / "x.h5md", [18], [False] * 3, False)
    writer.append(
        {
            "step": np.array([0]),
            "positions": np.zeros((1, 1, 3)),
            "forces": np.zeros((1, 1, 3)),
            "energy": np.zeros(1),
            "fmax": np.zeros(1),
        }
    )
    writer._flush()  # force a temporary file on disk
    assert any(tmp_path.iterdir())
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_parameters_are_json(tmp_path):
    writer = h5md.TrajectoryWriter(tmp_path / "x.h5md", [18], [False] * 3, False)
    writer.append(
        {
            "step": np.array([0]),
            "positions": np.zeros((1, 1, 3)),
            "forces": np.zeros((1, 1, 3)),
            "energy": np.zeros(1),
            "fmax": np.zeros(1),
        }
    )
    writer.close({"potential_spec": {"kind": "lennard-jones", "sigma": 3.4}, "status": "x"})
    with h5py.File(tmp_path / "x.h5md") as f:
        assert json.loads(f["parameters"].attrs["potential_spec"])["sigma"] == 3.4
    everything = h5md.read_parameters(tmp_path / "x.h5md")
    assert everything["potential_spec"] == {"kind": "lennard-jones", "sigma": 3.4}
    # only the named ones (those present), decoded the same way
    chosen = h5md.read_parameters(tmp_path / "x.h5md", ("potential_spec", "status", "absent"))
    assert chosen == {k: everything[k] for k in ("potential_spec", "status")}


def test_template_gives_the_same_file(tmp_path):
    """A writer that starts from a run's template writes the same groups, arrays and
    attributes as one that builds the file itself."""
    block = {
        "step": np.array([0, 7]),
        "positions": np.arange(12.0).reshape(2, 2, 3),
        "forces": np.ones((2, 2, 3)),
        "energy": np.array([-1.0, -2.0]),
        "fmax": np.array([0.5, 0.01]),
        "cell": np.stack([np.eye(3) * 5.0] * 2),
    }
    common = {"molopt_version": "x", "settings": {"fmax": 1e-3}, "pressure_GPa": 0.0}
    own = {"status": "converged", "steps": 7, "index": -1}
    template = h5md.write_template(tmp_path / "t.tmp", common)
    for name, kwargs, params in (
        ("a.h5md", {}, {**common, **own}),
        ("b.h5md", {"template": template}, own),
    ):
        writer = h5md.TrajectoryWriter(tmp_path / name, [18, 18], [True] * 3, False, **kwargs)
        writer.append(block)
        writer.close(params)

    def contents(path):
        out = {}
        with h5py.File(path) as f:

            def visit(name, obj):
                attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
                data = obj[()].tolist() if isinstance(obj, h5py.Dataset) else None
                out[name] = (attrs, data)

            f.visititems(visit)
            out["/"] = {k: np.asarray(v).tolist() for k, v in f.attrs.items()}
        return out

    assert contents(tmp_path / "a.h5md") == contents(tmp_path / "b.h5md")
    assert h5md.read(tmp_path / "b.h5md")["parameters"]["settings"] == {"fmax": 1e-3}


def test_attributes_and_datasets_stored_as_h5py_stores_them(tmp_path, monkeypatch):
    """The fast attribute, group and dataset writers give the same HDF5 objects as
    ``obj.attrs[k] = v``, ``f.create_group(path)`` and ``group.create_dataset(name,
    data=values)``: types, values, shapes, storage layout, timestamps, fill settings, link
    kinds and name encodings."""
    rng = np.random.default_rng(1)
    block = {
        "step": np.arange(2),
        "positions": rng.normal(size=(2, 3, 3)),
        "forces": rng.normal(size=(2, 3, 3)),
        "energy": rng.normal(size=2),
        "fmax": rng.random(2),
        "cell": np.tile(np.eye(3) * 6.0, (2, 1, 1)),
    }
    parameters = {
        "status": "converged",
        "steps": 12,
        "energy_final": -1.5,
        "relax_cell": False,
        "pressure_GPa": None,
        "settings": {"fmax": 1e-3, "optimizer": "fire"},
        "créé": "ünïcode",
    }

    def write(path):
        writer = h5md.TrajectoryWriter(path, [18] * 3, [True, True, False], False)
        writer.append(block)
        writer.close(parameters)

    write(tmp_path / "fast.h5md")

    def high_level(obj):
        return h5py.Dataset(obj) if isinstance(obj, h5py.h5d.DatasetID) else obj

    def plain_attribute(obj, key, value):
        high_level(obj).attrs[key] = value

    def plain_dataset(parent, name, data):
        return h5py.Group(parent).create_dataset(name, data=data).id

    monkeypatch.setattr(h5md, "_set_attribute", plain_attribute)
    monkeypatch.setattr(h5md, "_new_dataset", plain_dataset)
    monkeypatch.setattr(h5md, "_new_group", lambda f, path: f.create_group(path).id)
    write(tmp_path / "plain.h5md")

    def objects(path):
        found = {}
        with h5py.File(path) as f:

            def visit(name, obj):
                link = f.id.links.get_info(name.encode())
                found[name] = (type(obj).__name__, link.type, link.cset)
                if isinstance(obj, h5py.Dataset):
                    plist = obj.id.get_create_plist()
                    found[name] += (obj.dtype, obj.shape, obj.id.get_type(), obj[()].tolist())
                    found[name] += (plist.get_layout(), plist.get_obj_track_times())
                    found[name] += (plist.get_fill_time(), plist.get_alloc_time())

            f.visititems(visit)
            # hard links: step and time stored once, shared by every element
            first = f["particles/trajectory/position/step"]
            others = ("observables/fmax", "observables/potential_energy")
            found["shared step"] = all(f[f"{n}/step"] == first for n in others)
        return found

    fast_objects = objects(tmp_path / "fast.h5md")
    assert fast_objects == objects(tmp_path / "plain.h5md")
    assert fast_objects["shared step"]
    assert fast_objects["particles/trajectory/force_ev/value"][4] == (2, 3, 3)

    def attributes(path):
        found = {}
        with h5py.File(path) as f:

            def visit(name, obj):
                for key in obj.attrs:
                    stored = obj.attrs.get_id(key)
                    found[(name, key)] = (obj.attrs[key], stored.get_type(), stored.shape)

            f.visititems(visit)
        return found

    fast, plain = attributes(tmp_path / "fast.h5md"), attributes(tmp_path / "plain.h5md")
    assert fast.keys() == plain.keys() and len(fast) >= 15
    for key, (value, htype, shape) in plain.items():
        got, got_type, got_shape = fast[key]
        assert got_type == htype and got_shape == shape, key
        assert type(got) is type(value) and np.array_equal(got, value), key
