"""The relaxation engine: many structures relaxed together in padded, jit-compiled batches.

    state.py         the state types (each field's scope declared), Status, Program, Targets
    kernel.py        the one jit boundary: initial_state, advance, evaluate_once
    settings.py      EngineSettings (how to relax), chunk_for
    policy.py        batching decisions as pure functions: admission, refill, compaction
    memory.py        memory estimates of structures and batches (before anything is built)
    transplant.py    moving running systems between batches, driven by the declared scopes
    reporting.py     frames and results to a sink; RelaxResult, Sink
    scheduler.py     the host loop (Engine) and its hook after a system converges
    single_point.py  energy/forces/stress of structures in one batch

Nothing here imports the analysis above it (implicit gradients, Hessians, the saddle escape,
fitting), the IO at the edges (ASE, h5py) or the command line.
"""

from molopt.engine.kernel import advance, evaluate_once, initial_state
from molopt.engine.reporting import NullSink, RelaxResult, Sink
from molopt.engine.scheduler import AfterConverged, Engine, relax_structures
from molopt.engine.settings import EngineSettings, chunk_for
from molopt.engine.single_point import evaluate_structures
from molopt.engine.state import Status

__all__ = [
    "AfterConverged",
    "Engine",
    "EngineSettings",
    "NullSink",
    "RelaxResult",
    "Sink",
    "Status",
    "advance",
    "chunk_for",
    "evaluate_structures",
    "evaluate_once",
    "initial_state",
    "relax_structures",
]
