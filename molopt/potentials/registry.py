"""Potential files: the shipped ones (``potentials/*.toml``) by name, or any path.

A file is TOML with ``kind`` ("lennard-jones", "neural", "emt", "sevennet"). Loading validates
every field and reports the file and the reason on failure (:class:`~molopt.errors.PotentialError`).
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molopt import elements as el
from molopt.errors import PotentialError

KINDS = ("lennard-jones", "neural", "emt", "sevennet")


def shipped_directories() -> list[Path]:
    """Where shipped potential files live: the source tree, then the installed copy."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "potentials", here.parents[1] / "_data" / "potentials"]
    return [c for c in candidates if c.is_dir()]


@dataclass
class PotentialSpec:
    """A potential file, parsed. ``potential`` is built on first use (it imports JAX)."""

    name: str
    path: Path
    data: dict
    sha256: str
    _potential: object = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def description(self) -> str:
        return str(self.data.get("description", ""))

    @property
    def elements(self) -> tuple[int, ...]:
        """Atomic numbers covered, or () for "every element"."""
        return declared_elements(self.data, self.path)

    def covers(self, numbers) -> bool:
        return not self.elements or set(int(z) for z in numbers) <= set(self.elements)

    @property
    def potential(self):
        if self._potential is None:
            self._potential = build_potential(self.data, self.path)
        return self._potential


def _fail(path, reason):
    raise PotentialError(f"potential file {path}: {reason}")


