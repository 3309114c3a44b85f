import os

# Each xdist worker is one of two processes on CI's two cores. OpenBLAS's threads spin while
# they wait for work, and with two processes each running its own pool of them beside XLA's
# threads, the ASE reference relaxations ran 2.5-4x slower than alone (test_constraints.py:
# 63 s alone, 158 s beside test_cell_options.py; 83 s for both with one OpenBLAS thread).
# It must be set before numpy loads OpenBLAS; a value the caller chose is kept.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

os.environ.setdefault(
    "MOLOPT_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".molopt-cache")
)

import molopt._jax  # noqa: E402  (x64 on for every test)
from molopt.structure import make_structure  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "data", "examples")


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
    """A test session compiles hundreds of programs; XLA:CPU maps each into memory and Linux
    caps a process's mappings (vm.max_map_count). Past a third of it, compiled code is dropped
    between tests (the session crashed inside XLA at the cap before this)."""
    yield
    molopt._jax.relieve_mapping_pressure(fraction=0.3)


@pytest.fixture(scope="session")
def argon():
    from molopt.potentials.registry import load

    return load("argon").potential


def structure_from_atoms(atoms):
    from molopt.io.read import from_atoms

    return from_atoms(atoms)


def rattled_cluster(n=13, seed=0, spacing=3.8):
    """n argon atoms on a jittered cubic grid (no overlaps)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])
    pos = grid[:n] * spacing + rng.uniform(-0.3, 0.3, (n, 3))
    return make_structure([18] * n, pos)
