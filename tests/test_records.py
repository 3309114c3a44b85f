"""What each JSON record says about how a relaxation ended: why it stopped, and the final cell
of a periodic structure."""

import json

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.units import GPa
from conftest import rattled_cluster
from typer.testing import CliRunner

from molopt.cli import app
from molopt.engine import EngineSettings, relax_structures
from molopt.engine.state import Status
from molopt.io import h5md
from molopt.potentials.base import Potential
from molopt.potentials.registry import load


class Hole(Potential):
    """A potential with a hole: every atom is pulled away from the origin forever, so the
    energy falls without bound (as a learned potential can far from its data)."""

    def energy(self, positions, cell, batch, nbrs):
        import jax.numpy as jnp

        from molopt.batch import system_sum

        per_atom = jnp.where(batch.atom_mask, -jnp.sum(positions**2, axis=1), 0.0)
        return system_sum(per_atom, batch.system_idx, cell.shape[0])


def test_stop_reasons():
    argon = load("argon").potential
    cluster = rattled_cluster(13, seed=1)
    converged, limited = (
        relax_structures([(0, cluster)], argon, EngineSettings(fmax=1e-3, steps=s))[0]
        for s in (10_000, 3)
    )
    assert (converged.status, converged.stop_reason) == ("converged", "converged")
    assert (limited.status, limited.stop_reason) == ("not_converged", "step_limit")
    settings = EngineSettings(fmax=1e-3, steps=100_000, explode_energy=50.0)
    (exploded,) = relax_structures([(0, cluster)], Hole(elements=(), cutoff=3.0), settings)
    assert (exploded.status, exploded.stop_reason) == ("failed", "exploded")
    assert exploded.energy < -50.0 * 13 and exploded.steps < 1000  # stopped early
    assert "exploded" in exploded.error and "eV/atom" in exploded.error
    assert Status.FAILED.stop_reason == "non_finite"  # the NaN case: tests/test_batch.py


def test_records_give_the_final_cell_and_pressure(tmp_path):
    crystal = bulk("Ar", "fcc", a=5.3) * (2, 2, 2)
    crystal.rattle(0.05, seed=2)
    ase.io.write(tmp_path / "ar.extxyz", crystal)
    ase.io.write(tmp_path / "cluster.xyz", crystal[:5].copy(), format="xyz")
    result = CliRunner().invoke(
        app, ["relax", str(tmp_path), "-o", str(tmp_path / "o"), "--json", "-p", "argon"]
    )
    recs = {r["input"].rsplit("/", 1)[1]: r for r in map(json.loads, result.stdout.splitlines())}
    rec = recs["ar.extxyz"]
    relaxed = ase.io.read(tmp_path / "o" / "ar.extxyz")
    np.testing.assert_allclose(rec["cell_lengths"], relaxed.cell.lengths(), rtol=1e-12)
    np.testing.assert_allclose(rec["cell_angles"], relaxed.cell.angles(), rtol=1e-12)
    assert rec["volume"] == pytest.approx(relaxed.get_volume(), rel=1e-12)
    pressure = -np.trace(relaxed.get_stress(voigt=False)) / 3 / GPa
    assert rec["pressure_final_GPa"] == pytest.approx(pressure, rel=1e-9)
    params = h5md.read_parameters(tmp_path / "o" / "ar.h5md")
    assert params["pressure_final_GPa"] == rec["pressure_final_GPa"]
    assert params["pressure_GPa"] == 0.0  # the setting (a target), not overwritten
    assert rec["stop_reason"] == "converged"
    assert "cell_lengths" not in recs["cluster.xyz"]  # molecules have no cell
