"""Run settings: dataclass defaults < ``--config`` file (a path, or the name of a preset in
``configs/``) < command-line flags. Frozen once built; every value validated with a message
that names its source."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from molopt.errors import ConfigError
from molopt.optimizers import NAMES as OPTIMIZER_NAMES
from molopt.optimizers import option_names
from molopt.optimizers.cell_options import mask_names, parse_mask, parse_stress, voigt_to_matrix

#: 1 GPa in eV/A^3
GPA = 1.0 / 160.21766208


@dataclass(frozen=True)
class RunSettings:
    """Everything ``molopt relax`` does, in one frozen value (units: eV, A, GPa)."""

    potential: str | None = None
    optimizer: str = "fire"
    fmax: float = 0.05
    steps: int = 10_000
    relax_cell: bool = False
    pressure: float = 0.0  # GPa, variable cell only
    # variable cell only: free strain components ("xx,yy,xy" or six 0/1 in Voigt order),
    # ASE's hydrostatic_strain and constant_volume, a target stress (six Voigt values, GPa,
    # positive = tensile as ASE reports stress)
    cell_mask: str | None = None
    hydrostatic: bool = False
    constant_volume: bool = False
    stress: str | None = None
    precision: str = "float64"
    out_dir: str = "."
    json: bool = False
    index: str | None = None
    overwrite: bool = False
    shard: str | None = None
    recursive: bool = False
    batch_size: int = 1024
    #: atoms per batch (None: the potential's on this device, 32,768 unless it says)
    max_batch_atoms: int | None = None
    trajectory_interval: int = 1
    #: A, Verlet skin of the neighbour lists (None: the potential's, 1.0 unless it says)
    skin: float | None = None
    chunk: int = 64
    check_hessian: bool = False
    #: the memory a batch may need, e.g. "8G", "512M" (None: a safe share of the device's)
    max_memory: str | None = None
    #: Dask (molopt.cluster): "local:N" or slurm/pbs/lsf/sge, or a running scheduler's
    #: address; the config file's [cluster] table (dask-jobqueue's options and jobs,
    #: minimum_jobs, maximum_jobs); seconds to wait for the scheduler and a first worker
    cluster: str | None = None
    scheduler: str | None = None
    cluster_options: dict = field(default_factory=dict)
    cluster_timeout: float = 60.0
    #: atoms to fix in every structure (``--fix``: indices, ranges, element:X, z<h terms)
    fix: str | None = None
    #: keep each structure's space group (ASE FixSymmetry) at tolerance ``symprec`` (A)
    fix_symmetry: bool = False
    #: refine each relaxed structure to its space group
    symmetrize: bool = False
    symprec: float = 0.01
    optimizer_options: dict = field(default_factory=dict)

    def result_settings(self) -> dict:
        """The settings that change results (part of each structure's run identity)."""
        return {
            "optimizer": self.optimizer,
            "optimizer_options": dict(sorted(self.optimizer_options.items())),
            "fmax": self.fmax,
            "steps": self.steps,
            "relax_cell": self.relax_cell,
            "pressure": self.pressure if self.relax_cell else 0.0,
            **self.cell_options(),
            "precision": self.precision,
            "trajectory_interval": self.trajectory_interval,
            "check_hessian": self.check_hessian,
            **self.symmetry_options(),
        }

    def symmetry_options(self) -> dict:
        """``--fix``, ``--fix-symmetry``, ``--symmetrize`` (with ``symprec``) when set; unset
        ones are left out, so runs from before they existed keep their identity."""
        out: dict = {}
        if self.fix:
            out["fix"] = self.fix
        if self.fix_symmetry:
            out["fix_symmetry"] = True
        if self.symmetrize:
            out["symmetrize"] = True
        if out.get("fix_symmetry") or out.get("symmetrize"):
            out["symprec"] = self.symprec
        return out

    def cell_options(self) -> dict:
        """The cell options that are set, normalized (``1,1,0,0,0,1`` is ``xx,yy,xy``); unset
        ones are left out, so runs from before they existed keep their identity."""
        if not self.relax_cell:
            return {}
        values = {
            "cell_mask": self.cell_mask and mask_names(voigt_to_matrix(parse_mask(self.cell_mask))),
            "hydrostatic": self.hydrostatic,
            "constant_volume": self.constant_volume,
            "stress": self.stress and list(parse_stress(self.stress)),
        }
        return {k: v for k, v in values.items() if v}

    def shard_pair(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        i, n = self.shard.split("/")
        return int(i), int(n)


FIELDS = {f.name: f for f in dataclasses.fields(RunSettings)}


def preset_directories() -> list[Path]:
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "configs", here.parent / "_data" / "configs"]
    return [c for c in candidates if c.is_dir()]


#: The commands whose settings files live in ``configs/``, each with the file-name prefix
#: of its presets (relax presets have none) and how its settings file is named in messages.
PRESET_KINDS = {
    "relax": ("", "config", "molopt relax --config"),
    "train": ("train-", "training config", "molopt train --config"),
    "fit": ("fit-", "fit config", "molopt fit"),
}


def preset_kind(name: str) -> str:
    """Which command a preset named ``name`` (a file stem in ``configs/``) is for."""
    for kind, (prefix, _, _) in PRESET_KINDS.items():
        if prefix and name.startswith(prefix):
            return kind
    return "relax"


def presets(kind: str = "relax") -> dict[str, Path]:
    """The presets in ``configs/`` for the command ``kind`` (:data:`PRESET_KINDS`), by name:
    a relax config never lists training or fit settings, nor they relax settings."""
    found: dict[str, Path] = {}
    for directory in preset_directories():
        for path in sorted(directory.glob("*.toml")):
            if preset_kind(path.stem) == kind:
                found.setdefault(path.stem, path)
    return found


def config_path(name_or_path: str, kind: str = "relax") -> Path:
    """The settings file for the command ``kind``: a path, or the name of one of its presets.
    ConfigError naming the reason: no such file or preset (listing the presets), a
    directory, or a preset of another command."""
    _, what, _ = PRESET_KINDS[kind]
    path = Path(name_or_path)
    if path.is_dir():
        raise ConfigError(f"{what} {name_or_path}: is a directory, not a settings file")
    known = presets(kind)
    shipped = {p.resolve() for d in preset_directories() for p in d.glob("*.toml")}
    if path.is_file() and path.resolve() not in shipped:
        return path
    name = path.stem if path.is_file() else name_or_path  # a file of configs/ by its name
    if name in known:
        return known[name]
    other = preset_kind(name)
    if other != kind and name in presets(other):
        raise ConfigError(
            f"{what} {name_or_path}: is a preset for {PRESET_KINDS[other][2]}, "
            f"not for {PRESET_KINDS[kind][2]} (presets: {', '.join(sorted(known)) or 'none'})"
        )
    names = ", ".join(sorted(known)) or "none"
    raise ConfigError(f"{what} {name_or_path}: no such file or preset (presets: {names})")


def read_config(name_or_path: str) -> dict:
    """Settings from a TOML file (top level or a [relax] table); ``[optimizer]`` holds
    optimizer options."""
    path = config_path(name_or_path, "relax")
    data = read_toml(path, "config")
    if isinstance(data.get("relax"), dict):
        data = {**{k: v for k, v in data.items() if k != "relax"}, **data["relax"]}
    values: dict = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "optimizer" and isinstance(value, dict):
            values["optimizer_options"] = dict(value)
            continue
        if name == "cluster" and isinstance(value, dict):  # [cluster]: kind = "slurm", ...
            table = dict(value)
            if "kind" in table:
                values["cluster"] = table.pop("kind")
            values["cluster_options"] = table
            continue
        if name not in FIELDS or name in ("optimizer_options", "cluster_options"):
            if name in ("description", "notes"):
                continue
            raise ConfigError(f"config {path}: unknown setting '{key}'")
        values[name] = value
    values["_source"] = str(path)
    return values


def read_toml(path, what: str) -> dict:
    """A TOML file as a dict; ConfigError naming ``what``, the file and the reason when it
    cannot be read: missing, a directory, not readable, not text, or not valid TOML."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not a settings file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file (TOML expected)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path}: not valid TOML ({exc})") from None
    where = _non_finite(data)
    if where:
        raise ConfigError(f"{what} {path}: '{where}' must be a finite number (nan or inf given)")
    return data


def _non_finite(value, where: str = "") -> str | None:
    """The key (``table.key``, ``list[k]``) of the first NaN or infinite number in TOML data,
    or None: no setting of molopt's commands has a meaning for them."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}[{k}]", v) for k, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _non_finite(item, key)
        if found:
            return found
    return None


def reject_unknown(data: dict, known, path, what: str) -> None:
    """ConfigError listing the keys of ``data`` that are not in ``known``."""
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{what} {path}: unknown setting(s) {', '.join(unknown)}")


#: Flags that set one optimizer option: they update the config's ``[optimizer]`` table key by
#: key (an option the file sets and the flag does not is kept).
OPTION_FLAGS = ("maxstep", "dmax")


def build(config: str | None = None, **flags) -> RunSettings:
    """Merge: defaults < config file < flags (flags that are None are not given). Flags are
    settings (:data:`FIELDS`) or optimizer options (:data:`OPTION_FLAGS`); an invalid option
    flag is reported as coming from the command line."""
    options = {k: flags.pop(k) for k in OPTION_FLAGS if k in flags}
    settings = _merge(config, flags)
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return settings
    values = {name: getattr(settings, name) for name in FIELDS}
    values["optimizer_options"] = {**settings.optimizer_options, **options}
    return validate(values, "command line")


def _merge(config: str | None, flags: dict) -> RunSettings:
    values: dict = {}
    source = "command line"
    if config:
        values = read_config(config)
        source = values.pop("_source")
    for key, value in flags.items():
        if value is not None:
            if key not in FIELDS:
                raise ConfigError(f"unknown setting '{key}'")
            values[key] = value
    return validate(values, source)


def _type_check(name, value, source):
    expected = FIELDS[name].type
    ok = {
        "str | None": isinstance(value, str) or value is None,
        "str": isinstance(value, str),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "float | None": value is None
        or (isinstance(value, int | float) and not isinstance(value, bool)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "int | None": value is None or (isinstance(value, int) and not isinstance(value, bool)),
        "bool": isinstance(value, bool),
        "dict": isinstance(value, dict),
    }.get(expected, True)
    if not ok:
        raise ConfigError(f"{source}: '{name}' must be {expected} (got {value!r})")


def parse_index(text: str) -> int | slice:
    """An ASE index expression (``3``, ``-1``, ``::10``, ``2:8:2``) as an int or a slice.
    ValueError saying what is expected when ``text`` is not one."""
    parts = str(text).strip().split(":")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        numbers = None
    if numbers is None or len(parts) > 3 or (len(parts) == 1 and numbers[0] is None):
        raise ValueError(
            f"{text!r} is not a frame index: expected N, -N or a slice START:STOP:STEP "
            "(e.g. 0, -1, ::10)"
        )
    if len(parts) == 1:
        return numbers[0]
    if len(parts) == 3 and numbers[2] == 0:
        raise ValueError(f"{text!r}: a slice step cannot be zero")
    return slice(*numbers)


def _check_finite(values: dict, source: str) -> None:
    """ConfigError for a NaN or infinite number among the settings and optimizer options:
    no setting of molopt has a meaning for them (``fmax inf`` would converge at step 0)."""
    numbers = dict(values)
    numbers.update(values.get("optimizer_options") or {})
    for name, value in numbers.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: '{name}' must be a finite number (got {value})")


def _check_cell_options(s: RunSettings, source: str) -> None:
    given = [n for n in ("cell_mask", "hydrostatic", "constant_volume", "stress") if getattr(s, n)]
    if given and not s.relax_cell:
        raise ConfigError(f"{source}: {', '.join(given)}: only with relax_cell")
    try:
        if s.cell_mask is not None:
            parse_mask(s.cell_mask)
        if s.stress is not None:
            parse_stress(s.stress)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if s.stress is not None and s.pressure:
        raise ConfigError(
            f"{source}: give pressure or stress, not both (pressure p is stress -p,-p,-p,0,0,0)"
        )
    if s.hydrostatic and s.constant_volume:
        raise ConfigError(
            f"{source}: hydrostatic and constant_volume together leave the cell nothing to relax"
        )


#: dask-jobqueue's cluster class for each ``--cluster`` name (molopt.cluster)
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster", "sge": "SGECluster"}


def parse_cluster(text: str) -> tuple[str, int]:
    """("local", N) for ``local:N``; (kind, 0) for a scheduler kind; ValueError otherwise."""
    text = str(text).strip().lower()
    if text.startswith("local"):
        _, _, n = text.partition(":")
        try:
            workers = int(n) if n else os.cpu_count() or 1
        except ValueError:
            raise ValueError(f"local:N needs a number of workers (got {text!r})") from None
        if workers < 1:
            raise ValueError(f"local:N needs at least one worker (got {text!r})")
        return "local", workers
    if text in JOBQUEUE:
        return text, 0
    kinds = ", ".join(["local:N", *JOBQUEUE])
    raise ValueError(f"must be one of {kinds} (got {text!r})")


_MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """Bytes from "8G", "512M", "1.5GiB", "2048" (binary units)."""
    value = str(text).strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _MEMORY_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise ValueError(f"must be a size such as 8G or 512M (got {text!r})") from None
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(f"must be a positive size (got {text!r})")
    return int(number * _MEMORY_UNITS[unit])


def validate(values: dict, source: str = "settings") -> RunSettings:
    for name, value in values.items():
        _type_check(name, value, source)
    _check_finite(values, source)
    settings = RunSettings(**values)
    s = settings
    if s.optimizer not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"{source}: optimizer must be one of {', '.join(OPTIMIZER_NAMES)} (got {s.optimizer!r})"
        )
    valid = option_names(s.optimizer) if s.optimizer_options else frozenset()
    unknown = set(s.optimizer_options) - valid
    if unknown:
        raise ConfigError(
            f"{source}: option(s) {', '.join(sorted(unknown))} do not apply to {s.optimizer} "
            f"(valid: {', '.join(sorted(valid))})"
        )
    for key, value in s.optimizer_options.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{source}: optimizer option '{key}' must be a positive number")
    if not s.fmax > 0:
        raise ConfigError(f"{source}: fmax must be positive (got {s.fmax})")
    if s.steps < 0:
        raise ConfigError(f"{source}: steps must be >= 0 (got {s.steps})")
    if s.precision not in ("float64", "float32"):
        raise ConfigError(f"{source}: precision must be float64 or float32 (got {s.precision!r})")
    too_few = s.max_batch_atoms is not None and s.max_batch_atoms < 1
    if s.batch_size < 1 or too_few or s.chunk < 1:
        raise ConfigError(f"{source}: batch_size, max_batch_atoms and chunk must be >= 1")
    if s.trajectory_interval < 0:
        raise ConfigError(f"{source}: trajectory_interval must be >= 0")
    if s.skin is not None and not s.skin > 0:
        raise ConfigError(f"{source}: skin must be positive (got {s.skin})")
    if s.pressure and not s.relax_cell:
        raise ConfigError(f"{source}: pressure applies only with relax_cell")
    _check_cell_options(s, source)
    if s.cluster is not None:
        try:
            parse_cluster(s.cluster)
        except ValueError as exc:
            raise ConfigError(f"{source}: cluster {exc}") from None
    if s.cluster and s.scheduler:
        raise ConfigError(f"{source}: give cluster or scheduler, not both")
    if s.cluster_options and not s.cluster:
        raise ConfigError(f"{source}: a [cluster] table needs cluster = slurm|pbs|lsf|sge")
    if not s.cluster_timeout > 0:
        raise ConfigError(f"{source}: cluster_timeout must be positive")
    if s.max_memory is not None:
        try:
            parse_memory(s.max_memory)
        except ValueError as exc:
            raise ConfigError(f"{source}: max_memory {exc}") from None
    if not s.symprec > 0:
        raise ConfigError(f"{source}: symprec must be positive (got {s.symprec})")
    if s.fix:
        from molopt.constraints import parse_fix

        try:
            parse_fix(s.fix)
        except ValueError as exc:
            raise ConfigError(f"{source}: fix {exc}") from None
    if s.index is not None:
        try:
            parse_index(s.index)
        except ValueError as exc:
            raise ConfigError(f"{source}: index {exc}") from None
    if s.shard is not None:
        try:
            i, n = (int(p) for p in s.shard.split("/"))
        except ValueError:
            raise ConfigError(
                f"{source}: shard must look like I/N, e.g. 0/4 (got {s.shard!r})"
            ) from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"{source}: shard I/N needs 0 <= I < N (got {s.shard!r})")
    return settings
