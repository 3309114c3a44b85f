"""Neural potential files: a TOML card (architecture, elements, cutoff, hyper-parameters,
training data and measured errors) beside a weights file in Equinox's leaf serialisation
(raw arrays in order; nothing executable, no pickle). The card records the weights' SHA-256
and loading refuses a file that does not match."""

from __future__ import annotations

import hashlib
from pathlib import Path

from molopt import elements as el
from molopt.errors import PotentialError

ARCHITECTURES = ("painn",)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def skeleton(data: dict, path):
    """An untrained model with the card's architecture (the template for the weights)."""
    from molopt._jax import jax
    from molopt.potentials.neural.painn import PaiNN

    architecture = data.get("architecture", "painn")
    if architecture not in ARCHITECTURES:
        raise PotentialError(f"potential file {path}: unknown architecture {architecture!r}")
    try:
        numbers = [el.number(s) for s in data["elements"]]
        hyper = data.get("hyperparameters", {})
        return PaiNN(
            numbers,
            cutoff=float(data["cutoff"]),
            n_features=int(hyper.get("n_features", 64)),
            n_radial=int(hyper.get("n_radial", 20)),
            n_layers=int(hyper.get("n_layers", 3)),
            key=jax.random.PRNGKey(0),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise PotentialError(f"potential file {path}: incomplete neural card ({exc})") from exc


def _load_leaf(f, x):
    """A weights leaf as a device array (through NumPy: ``jnp.load`` would compile a staging
    program for every distinct shape)."""
    import equinox as eqx
    import numpy as np

    from molopt._jax import jax

    if isinstance(x, jax.ShapeDtypeStruct):
        value = np.load(f)
        if value.shape != x.shape:
            raise ValueError(f"an array of shape {value.shape} where {x.shape} belongs")
        return jax.device_put(value)
    return eqx.default_deserialise_filter_spec(f, x)


def load_neural(data: dict, path: Path):
    import equinox as eqx

    path = Path(path)
    weights = path.parent / str(data.get("weights", ""))
    if not data.get("weights") or not weights.is_file():
        raise PotentialError(f"potential file {path}: weights file {weights} is missing")
    expected = data.get("weights_sha256")
    actual = sha256_of(weights)
    if not expected:
        raise PotentialError(f"potential file {path}: no weights_sha256 to verify {weights}")
    if actual != expected:
        raise PotentialError(
            f"weights file {weights} does not match its card {path} (SHA-256 {actual[:12]}... "
            f"!= {expected[:12]}...): corrupt or modified; refusing to load it"
        )
    import numpy as np

    from molopt.potentials.neural.painn import cast_floats

    # the template's shapes only (weights are stored in float32): building the model for real
    # would run (and compile) its random initialisation and a cast of every array for nothing
    model = eqx.filter_eval_shape(lambda: cast_floats(skeleton(data, path), np.float32))
    try:
        return eqx.tree_deserialise_leaves(weights, model, filter_spec=_load_leaf)
    except Exception as exc:  # wrong shapes, truncated file
        raise PotentialError(f"weights file {weights} cannot be read ({exc})") from exc


def save_neural(model, directory: Path, name: str, card: dict) -> Path:
    """Write ``<name>.eqx`` and ``<name>.toml`` (atomically) into ``directory``."""
    import os

    import equinox as eqx
    import numpy as np

    from molopt.potentials.neural.painn import cast_floats

    model = cast_floats(model, np.float32)  # weights are stored in float32
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.eqx"
    tmp = weights.with_name(f".{weights.name}.tmp")
    eqx.tree_serialise_leaves(tmp, model)
    os.replace(tmp, weights)
    card = dict(card)
    card.update(
        {
            "kind": "neural",
            "name": name,
            "architecture": "painn",
            "elements": [el.symbol(z) for z in model.elements],
            "cutoff": model.cutoff,
            "weights": weights.name,
            "weights_sha256": sha256_of(weights),
        }
    )
    card.setdefault("hyperparameters", {}).update(
        {"n_features": model.n_features, "n_radial": model.n_radial, "n_layers": model.n_layers}
    )
    toml_path = directory / f"{name}.toml"
    tmp = toml_path.with_name(f".{toml_path.name}.tmp")
    import tomli_w

    tmp.write_text(tomli_w.dumps(card))
    os.replace(tmp, toml_path)
    return toml_path
