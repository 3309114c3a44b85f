"""Fitting a potential's parameters to properties of relaxed structures (``molopt fit``).

Targets are measured on structures relaxed with the current parameters; their gradients
come from implicit differentiation of the relaxations (:mod:`molopt.analysis.implicit`), so a
fit step costs a few relaxations and linear solves, never an unrolled optimization. The
parameters (per-element Lennard-Jones epsilon and sigma) are fitted in log space (they stay
positive) with optax's Adam.

Target kinds (TOML ``[[targets]]``):
  lattice_constant  structure = "fcc"|"bcc"|"sc"|"diamond", element, value (A)
  cohesive_energy   structure, element, value (eV/atom; an isolated atom has energy 0)
  bond_length       file (any ASE format) or molecule (ASE's G2 name), atoms = [i, j], value (A)
  angle             file|molecule, atoms = [i, j, k], value (degrees)
  relative_energy   files = [a, b] (relaxed E_a - E_b, eV), value
  data              files = [...]: labelled energies/forces (mean-squared error, eV, eV/A)
Each target has a ``weight`` (default 1) and is scaled by its value's magnitude.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molopt.config import read_toml, reject_unknown
from molopt.errors import ConfigError
from molopt.io.atomic import write_atomically

KINDS = ("lattice_constant", "cohesive_energy", "bond_length", "angle", "relative_energy", "data")


@dataclass
class FitConfig:
    potential: str
    parameters: tuple = ("epsilon", "sigma")
    targets: list = field(default_factory=list)
    steps: int = 150
    learning_rate: float = 0.02
    tolerance: float = 1e-10  # stop when the loss falls below
    fmax: float = 1e-7
    output: str | None = None
    source: str = ""

    @classmethod
    def from_toml(cls, path) -> FitConfig:
        data = read_toml(path, "fit config")
        known = {f.name for f in dataclasses.fields(cls)} | {"description", "notes", "references"}
        reject_unknown(data, known, path, "fit config")
        if "potential" not in data:
            raise ConfigError(f"fit config {path}: missing 'potential'")
        targets = data.get("targets", [])
        if not targets:
            raise ConfigError(f"fit config {path}: no [[targets]]")
        for k, t in enumerate(targets):
            if t.get("kind") not in KINDS:
                raise ConfigError(
                    f"fit config {path}: target {k + 1} kind must be one of "
                    f"{', '.join(KINDS)} (got {t.get('kind')!r})"
                )
            if t["kind"] != "data" and "value" not in t:
                raise ConfigError(f"fit config {path}: target {k + 1} has no value")
        values = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        values["parameters"] = tuple(values.get("parameters", ("epsilon", "sigma")))
        bad = set(values["parameters"]) - {"epsilon", "sigma"}
        if bad:
            raise ConfigError(f"fit config {path}: can fit epsilon and sigma (not {bad})")
        return cls(**values, source=str(path))


def _structure_for(target: dict, base: Path):
    from ase.build import bulk, molecule

    from molopt.io.read import from_atoms

    if "structure" in target:
        lattice = float(target.get("guess", target.get("value", 5.0)))
        kind = target["structure"]
        atoms = bulk(target["element"], kind, a=lattice, cubic=True)
    elif "molecule" in target:
        atoms = molecule(target["molecule"])
    else:
        import ase.io

        atoms = ase.io.read(base / target["file"])
    return from_atoms(atoms, str(target.get("file", target.get("molecule", "bulk"))))


class Fit:
    def __init__(self, config: FitConfig):
        import jax.numpy as jnp

        from molopt.potentials.lennard_jones import LennardJones
        from molopt.potentials.registry import load

        self.config = config
        self.base = Path(config.source).parent if config.source else Path(".")
        try:
            self.spec = load(config.potential)
        except Exception as exc:
            raise ConfigError(str(exc)) from exc
        self.potential = self.spec.potential
        if not isinstance(self.potential, LennardJones):
            raise ConfigError("molopt fit adjusts Lennard-Jones potentials (epsilon, sigma)")
        self.log_params = {
            name: jnp.log(getattr(self.potential, name)) for name in config.parameters
        }
        # every distinct structure is relaxed once per step, all of one kind in one batch
        self.unique: dict[tuple, object] = {}
        self.targets = []
        for t in config.targets:
            t = dict(t)
            cell = t["kind"] in ("lattice_constant", "cohesive_energy")
            if t["kind"] == "relative_energy":
                specs = [{"file": f} for f in t["files"]]
            elif t["kind"] == "data":
                from molopt.training.data import read_labelled

                t["_data"] = read_labelled([self.base / f for f in t["files"]])
                specs = []
            else:
                spec = {k: t[k] for k in ("structure", "element", "molecule", "file") if k in t}
                if "structure" in t:
                    spec["a"] = t.get("guess", t.get("value"))
                specs = [spec]
            t["_keys"] = []
            for spec in specs:
                key = (cell, tuple(sorted((k, str(v)) for k, v in spec.items())))
                if key not in self.unique:
                    spec = dict(spec)
                    if "a" in spec:
                        spec["guess"] = spec.pop("a")
                    self.unique[key] = _structure_for(spec, self.base)
                t["_keys"].append(key)
            self.targets.append(t)

    def potential_for(self, log_params):
        import jax.numpy as jnp

        values = {name: jnp.exp(v) for name, v in log_params.items()}
        return dataclasses.replace(self.potential, **values)

    def predictions(self, log_params) -> list:
        """Each target's predicted value (JAX scalars, differentiable)."""
        import jax.numpy as jnp

        from molopt.analysis.implicit import relax_implicit

        potential = self.potential_for(log_params)
        relaxed = {}
        for cell in (True, False):
            keys = [k for k in self.unique if k[0] == cell]
            if keys:
                results = relax_implicit(
                    potential,
                    [self.unique[k] for k in keys],
                    relax_cell=cell,
                    fmax=self.config.fmax,
                )
                relaxed.update(zip(keys, results, strict=True))
        out = []
        for t in self.targets:
            kind = t["kind"]
            if kind in ("lattice_constant", "cohesive_energy"):
                r = relaxed[t["_keys"][0]]
                if kind == "lattice_constant":
                    out.append(jnp.mean(jnp.linalg.norm(r.cell, axis=1)))
                else:
                    out.append(r.energy / r.positions.shape[0])
            elif kind in ("bond_length", "angle"):
                r = relaxed[t["_keys"][0]]
                idx = t["atoms"]
                if kind == "bond_length":
                    out.append(jnp.linalg.norm(r.positions[idx[1]] - r.positions[idx[0]]))
                else:
                    a = r.positions[idx[0]] - r.positions[idx[1]]
                    b = r.positions[idx[2]] - r.positions[idx[1]]
                    cosine = jnp.dot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b)
                    out.append(jnp.degrees(jnp.arccos(jnp.clip(cosine, -1.0, 1.0))))
            elif kind == "relative_energy":
                ra, rb = (relaxed[k] for k in t["_keys"])
                out.append(ra.energy - rb.energy)
            else:
                out.append(self._data_error(potential, t["_data"]))
        return out

    @staticmethod
    def _data_error(potential, data):
        import jax
        import jax.numpy as jnp

        from molopt.analysis.implicit import Problem

        total = 0.0
        for d in data:
            problem = Problem(d.structure, potential, False, 0.0)
            problem.set_base(d.structure.positions, d.structure.cell, potential)
            cell = jnp.asarray(d.structure.cell)
            energy, grad = jax.value_and_grad(
                lambda x, problem=problem, cell=cell: problem.energy_at(x, cell, potential)
            )(jnp.asarray(d.structure.positions))
            n = d.structure.n_atoms
            total = total + ((energy - d.energy) / n) ** 2 + jnp.mean((-grad - d.forces) ** 2)
        return total / len(data)

    def loss(self, log_params):
        import jax.numpy as jnp

        loss = 0.0
        for t, value in zip(self.targets, self.predictions(log_params), strict=True):
            weight = float(t.get("weight", 1.0))
            if t["kind"] == "data":
                loss = loss + weight * value
            else:
                scale = max(abs(float(t["value"])), 1e-3)
                loss = loss + weight * ((value - float(t["value"])) / scale) ** 2
        return jnp.asarray(loss)

    def report(self, log_params) -> list[dict]:
        rows = []
        for t, value in zip(self.targets, self.predictions(log_params), strict=True):
            rows.append(
                {
                    "kind": t["kind"],
                    "target": t.get("value"),
                    "predicted": float(value),
                    "what": t.get("element")
                    or t.get("molecule")
                    or t.get("file")
                    or ", ".join(t.get("files", [])),
                }
            )
        return rows

    def run(self, progress=None) -> dict:
        import jax
        import optax

        optimizer = optax.adam(self.config.learning_rate)
        params = self.log_params
        state = optimizer.init(params)
        before = self.report(params)
        started = time.perf_counter()
        history = []
        for step in range(self.config.steps):
            value, grads = jax.value_and_grad(self.loss)(params)
            history.append(float(value))
            if progress:
                progress(step, float(value), {k: np.exp(np.asarray(v)) for k, v in params.items()})
            if value < self.config.tolerance:
                break
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        self.log_params = params
        return {
            "before": before,
            "after": self.report(params),
            "loss": history,
            "parameters": {k: np.exp(np.asarray(v)).tolist() for k, v in params.items()},
            "wall_time_s": time.perf_counter() - started,
        }

    def write(self, path: Path) -> Path:
        """The fitted potential as a potential file (same form as the input)."""
        import tomli_w

        data = dict(self.spec.data)
        fitted = {k: np.exp(np.asarray(v)) for k, v in self.log_params.items()}
        elements = data.get("elements")
        if isinstance(elements, dict):
            for k, symbol in enumerate(elements):
                for name, values in fitted.items():
                    data["elements"][symbol][name] = float(values[k])
        else:
            for name, values in fitted.items():
                data[name] = float(values[0])
        data["description"] = f"{data.get('description', '')} (fitted by molopt fit)".strip()
        data["fitted_from"] = str(self.spec.path)
        path = Path(path)
        text = tomli_w.dumps(data)
        return write_atomically(path, lambda tmp: tmp.write_text(text))
