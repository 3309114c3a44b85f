"""Cell-relaxation options on the host, without JAX: which strain components are free (ASE's
``mask``), and target stresses in Voigt order. The settings and the command line parse with
these; :mod:`molopt.optimizers.cell` builds each system's reference from them.

Voigt order is ASE's: ``xx, yy, zz, yz, xz, xy``. Stress follows ASE's sign (positive =
tensile, ``atoms.get_stress()``): a scalar pressure ``p`` is the target stress ``-p`` on the
diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

VOIGT = ("xx", "yy", "zz", "yz", "xz", "xy")
_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
_AXES = {"x": 0, "y": 1, "z": 2}


def voigt_to_matrix(values: Sequence) -> np.ndarray:
    """Six Voigt values -> the symmetric (3, 3) matrix (ASE's ``voigt_6_to_full_3x3``)."""
    matrix = np.zeros((3, 3), np.asarray(values).dtype)
    for value, (i, j) in zip(values, _PAIRS, strict=True):
        matrix[i, j] = matrix[j, i] = value
    return matrix


def parse_mask(text: str) -> tuple[bool, ...]:
    """The free strain components, six Voigt booleans, from ``xx,yy,xy`` (the free
    components by name, any order; ``yx`` is ``xy``) or six 0/1 values in Voigt order
    (``1,1,0,0,0,1``). ValueError saying what is wrong."""
    parts = [p.strip().lower() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("empty cell mask (give the free components, e.g. xx,yy,xy)")
    if all(p in ("0", "1") for p in parts):
        if len(parts) != 6:
            raise ValueError(
                f"a 0/1 cell mask needs six values in Voigt order {','.join(VOIGT)} "
                f"(got {len(parts)})"
            )
        free = tuple(p == "1" for p in parts)
    else:
        chosen = set()
        for p in parts:
            if len(p) != 2 or any(c not in _AXES for c in p):
                raise ValueError(
                    f"unknown cell component '{p}' (components: {', '.join(VOIGT)}; or six "
                    "0/1 values)"
                )
            i, j = sorted(_AXES[c] for c in p)
            chosen.add(_PAIRS.index((i, j)))
        free = tuple(k in chosen for k in range(6))
    check_mask(free)
    return free


def check_mask(free: Sequence[bool]) -> None:
    """ValueError unless the mask frees some component."""
    if not any(free):
        raise ValueError("the cell mask frees no component")


def is_block(mask: np.ndarray) -> bool:
    """Whether a (3, 3) mask's free components form blocks of axes (a free shear ``ij`` with
    ``ii`` and ``jj`` free, and two free shears on three axes with the third): then the
    deformation stays inside the mask at every step and ASE's round trip through the masked
    cell and its matrix logarithm changes nothing but the step's components outside it."""
    m = np.asarray(mask) > 0
    return bool(np.all((m.astype(int) @ m.astype(int) > 0) <= m))


def parse_stress(text: str) -> tuple[float, ...]:
    """Six numbers (Voigt order xx,yy,zz,yz,xz,xy) from ``a,b,c,d,e,f``; ValueError saying
    what is wrong."""
    parts = [p for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if len(parts) != 6:
        raise ValueError(
            f"a target stress needs six values in Voigt order {','.join(VOIGT)} (got {len(parts)})"
        )
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"a target stress needs six numbers (got {text!r})") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"a target stress must be finite (got {text!r})")
    return values


def free_components(free: Sequence[bool] | None, pbc: Sequence[bool]) -> np.ndarray:
    """A system's (3, 3) 0/1 mask: the given free components (all when None) between
    periodic directions only. A slab periodic in x and y gets at most its in-plane cell;
    all zero when nothing is left free."""
    given = np.ones((3, 3), bool) if free is None else voigt_to_matrix(np.asarray(free, bool))
    periodic = np.asarray(pbc, bool)
    return given & np.outer(periodic, periodic)


def mask_names(mask: np.ndarray) -> str:
    """A (3, 3) mask as its free Voigt components, e.g. ``xx,yy,xy``."""
    return ",".join(v for v, (i, j) in zip(VOIGT, _PAIRS, strict=True) if mask[i, j])


@dataclass(frozen=True)
class CellOptions:
    """One structure's cell options (ASE's ``FrechetCellFilter`` arguments): ``mask`` six
    Voigt booleans (None: all free; only components between periodic directions ever are),
    ``pressure`` eV/A^3, ``stress`` six Voigt values eV/A^3 (positive = tensile; added to
    ``-pressure`` on the diagonal), ``hydrostatic`` (``hydrostatic_strain``) and
    ``constant_volume``. A structure may carry its own
    (:attr:`molopt.structure.Structure.cell_options`); the run's settings give the rest."""

    mask: tuple | None = None
    pressure: float = 0.0
    stress: tuple | None = None
    hydrostatic: bool = False
    constant_volume: bool = False

    @classmethod
    def of(cls, settings) -> CellOptions:
        """The cell options of engine settings (:class:`molopt.engine.EngineSettings`: eV/A^3
        and Voigt tuples already)."""
        return cls(
            mask=settings.cell_mask,
            pressure=settings.pressure,
            stress=settings.stress,
            hydrostatic=settings.hydrostatic,
            constant_volume=settings.constant_volume,
        )

    def target(self) -> np.ndarray:
        """The (3, 3) target stress, eV/A^3, ASE's sign."""
        target = -float(self.pressure) * np.eye(3)
        if self.stress is not None:
            target = target + voigt_to_matrix(np.asarray(self.stress, np.float64))
        return target