def read_spec(path: Path, name: str | None = None) -> PotentialSpec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PotentialError(f"potential file {path}: cannot be read ({exc.strerror})") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        _fail(path, f"not valid TOML ({exc})")
    kind = data.get("kind")
    if kind not in KINDS:
        _fail(path, f"'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    digest = hashlib.sha256(raw)
    if kind in ("neural", "sevennet"):
        weights = path.parent / str(data.get("weights", ""))
        if weights.is_file():
            digest.update(weights.read_bytes())
    spec = PotentialSpec(name or path.stem, path, data, digest.hexdigest())
    _ = spec.elements  # validate element names early
    return spec


def shipped() -> dict[str, PotentialSpec]:
    """Every shipped potential by name (first directory wins on a duplicate name)."""
    found: dict[str, PotentialSpec] = {}
    for directory in shipped_directories():
        for path in sorted(directory.glob("*.toml")):
            if path.stem not in found:
                found[path.stem] = read_spec(path)
    return found


def load(name_or_path: str | Path) -> PotentialSpec:
    """A shipped potential by name, or a potential file by path."""
    text = str(name_or_path)
    # a shipped name is read alone: reading them all hashes every shipped weights file
    if Path(text).name == text:
        for directory in shipped_directories():
            if (directory / f"{text}.toml").is_file():
                return read_spec(directory / f"{text}.toml")
    path = Path(text)
    if path.suffix == ".toml" or path.exists():
        if path.is_dir():
            raise PotentialError(f"potential file {path} is a directory, not a potential file")
        if not path.is_file():
            raise PotentialError(f"potential file {path} does not exist")
        return read_spec(path)
    names = ", ".join(sorted(shipped())) or "none"
    raise PotentialError(f"unknown potential {text!r}; shipped potentials: {names}")


def choose(numbers) -> PotentialSpec:
    """The shipped potential whose declared elements cover ``numbers`` (fewest extra
    elements first). Potentials for every element, and those whose card says
    ``implicit = false`` (the universal SevenNet models), are never chosen implicitly."""
    wanted = set(int(z) for z in numbers)
    options = [
        s
        for s in shipped().values()
        if s.elements and wanted <= set(s.elements) and s.data.get("implicit", True)
    ]
    if not options:
        lines = [
            f"  {s.name}: {', '.join(el.symbol(z) for z in s.elements) or 'any element'}"
            for s in shipped().values()
        ]
        have = ", ".join(el.symbol(z) for z in sorted(wanted))
        raise PotentialError(
            f"no shipped potential covers {have}; choose one with --potential. Available:\n"
            + "\n".join(lines)
        )
    return min(options, key=lambda s: (len(s.elements), s.name))


# --- parsing -------------------------------------------------------------------------------


def declared_elements(data: dict, path) -> tuple[int, ...]:
    try:
        if "elements" in data and isinstance(data["elements"], dict):
            return tuple(el.number(k) for k in data["elements"])
        if "elements" in data:
            return tuple(el.number(k) for k in data["elements"])
    except KeyError as exc:
        _fail(path, str(exc.args[0]))
    return ()


def _number(data: dict, key: str, path, positive=True, default=None) -> float:
    value = data.get(key, default)
    if value is None:
        _fail(path, f"missing '{key}'")
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(path, f"'{key}' must be a number (got {value!r})")
    if not np.isfinite(value) or (positive and value <= 0):
        _fail(path, f"'{key}' must be a positive number (got {value!r})")
    return float(value)


def _only_keys(data: dict, path, known: set[str]) -> None:
    """Refuse keys other than ``known`` (and ``kind``/``name``, which every file may have)."""
    unknown = sorted(set(data) - known - {"kind", "name"})
    if unknown:
        _fail(path, f"unknown key(s) {', '.join(unknown)}")


def _flag(data: dict, key: str, path, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        _fail(path, f"'{key}' must be true or false")
    return value


def build_potential(data: dict, path):
    if data["kind"] == "lennard-jones":
        return _build_lennard_jones(data, path)
    if data["kind"] == "emt":
        return _build_emt(data, path)
    if data["kind"] == "sevennet":
        from molopt.potentials.sevennet import load_sevennet

        return load_sevennet(data, Path(path))
    from molopt.potentials.neural.io import load_neural

    return load_neural(data, Path(path))


def _build_emt(data: dict, path):
    """EMT with ASE's parameters for the file's elements (default: all it has)."""
    from molopt.potentials.emt import EMT

    _only_keys(data, path, {"description", "reference", "elements", "asap_cutoff", "cutoff"})
    asap_cutoff = _flag(data, "asap_cutoff", path, default=False)
    try:
        potential = EMT.from_table(declared_elements(data, path) or None, asap_cutoff)
    except ValueError as exc:
        _fail(path, str(exc))
    # the cutoff follows from the elements and the rule; a stated one (shown by `molopt
    # potentials`) must agree with it
    if "cutoff" in data and abs(_number(data, "cutoff", path) - potential.cutoff) > 1e-3:
        _fail(path, f"'cutoff' is {potential.cutoff:.4f} A for these elements and rule")
    return potential


def _build_lennard_jones(data: dict, path):
    import jax.numpy as jnp

    from molopt.potentials.lennard_jones import LennardJones

    known = {
        "kind",
        "name",
        "description",
        "reference",
        "units",
        "epsilon",
        "sigma",
        "cutoff",
        "shift",
        "elements",
        "pairs",
        "mixing",
        "notes",
        "fitted_from",
    }
    _only_keys(data, path, known)
    shift = _flag(data, "shift", path, default=True)
    mixing = data.get("mixing", "lorentz-berthelot")
    if mixing != "lorentz-berthelot":
        _fail(path, f"'mixing' must be 'lorentz-berthelot' (got {mixing!r})")
    table = data.get("elements")
    if isinstance(table, dict):
        symbols = list(table)
        eps, sig = [], []
        for symbol in symbols:
            entry = table[symbol]
            if not isinstance(entry, dict):
                _fail(path, f"[elements.{symbol}] must be a table with epsilon and sigma")
            eps.append(_number(entry, "epsilon", f"{path} [elements.{symbol}]"))
            sig.append(_number(entry, "sigma", f"{path} [elements.{symbol}]"))
        numbers = tuple(el.number(s) for s in symbols)
        default_cutoff = 3.0 * max(sig)
    else:
        numbers = declared_elements(data, path)
        n = len(numbers) or 1
        eps = [_number(data, "epsilon", path)] * n
        sig = [_number(data, "sigma", path)] * n
        default_cutoff = 3.0 * sig[0]
    n = len(eps)
    cutoff = _number(data, "cutoff", path, default=default_cutoff)
    pair_cutoff = np.full((n, n), cutoff)
    override = np.zeros((n, n), bool)
    pair_eps = np.zeros((n, n))
    pair_sig = np.zeros((n, n))
    for k, pair in enumerate(data.get("pairs", [])):
        where = f"{path} [[pairs]] #{k + 1}"
        names = pair.get("elements")
        if not (isinstance(names, list) and len(names) == 2):
            _fail(where, "'elements' must list two element symbols")
        try:
            a, b = (numbers.index(el.number(s)) for s in names)
        except (KeyError, ValueError):
            _fail(where, f"elements {names} are not both in [elements]")
        override[a, b] = override[b, a] = True
        pair_eps[a, b] = pair_eps[b, a] = _number(pair, "epsilon", where)
        pair_sig[a, b] = pair_sig[b, a] = _number(pair, "sigma", where)
        if "cutoff" in pair:
            pair_cutoff[a, b] = pair_cutoff[b, a] = _number(pair, "cutoff", where)
    return LennardJones(
        elements=tuple(numbers),
        cutoff=float(pair_cutoff.max()),
        epsilon=jnp.asarray(eps, dtype=jnp.float64),
        sigma=jnp.asarray(sig, dtype=jnp.float64),
        pair_epsilon=jnp.asarray(pair_eps, dtype=jnp.float64),
        pair_sigma=jnp.asarray(pair_sig, dtype=jnp.float64),
        override=override,
        pair_cutoff=pair_cutoff,
        shift=shift,
    )
