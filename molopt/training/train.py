"""Training a PaiNN potential, or fine-tuning one or SevenNet (``init``): per-element
reference energies by least squares (fine-tuning: optionally refitted offsets), then Adam
(optax) on a weighted energy/force/stress loss with a warm-up + cosine learning-rate schedule,
early stopping on the validation loss, checkpoints every few epochs (and ``resume``), and the
best model written as a potential file with its model card. Seeded and reproducible for a
given machine and JAX version: batches, initial weights and splits all come from ``seed``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from molopt import interrupt
from molopt.errors import ConfigError
from molopt.linalg3 import det3
from molopt.training.data import Batcher, Labelled, prefetched, split


@dataclass(frozen=True)
class TrainConfig:
    name: str = "nn-potential"
    reference_method: str = "unknown"
    elements: tuple = ()  # symbols; default: every element in the data
    cutoff: float = 5.0
    n_features: int = 64
    n_radial: int = 20
    n_layers: int = 3
    epochs: int = 200
    max_time_s: float = 3600.0
    time_budget_s: float = 0.0  # >0: after epoch 1, cut epochs to fit this budget
    batch_atoms: int = 256
    batch_structures: int = 16
    learning_rate: float = 2e-3
    final_learning_rate: float = 2e-5
    warmup_steps: int = 200
    energy_weight: float = 1.0  # on (eV/atom)^2
    force_weight: float = 50.0  # on (eV/A)^2
    force_loss: str = "mse"  # "mse", or "huber": quadratic below huber_delta, linear above
    huber_delta: float = 0.05  # eV/A, per force component
    stress_weight: float = 0.0  # on (eV/A^3)^2
    gradient_clip: float = 10.0
    # >0: validate, keep and write an exponential moving average of the weights (decay per
    # step, ramped up as (1 + step) / (10 + step) early on), not the raw weights
    ema_decay: float = 0.0
    # fine-tuning (--init): first shift each element's energy so that the model's energies fit
    # the data's by least squares (data from another method or code has other zero levels)
    refit_energy_offsets: bool = False
    valid_fraction: float = 0.1
    patience: int = 40  # epochs without validation improvement
    checkpoint_every: int = 5
    keep: str = "best"  # "best": lowest validation loss; "last": the final epoch's model
    seed: int = 0
    precision: str = "float32"
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # the keys a TOML file set (from_toml); () for a config built in code: every field counts
    explicit: tuple = ()

    @classmethod
    def from_toml(cls, path) -> TrainConfig:
        from molopt.config import read_toml, reject_unknown

        data = read_toml(path, "training config")
        data = data.get("train", data)
        known = set(cls.__dataclass_fields__) - {"explicit", "extra"}
        reject_unknown(data, known | {"description"}, path, "training config")
        values = {k: v for k, v in data.items() if k in known}
        if "elements" in values:
            values["elements"] = tuple(values["elements"])
        return cls(**values, explicit=tuple(sorted(values)))


def reference_energies(data: list[Labelled], elements) -> np.ndarray:
    """Per-element energies E_Z minimising sum (E - sum_Z n_Z E_Z)^2 (eV/atom)."""
    index = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(data), len(elements)))
    for row, d in enumerate(data):
        for z in d.structure.numbers:
            counts[row, index[int(z)]] += 1
    energies = np.array([d.energy for d in data])
    solution, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return solution


def force_term(df, config: TrainConfig):
    """Sum over components of df^2, or of its Huber form (2x optax's, so both agree below
    ``huber_delta``): large errors (rattled, hot configurations) then pull with a bounded
    gradient instead of ruling the fit, which is what the force MAE rewards."""
    import jax.numpy as jnp

    if config.force_loss == "huber":
        import optax

        return 2.0 * jnp.sum(optax.huber_loss(df, delta=config.huber_delta))
    return jnp.sum(df**2)


def make_loss(config: TrainConfig):
    import jax
    import jax.numpy as jnp

    def predict(model, b):
        model = model.for_training()

        def total(positions, strain):
            eye = jnp.eye(3, dtype=positions.dtype)
            sym = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))
            atom_system = jnp.minimum(b.batch.system_idx, b.cells.shape[0] - 1)
            pos = positions + jnp.einsum("ax,axy->ay", positions, sym[atom_system])
            cells = jnp.einsum("sxy,syz->sxz", b.cells, eye + sym)
            energy = model.energy(pos, cells, b.batch, b.nbrs)
            return jnp.sum(energy), energy

        zero = jnp.zeros_like(b.cells)
        need_stress = config.stress_weight > 0
        argnums = (0, 1) if need_stress else 0
        (_, energy), grads = jax.value_and_grad(total, argnums, has_aux=True)(b.positions, zero)
        if need_stress:
            grad_x, grad_strain = grads
            volume = jnp.abs(det3(b.cells))
            stress = grad_strain / jnp.where(volume > 0, volume, 1.0)[:, None, None]
        else:
            grad_x, stress = grads, jnp.zeros_like(b.cells)
        forces = jnp.where(b.batch.atom_mask[:, None], -grad_x, 0.0)
        return energy, forces, stress

    def errors(model, b):
        energy, forces, stress = predict(model, b)
        n = jnp.maximum(b.n_atoms, 1).astype(energy.dtype)
        mask = b.batch.system_mask
        de = jnp.where(mask, (energy - b.energy) / n, 0.0)
        df = jnp.where(b.batch.atom_mask[:, None], forces - b.forces, 0.0)
        ds = jnp.where((mask & b.has_stress)[:, None, None], stress - b.stress, 0.0)
        return de, df, ds

    def loss(model, b):
        de, df, ds = errors(model, b)
        n_systems = jnp.maximum(jnp.sum(b.batch.system_mask), 1)
        n_atoms = jnp.maximum(jnp.sum(b.batch.atom_mask), 1)
        n_stress = jnp.maximum(jnp.sum(b.has_stress & b.batch.system_mask), 1)
        value = (
            config.energy_weight * jnp.sum(de**2) / n_systems
            + config.force_weight * force_term(df, config) / (3 * n_atoms)
            + config.stress_weight * jnp.sum(ds**2) / (9 * n_stress)
        )
        return value, (de, df, ds)

    return loss, errors


class Trainer:
    """Train on ``train`` (validate on ``valid``) into ``out_dir``."""

    def __init__(
        self,
        config: TrainConfig,
        data: list[Labelled],
        out_dir: Path,
        valid: list[Labelled] | None = None,
        sources=(),
        init=None,
    ):
        """``init``: a PaiNN or SevenNet :class:`~molopt.potentials.registry.PotentialSpec` to
        start from (fine-tuning): its weights, architecture and elements; a fresh optimizer and
        schedule."""
        from molopt import elements as el

        if config.keep not in ("best", "last"):
            raise ConfigError(f"keep must be 'best' or 'last', not {config.keep!r}")
        if not 0.0 <= config.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), not {config.ema_decay}")
        if config.force_loss not in ("mse", "huber") or config.huber_delta <= 0:
            raise ConfigError(
                f"force_loss must be 'mse' or 'huber' (with huber_delta > 0), not "
                f"{config.force_loss!r} (huber_delta {config.huber_delta})"
            )
        self.config = config
        self.out_dir = Path(out_dir)
        self.sources = list(sources)
        if valid is None:
            data, valid = split(data, config.valid_fraction, config.seed)
        self.train_data, self.valid_data = data, valid
        numbers = sorted({int(z) for d in data + valid for z in d.structure.numbers})
        self.init = init
        if init is not None:
            config = self.config = _fine_tuning(config, init)
        if config.elements:
            declared = [el.number(s) for s in config.elements]
            missing = set(numbers) - set(declared)
            if missing:
                names = ", ".join(el.symbol(z) for z in sorted(missing))
                if init is not None:
                    raise ConfigError(
                        f"training data contains element(s) {names}, which --init {init.name} "
                        f"({', '.join(config.elements)}) does not cover: fine-tuning cannot add "
                        "elements"
                    )
                raise ConfigError(
                    f"training data contains element(s) {names} not in the config's elements"
                )
            numbers = declared
        self.elements = tuple(numbers)
        dtype = np.float64 if config.precision == "float64" else np.float32
        self.dtype = dtype
        self.train_batches = Batcher(
            data, self.elements, config.cutoff, config.batch_atoms, config.batch_structures, dtype
        )
        self.valid_batches = Batcher(
            valid, self.elements, config.cutoff, config.batch_atoms, config.batch_structures, dtype
        )
        # both batchers share atom/system shapes (capacity rungs are fixed multiples of 8), so
        # one compiled step per rung serves both
        atoms = max(self.train_batches.batch_atoms, self.valid_batches.batch_atoms)
        for b in (self.train_batches, self.valid_batches):
            b.batch_atoms = atoms
            b.periodic = self.train_batches.periodic or self.valid_batches.periodic

    # -- model and optimizer ------------------------------------------------------------------
    def initial_model(self, resume: bool = False):
        """The model training starts from. With ``resume`` only its structure matters (the
        checkpoint's weights replace its values), so the offsets are not refitted."""
        import jax

        from molopt.potentials.neural.painn import PaiNN

        if self.init is not None:  # fine-tuning: its reference energies and scale too
            model = _cast(self.init.potential, self.dtype)
            if self.config.refit_energy_offsets and not resume:
                model = self._refit_energy_offsets(model)
            return model
        reference = reference_energies(self.train_data, self.elements)
        forces = np.concatenate([d.forces.ravel() for d in self.train_data])
        scale = float(np.sqrt(np.mean(forces**2))) or 1.0
        c = self.config
        model = PaiNN(
            self.elements,
            cutoff=c.cutoff,
            n_features=c.n_features,
            n_radial=c.n_radial,
            n_layers=c.n_layers,
            key=jax.random.PRNGKey(c.seed),
            reference=reference,
            scale=scale,
        )
        return _cast(model, self.dtype)

    def _refit_energy_offsets(self, model):
        """``model`` with per-element energies added that fit its energies on the training
        data to the labels by least squares (elements absent from the data: unchanged)."""
        from molopt import elements as el
        from molopt.training.evaluate import predict

        precision = "float64" if self.dtype == np.float64 else "float32"
        predicted = predict(model, self.train_data, precision)
        residual = [d.energy - e for d, (e, _, _) in zip(self.train_data, predicted, strict=True)]
        present = sorted({int(z) for d in self.train_data for z in d.structure.numbers})
        counts = np.array(
            [[np.sum(d.structure.numbers == z) for z in present] for d in self.train_data], float
        )
        solution, *_ = np.linalg.lstsq(counts, np.array(residual), rcond=None)
        index = {z: k for k, z in enumerate(self.elements)}
        offsets = np.zeros(len(self.elements))
        for z, value in zip(present, solution, strict=True):
            offsets[index[z]] = value
        self.energy_offsets = {
            el.symbol(z): float(v) for z, v in zip(present, solution, strict=True)
        }
        return model.with_energy_offsets(offsets.astype(self.dtype))

    def steps_per_epoch(self) -> int:
        return len(self.train_batches.plan(None))

    def warmup_steps(self) -> int:
        c = self.config
        # with a time budget epoch 1 is all warm-up, so the total (fixed after epoch 1)
        # never changes a learning rate already used: rerunning with that many epochs and no
        # budget reproduces the run
        return max(c.warmup_steps, self.steps_per_epoch() if c.time_budget_s > 0 else 0)

    def optimizer(self):
        """Gradient clipping + Adam (optax); the learning rate is applied in the step."""
        import optax

        c = self.config
        return optax.chain(optax.clip_by_global_norm(c.gradient_clip), optax.scale_by_adam())

    def learning_rate(self, step, total_steps):
        """Linear warm-up from lr/100, then cosine decay to ``final_learning_rate`` at
        ``total_steps`` (arrays allowed: the total may be set after epoch 1)."""
        import jax.numpy as jnp

        c = self.config
        warm = self.warmup_steps()
        step = jnp.asarray(step, jnp.float32)
        rise = c.learning_rate / 100 + (c.learning_rate - c.learning_rate / 100) * step / warm
        progress = jnp.clip((step - warm) / jnp.maximum(total_steps - warm, 1), 0.0, 1.0)
        cosine = c.final_learning_rate + 0.5 * (c.learning_rate - c.final_learning_rate) * (
            1 + jnp.cos(jnp.pi * progress)
        )
        return jnp.where(step < warm, rise, cosine)

    # -- loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False, progress: Callable | None = None) -> dict:
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax

        c = self.config
        loss_fn, errors_fn = make_loss(c)
        optimizer = self.optimizer()
        steps_per_epoch = self.steps_per_epoch()
        model = self.initial_model(resume=resume)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        state = {
            "epoch": 0,
            "step": 0,
            "best_valid": float("inf"),
            "best_epoch": -1,
            "history": [],
            "elapsed_s": 0.0,
            "epochs": c.epochs,
        }
        if getattr(self, "energy_offsets", None):  # refitted: the card says by how much
            state["energy_offsets"] = self.energy_offsets
        checkpoints = self.out_dir / "checkpoints"
        if resume:
            if not (checkpoints / "state.json").exists():
                raise ConfigError(f"nothing to resume in {checkpoints}")
            state = json.loads((checkpoints / "state.json").read_text())
            if c.time_budget_s <= 0:
                state["epochs"] = c.epochs  # resuming may extend (or shorten) the run
            if state.get("energy_offsets"):
                self.energy_offsets = state["energy_offsets"]
            model = eqx.tree_deserialise_leaves(checkpoints / "model.eqx", model)
            opt_state = eqx.tree_deserialise_leaves(checkpoints / "optimizer.eqx", opt_state)
        best = model
        if (checkpoints / "best.eqx").exists() and resume:
            best = eqx.tree_deserialise_leaves(checkpoints / "best.eqx", model)
        # the averaged weights (ema_decay > 0) start from the initial (or resumed) model
        ema = model if c.ema_decay > 0 else None
        ema_dtype = self.dtype
        if ema is not None and resume and (checkpoints / "ema.eqx").exists():
            ema = eqx.tree_deserialise_leaves(checkpoints / "ema.eqx", model)

        @eqx.filter_jit
        def train_step(model, opt_state, ema, b, step, total_steps):
            (value, _), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, b)
            updates, opt_state = optimizer.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
            rate = self.learning_rate(step, total_steps)
            updates = jax.tree.map(lambda u: -rate * u, updates)
            model = eqx.apply_updates(model, updates)
            if ema is not None:
                decay = jnp.minimum(c.ema_decay, (1.0 + step) / (10.0 + step))
                averaged = optax.incremental_update(
                    eqx.filter(model, eqx.is_inexact_array),
                    eqx.filter(ema, eqx.is_inexact_array),
                    (1.0 - decay).astype(ema_dtype),
                )
                ema = eqx.combine(averaged, ema)
            return model, opt_state, ema, value

        @eqx.filter_jit
        def valid_step(model, b):
            de, df, ds = errors_fn(model, b)
            return (
                jnp.sum(jnp.abs(de)),
                jnp.sum(de**2),
                jnp.sum(jnp.abs(df)),
                jnp.sum(df**2),
                jnp.sum(b.batch.system_mask),
                3 * jnp.sum(b.batch.atom_mask),
                force_term(df, c),
            )

        valid_batches = [self.valid_batches.make(m) for m in self.valid_batches.plan(None)]
        started = time.perf_counter() - state["elapsed_s"]
        stale_epochs = state["epoch"] - state["best_epoch"] - 1 if state["best_epoch"] >= 0 else 0
        while state["epoch"] < state["epochs"]:
            epoch = state["epoch"]
            rng = np.random.default_rng([c.seed, epoch])
            losses = []
            total_steps = jnp.asarray(state["epochs"] * steps_per_epoch, jnp.float32)
            # with a time budget, epoch 1 estimates the per-step cost; the first step of every
            # batch shape (capacity rung) compiles, so those steps are timed apart and left out
            measuring = epoch == 0 and c.time_budget_s > 0
            shapes, compiling_s, compiling_steps = set(), 0.0, 0
            batches = prefetched(self.train_batches.plan(rng), self.train_batches.make)
            for k, b in enumerate(batches):
                first_of_shape = False
                if measuring:
                    shape = tuple(x.shape for x in jax.tree.leaves(b))
                    first_of_shape = shape not in shapes
                    shapes.add(shape)
                if first_of_shape:
                    jax.block_until_ready(losses)
                    step_started = time.perf_counter()
                model, opt_state, ema, value = train_step(
                    model, opt_state, ema, b, jnp.asarray(state["step"]), total_steps
                )
                losses.append(value)
                state["step"] += 1
                interrupt.check()
                if first_of_shape:
                    jax.block_until_ready(value)
                    if k == 0:
                        compiled_at = time.perf_counter()
                    else:
                        compiling_s += time.perf_counter() - step_started
                        compiling_steps += 1
            if measuring:
                per_step = (time.perf_counter() - compiled_at - compiling_s) / max(
                    1, len(losses) - 1 - compiling_steps
                )
                affordable = (
                    int(
                        (c.time_budget_s - (time.perf_counter() - started))
                        / (per_step * steps_per_epoch * 1.15)
                    )
                    + 1
                )
                state["epochs"] = int(max(2, min(c.epochs, affordable)))
            train_loss = float(np.mean(jax.device_get(losses)))
            judged = model if ema is None else ema  # the weights validated, kept, written
            sums = np.zeros(7)
            for b in valid_batches:
                sums += np.array([float(x) for x in valid_step(judged, b)])
            metrics = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "valid_energy_mae_meV_per_atom": 1000 * sums[0] / sums[4],
                "valid_energy_rmse_meV_per_atom": 1000 * np.sqrt(sums[1] / sums[4]),
                "valid_force_mae_meV_per_A": 1000 * sums[2] / sums[5],
                "valid_force_rmse_meV_per_A": 1000 * np.sqrt(sums[3] / sums[5]),
                "learning_rate": float(
                    self.learning_rate(state["step"], state["epochs"] * steps_per_epoch)
                ),
            }
            # the training loss's energy and force terms (Huber too, when training uses it)
            valid_loss = c.energy_weight * sums[1] / sums[4] + c.force_weight * sums[6] / sums[5]
            metrics["valid_loss"] = float(valid_loss)
            state["history"].append(metrics)
            state["epoch"] = epoch + 1
            state["elapsed_s"] = time.perf_counter() - started
            if valid_loss < state["best_valid"]:
                state["best_valid"] = float(valid_loss)
                state["best_epoch"] = epoch
                best = judged
                stale_epochs = 0
            else:
                stale_epochs += 1
            if progress:
                progress(metrics, state)
            stop = stale_epochs >= c.patience or state["elapsed_s"] > c.max_time_s
            if (
                state["epoch"] % c.checkpoint_every == 0
                or stop
                or state["epoch"] == state["epochs"]
            ):
                self._checkpoint(checkpoints, model, best, opt_state, state, ema)
            if stop:
                break
        state["stopped"] = (
            "patience"
            if stale_epochs >= c.patience
            else "time"
            if state["elapsed_s"] > c.max_time_s
            else "epochs"
        )
        if c.keep == "last":
            # with a schedule that decays to a small learning rate the last model is the one
            # meant; the validation loss can be ruled by a few outliers
            best = model if ema is None else ema
            state["best_epoch"] = state["epoch"] - 1
        self.best = best
        self.state = state
        return state

    def _checkpoint(self, directory: Path, model, best, opt_state, state, ema=None):
        import equinox as eqx

        directory.mkdir(parents=True, exist_ok=True)
        trees = [("model", model), ("best", best), ("optimizer", opt_state)]
        for name, tree in trees + ([("ema", ema)] if ema is not None else []):
            tmp = directory / f".{name}.eqx.tmp"
            eqx.tree_serialise_leaves(tmp, tree)
            os.replace(tmp, directory / f"{name}.eqx")
        tmp = directory / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, directory / "state.json")

    def write_potential(self, errors: dict | None = None) -> Path:
        """The best model as ``<name>.toml`` + ``<name>.eqx`` (PaiNN) or ``<name>.npz``
        (SevenNet) with its model card."""
        from molopt.io.read import file_sha256
        from molopt.potentials.neural.io import save_neural

        c = self.config
        sevennet = self.init is not None and self.init.kind == "sevennet"
        card = {
            "description": f"PaiNN trained on {c.reference_method} data "
            f"({len(self.train_data)} configurations)",
            "reference_method": c.reference_method,
            "training": {
                "data": [{"path": str(p), "sha256": file_sha256(Path(p))} for p in self.sources],
                "n_train": len(self.train_data),
                "n_valid": len(self.valid_data),
                "epochs": self.state["epoch"],
                "best_epoch": self.state["best_epoch"] + 1,
                "stopped": self.state["stopped"],
                "wall_time_s": round(self.state["elapsed_s"], 1),
                "config": {
                    k: v
                    for k, v in asdict(c).items()
                    if k not in ("extra", "explicit") and v not in ((), "")
                },
            },
            "errors": errors or {},
        }
        if self.init is not None:
            card["training"]["init"] = {
                "potential": self.init.name,
                "weights_sha256": self.init.data.get("weights_sha256", ""),
            }
            if getattr(self, "energy_offsets", None):
                card["training"]["init"]["energy_offsets_eV"] = self.energy_offsets
        if sevennet:
            from molopt.potentials.sevennet import save_sevennet

            card["description"] = (
                f"SevenNet fine-tuned from {self.init.name} on {c.reference_method} data "
                f"({len(self.train_data)} configurations)"
            )
            for key in ("n_features", "n_radial", "n_layers", "elements"):  # PaiNN's / 89
                card["training"]["config"].pop(key, None)
            return save_sevennet(
                self.best, self.out_dir, c.name, card, self.init.potential, self.init.data
            )
        best = _cast(self.best, np.float32)
        return save_neural(best, self.out_dir, c.name, card)


def _fine_tuning(config: TrainConfig, spec) -> TrainConfig:
    """``config`` with the architecture of the potential ``spec`` starts from; a config that
    sets it otherwise is refused (the weights fix it)."""
    from dataclasses import replace

    from molopt import elements as el
    from molopt.potentials.neural.painn import PaiNN

    if spec.kind not in ("neural", "sevennet"):
        raise ConfigError(
            f"--init {spec.name}: only a neural potential (PaiNN or SevenNet) can be fine-tuned"
        )
    model = spec.potential
    own = {"cutoff": model.cutoff, "elements": tuple(el.symbol(z) for z in model.elements)}
    if spec.kind == "sevennet":
        painn = [k for k in ("n_features", "n_radial", "n_layers") if k in config.explicit]
        if painn:
            raise ConfigError(
                f"--init {spec.name}: a SevenNet keeps its own architecture, but the config "
                f"sets PaiNN's {', '.join(painn)}; remove them"
            )
    elif not isinstance(model, PaiNN):
        raise ConfigError(f"--init {spec.name}: not a PaiNN potential")
    else:
        own.update(n_features=model.n_features, n_radial=model.n_radial, n_layers=model.n_layers)
    differ = []
    for key, value in own.items():
        if config.explicit and key not in config.explicit:
            continue  # not set in the file: the potential's
        mine = getattr(config, key)
        if key == "elements":
            mine = tuple(el.symbol(el.number(s)) for s in mine)
            if mine and set(mine) != set(value):
                differ.append(f"elements {list(mine)} (the potential's: {list(value)})")
        elif mine != value:
            differ.append(f"{key} = {mine} (the potential's: {value})")
    if differ:
        raise ConfigError(
            f"--init {spec.name}: fine-tuning keeps the potential's architecture, but the "
            "config sets " + "; ".join(differ)
        )
    return replace(config, **own)


def _cast(model, dtype):
    from molopt.potentials.neural.painn import cast_floats

    return cast_floats(model, dtype)
