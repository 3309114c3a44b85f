"""SevenNet: NequIP-style equivariant message passing (Park et al., J. Chem. Theory Comput.
20, 4857 (2024); Batzner et al., Nat. Commun. 13, 2453 (2022)), written in JAX.

The pretrained SevenNet-0 (89 elements, MPtrj) is converted from the ``sevenn`` package's
checkpoint by ``data/sevennet/convert.py`` into ``potentials/sevennet-0.npz`` (plain arrays)
and a card ``potentials/sevennet-0.toml``; this module evaluates it with the operations of the
reference implementation (sevenn on e3nn), in the same order:

1. species embedding: the one-hot species through a linear map, i.e. a row of a table;
2. per pair i -> j within the cutoff r_c: Bessel radial basis ``2/r_c sin(c_n r)/r`` (trained
   frequencies c_n) times a smooth envelope (XPLOR switch or polynomial), and real spherical
   harmonics Y_l of the unit vector (e3nn's basis and "component" normalisation);
3. interaction blocks: a linear self-connection, a linear map, a convolution (for every path
   l1 x l2 -> l3 the Wigner 3j product of the neighbour's features with Y_l2, weighted per
   channel by a radial MLP of the basis, summed over neighbours and divided by a fixed
   average neighbour count), a second linear map, the sum with the self-connection, and a
   gate (SiLU on scalars; features of l > 0 scaled by SiLU of gate scalars);
4. readout: two linear maps of the scalars to one number per atom, times a per-element scale
   plus a per-element shift (eV).

Features are held per angular momentum l as arrays (A, 2l+1, mul): linear maps act on the
last axis and never mix l. Normalisations follow e3nn: linear maps divide by sqrt(fan-in),
tensor-product paths are multiplied by sqrt(2 l3 + 1), and activations by e3nn's constant
that gives them unit second moment under a standard normal input (stored by the converter).
Forces and stress are derivatives of the energy (automatic differentiation); padded atoms and
padded neighbour slots contribute exactly nothing.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from molopt import elements as el
from molopt._jax import jax
from molopt.batch import system_sum
from molopt.errors import PotentialError
from molopt.neighbors import (
    pair_vectors,
    row_vectors,
    slot_group,
    sum_over_groups,
    sum_row_blocks,
)
from molopt.potentials.base import Potential


def spherical_harmonics(lmax: int, ux, uy, uz) -> list:
    """Real spherical harmonics of a unit vector (components each of shape S) in e3nn's basis
    and "component" normalisation (sum_m Y_lm^2 = 2l + 1): a list over l of (..., 2l+1)."""
    s3, s5, s15 = math.sqrt(3.0), math.sqrt(5.0), math.sqrt(15.0)
    out = [jnp.ones_like(ux)[..., None]]
    if lmax >= 1:
        out.append(jnp.stack([s3 * ux, s3 * uy, s3 * uz], axis=-1))
    if lmax >= 2:
        y2 = uy * uy
        x2z2 = ux * ux + uz * uz
        d0 = s15 * ux * uz
        d4 = 0.5 * s15 * (uz * uz - ux * ux)
        d = [d0, s15 * ux * uy, s5 * (y2 - 0.5 * x2z2), s15 * uy * uz, d4]
        out.append(jnp.stack(d, axis=-1))
    if lmax >= 3:
        a, b = math.sqrt(42.0) / 6.0, math.sqrt(168.0) / 8.0
        f = [
            a * (d0 * uz + d4 * ux),
            math.sqrt(7.0) * d0 * uy,
            b * (4.0 * y2 - x2z2) * ux,
            0.5 * math.sqrt(7.0) * uy * (2.0 * y2 - 3.0 * x2z2),
            b * uz * (4.0 * y2 - x2z2),
            math.sqrt(7.0) * d4 * uy,
            a * (d4 * uz - d0 * ux),
        ]
        out.append(jnp.stack(f, axis=-1))
    if lmax >= 4:
        raise ValueError("spherical harmonics above l = 3 are not implemented")
    return out


def envelope(r, cutoff: float, spec: tuple):
    """Smooth cutoff function of the distance r (A): ``("xplor", r_on)`` is 1 below r_on and
    switches to 0 at the cutoff (HOOMD's XPLOR form); ``("polynomial", p)`` is the
    polynomial envelope of DimeNet (Gasteiger et al. 2020)."""
    name, value = spec
    if name == "xplor":
        r2, on2, c2 = r * r, value * value, cutoff * cutoff
        switched = (c2 - r2) ** 2 * (c2 + 2.0 * r2 - 3.0 * on2) / (c2 - on2) ** 3
        return jnp.where(r < value, 1.0, switched)
    p = value
    x = r / cutoff
    c0, c1, c2 = (p + 1.0) * (p + 2.0) / 2.0, p * (p + 2.0), p * (p + 1.0) / 2.0
    return 1.0 - c0 * x**p + c1 * x ** (p + 1.0) - c2 * x ** (p + 2.0)


class SevenNet(Potential):
    """A converted SevenNet model (a pytree: the arrays in ``weights`` are leaves).

    ``elements`` in species order (sorted atomic numbers); ``cutoff`` A; ``n_basis`` Bessel
    functions; ``lmax_edge`` of the spherical harmonics; ``envelope_spec`` ("xplor", r_on) or
    ("polynomial", p); ``blocks``: per interaction block ``(paths, n_scalars, gated)``, with
    ``paths`` the (l1, l2, l3) of the convolution in e3nn's output order and ``gated`` the
    (mul, l) of the gated features; ``weights``: name -> array (the converter's .npz keys).
    """

    n_basis: int = eqx.field(static=True)
    lmax_edge: int = eqx.field(static=True)
    envelope_spec: tuple = eqx.field(static=True)
    blocks: tuple = eqx.field(static=True)
    weights: dict
    #: pairs are evaluated in the row form of the neighbour list (:mod:`molopt.neighbors`):
    #: each costs a radial network per block, and the dense form pads a batch of mixed
    #: crystals to 2-3x its pairs (a list without the row form is read densely)
    row_width = 8
    costly = True
    #: 16 mixed small crystals relaxed with the cell: 18.7 s with 0.5, 21.6 s with 1.0
    #: (fewer pairs outweigh more rebuilds; bench/RESULTS.md)
    default_skin = 0.5
    #: a step of 256 atoms of small crystals takes ~1 s (float64) on two cores: bigger
    #: batches only wait longer for their slowest crystal
    cpu_batch_atoms = 256

    def atomic_energies(self, positions, cell, batch, nbrs):
        """(A,) eV; exactly zero on padding atoms."""
        return _atomic_energies(self, positions, cell, batch, nbrs)

    def energy(self, positions, cell, batch, nbrs):
        return system_sum(
            self.atomic_energies(positions, cell, batch, nbrs), batch.system_idx, cell.shape[0]
        )

    def for_training(self):
        """The model as training differentiates it: the architecture's constants (Wigner 3j
        symbols, activation normalisations, average neighbour counts) behind
        ``stop_gradient``, so only fitted weights move (their gradients are exactly zero)."""
        weights = {
            k: jax.lax.stop_gradient(v) if is_constant(k) else v for k, v in self.weights.items()
        }
        return eqx.tree_at(lambda m: m.weights, self, weights)

    def with_energy_offsets(self, offsets):
        """This model with ``offsets`` (eV, one per element in species order) added to each
        atom's energy: the per-element shift."""
        weights = dict(self.weights)
        shift = weights["shift"]
        weights["shift"] = shift + jnp.asarray(offsets, shift.dtype)
        return eqx.tree_at(lambda m: m.weights, self, weights)


def is_constant(key: str) -> bool:
    """Whether the weights entry ``key`` is fixed by the architecture rather than fitted (the
    converter stores these in float64, the fitted weights in float32 as trained)."""
    return key.startswith(("w3j/", "act/")) or key.endswith("/denominator")


def _linear(x: dict, weights: dict, prefix: str) -> dict:
    """e3nn ``o3.Linear`` without biases on per-l features: (A, 2l+1, in_l) -> out_l."""
    out = {}
    for ell, feature in x.items():
        key = f"{prefix}/l{ell}"
        if key in weights:
            w = weights[key]
            out[ell] = (feature @ w) * (1.0 / math.sqrt(w.shape[0]))
    return out


def _silu(x, constant):
    return jax.nn.silu(x) * constant


def _radial_mlp(basis, weights: dict, t: int, constant):
    """e3nn ``FullyConnectedNet``: h <- act(h W / sqrt(fan-in)), no activation on the last."""
    k = 0
    h = basis
    while f"{t}/radial/{k}" in weights:
        w = weights[f"{t}/radial/{k}"]
        h = (h @ w) * (1.0 / math.sqrt(w.shape[0]))
        if f"{t}/radial/{k + 1}" in weights:
            h = _silu(h, constant)
        k += 1
    return h


def _convolution(x: dict, paths, weights, t, index, sh, basis, dtype):
    """Sum over neighbour slots of the uvu tensor products, per output l: (A, 2l+1, mid_l).
    ``index`` (g, A); ``sh`` list over l of (g, A, 2l+1); ``basis`` (g, A, n_basis), zero on
    empty slots (so the radial weights, and the messages, are exactly zero there)."""
    radial = _radial_mlp(basis, weights, t, weights["act/radial"])  # (g, A, n_weights)
    gathered = {ell: feature[index] for ell, feature in x.items()}  # (g, A, 2l+1, mul)
    pieces: dict[int, list] = {}
    # one split, not a slice per path: the transpose of a split is one concatenation, where
    # slices transpose to a padded copy per path summed (XLA:CPU fused those into one loop
    # that evaluated every path's pad for every radial weight: ~20% of a force call)
    bounds = np.cumsum([x[l1].shape[-1] for l1, _, _ in paths])[:-1]
    radials = jnp.split(radial, [int(b) for b in bounds], axis=-1)
    for (l1, l2, l3), w in zip(paths, radials, strict=True):
        # contract the 3j symbol with Y_l2 first: (g, A, 2l1+1, 2l3+1), small
        cy = jnp.einsum("ijk,gaj->gaik", weights[f"w3j/{l1}{l2}{l3}"], sh[l2])
        cy = cy * jnp.asarray(math.sqrt(2 * l3 + 1), dtype)
        weighted = gathered[l1] * w[:, :, None, :]  # (g, A, 2l1+1, mul)
        # one reduction over the slots and the 2l1+1 components together, a broadcast
        # product: XLA:CPU fuses it whole, where a sum over 2l1+1 and then over the slots
        # wrote every slot's message out in between, and tiny batched matrix products
        # (einsum) are slower still (bench/RESULTS.md)
        pieces.setdefault(l3, []).append(
            jnp.sum(cy[..., None] * weighted[..., :, None, :], axis=(0, 2))
        )
    return {ell: jnp.concatenate(p, axis=-1) for ell, p in sorted(pieces.items())}


def _gate(y: dict, n_scalars: int, gated, weights) -> dict:
    scalars = y[0][..., :n_scalars]
    out = {0: _silu(scalars, weights["act/scalar"])}
    if gated:
        gates = _silu(y[0][..., n_scalars:], weights["act/gate"])
        start = 0
        for mul, ell in gated:
            out[ell] = y[ell] * gates[..., start : start + mul]
            start += mul
    return out


def _atomic_energies(model, positions, cell, batch, nbrs):
    """(A,) eV; exactly zero on padding atoms."""
    dtype = positions.dtype
    weights = model.weights
    rows = nbrs.row_index is not None
    if rows:  # slots (W, R): W per row, each row one atom's
        dx, dy, dz = row_vectors(positions, cell, batch.system_idx, nbrs)
        index, mask = nbrs.row_index, nbrs.row_mask
    else:  # slots (K, A)
        dx, dy, dz = pair_vectors(positions, cell, batch.system_idx, nbrs)
        index, mask = nbrs.index, nbrs.mask
    r2 = dx * dx + dy * dy + dz * dz
    within = mask & (r2 < model.cutoff**2)
    r = jnp.sqrt(jnp.where(within, r2, 1.0))
    sh = spherical_harmonics(model.lmax_edge, dx / r, dy / r, dz / r)
    coeffs = weights["bessel_coeffs"]
    bessel = (2.0 / model.cutoff) * jnp.sin(coeffs * r[..., None]) / r[..., None]
    cut = jnp.where(within, envelope(r, model.cutoff, model.envelope_spec), 0.0)
    basis = bessel * cut[..., None]  # (K, A, n_basis)

    species = batch.species
    embedding = weights["embedding"]
    x = {0: (embedding[species] * (1.0 / math.sqrt(embedding.shape[0])))[:, None, :]}
    K, A = index.shape  # (W, R) in the row form
    n_atoms = positions.shape[0]
    for t, (paths, n_scalars, gated) in enumerate(model.blocks):
        self_connection = _linear(x, weights, f"{t}/self_connection")
        x_in = _linear(x, weights, f"{t}/linear_in")

        def slots(index, basis_part, *sh_part, x_in=x_in, paths=paths, t=t):
            return _convolution(x_in, paths, weights, t, index, list(sh_part), basis_part, dtype)

        if rows:  # per-row sums, blocks of rows at a time (memory bounded), into atoms
            summed = sum_row_blocks(slots, (index, basis, *sh), nbrs, n_atoms)
        else:  # groups of slots sized by the per-slot floats
            width = sum(f.shape[-1] * f.shape[-2] for f in x_in.values()) * 4
            group = slot_group(K, A * width, np.dtype(dtype).itemsize)
            summed = sum_over_groups(slots, (index, basis, *sh), group, recompute=True)
        denominator = weights[f"{t}/denominator"]
        convolved = {ell: v / denominator for ell, v in summed.items()}
        y = _linear(convolved, weights, f"{t}/linear_out")
        y = {ell: y[ell] + self_connection[ell] if ell in self_connection else y[ell] for ell in y}
        x = _gate(y, n_scalars, gated, weights)

    scalars = x[0][:, 0, :]
    hidden = weights["readout/hidden"]
    h = (scalars @ hidden) * (1.0 / math.sqrt(hidden.shape[0]))
    out = weights["readout/energy"]
    energy = ((h @ out) * (1.0 / math.sqrt(out.shape[0])))[:, 0]
    energy = energy * weights["scale"][species] + weights["shift"][species]
    return jnp.where(batch.atom_mask, energy, 0.0)


# --- loading ------------------------------------------------------------------------------


def _fail(path, reason):
    raise PotentialError(f"potential file {path}: {reason}")


def load_sevennet(data: dict, path: Path):
    """The model of a ``kind = "sevennet"`` card; refuses weights whose SHA-256 differs from
    the card's (corrupt or modified) and cards or weights that do not fit together."""
    path = Path(path)
    name = data.get("weights")
    if not isinstance(name, str) or not name:
        _fail(path, "missing 'weights' (the .npz file beside the card)")
    weights_path = path.parent / name
    if not weights_path.is_file():
        _fail(path, f"weights file {weights_path} is missing")
    raw = weights_path.read_bytes()
    expected = data.get("weights_sha256")
    actual = hashlib.sha256(raw).hexdigest()
    if not expected:
        _fail(path, f"no weights_sha256 to verify {weights_path}")
    if actual != expected:
        raise PotentialError(
            f"weights file {weights_path} does not match its card {path} (SHA-256 "
            f"{actual[:12]}... != {str(expected)[:12]}...): corrupt or modified; "
            "refusing to load it"
        )
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:  # truncated or not an npz
        raise PotentialError(f"weights file {weights_path} cannot be read ({exc})") from exc
    try:
        numbers = tuple(el.number(s) for s in data["elements"])
        arch = data["architecture"]
        env = arch["envelope"]
        spec = ("xplor", float(env["cutoff_on"])) if env["name"] == "xplor" else None
        if env["name"] == "polynomial":
            spec = ("polynomial", float(env["p"]))
        if spec is None:
            _fail(path, f"unknown envelope {env['name']!r}")
        blocks = tuple(
            (
                tuple(tuple(int(v) for v in p) for p in b["paths"]),
                int(b["scalars"]),
                tuple((int(m), int(ell)) for m, ell in b["gated"]),
            )
            for b in arch["blocks"]
        )
        cutoff = float(data["cutoff"])
        n_basis, lmax_edge = int(arch["n_basis"]), int(arch["lmax_edge"])
    except (KeyError, TypeError, ValueError) as exc:
        _fail(path, f"incomplete sevennet card ({exc!r})")
    _check_shapes(arrays, numbers, blocks, n_basis, path)
    return SevenNet(
        elements=numbers,
        cutoff=cutoff,
        n_basis=n_basis,
        lmax_edge=lmax_edge,
        envelope_spec=spec,
        blocks=blocks,
        weights={k: jnp.asarray(v) for k, v in arrays.items()},
    )


def save_sevennet(
    model: SevenNet, directory: Path, name: str, card: dict, base: SevenNet, base_card: dict
) -> Path:
    """Write ``<name>.npz`` and its card ``<name>.toml`` (each atomically) into ``directory``:
    ``model`` fine-tuned from ``base``, whose card ``base_card`` gives the architecture,
    reference and provenance carried over. Fitted weights are stored in float32, as the
    converter stores them; the constants are ``base``'s, bit for bit (training in float32 may
    have rounded them). The card's SHA-256 guards the weights as for every model."""
    import os

    import tomli_w

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        k: np.asarray(base.weights[k]) if is_constant(k) else np.asarray(v, np.float32)
        for k, v in model.weights.items()
    }
    weights = directory / f"{name}.npz"
    tmp = weights.with_name(f".{weights.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, weights)
    full = {
        "kind": "sevennet",
        "name": name,
        "reference": base_card.get("reference", ""),
        "elements": [el.symbol(z) for z in model.elements],
        "cutoff": model.cutoff,
        "implicit": False,
        "weights": weights.name,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "n_parameters": sum(int(v.size) for k, v in arrays.items() if not is_constant(k)),
        "architecture": base_card["architecture"],
        "provenance": base_card.get("provenance", {}),
    }
    full.update(card)
    toml_path = directory / f"{name}.toml"
    tmp = toml_path.with_name(f".{toml_path.name}.tmp")
    tmp.write_text(tomli_w.dumps(full))
    os.replace(tmp, toml_path)
    return toml_path


def _check_shapes(arrays, numbers, blocks, n_basis, path):
    def need(key, shape=None):
        if key not in arrays:
            _fail(path, f"weights lack {key!r}")
        if shape is not None and arrays[key].shape != shape:
            _fail(path, f"weights {key!r} have shape {arrays[key].shape}, expected {shape}")

    n = len(numbers)
    need("embedding")
    need("shift", (n,))
    need("scale", (n,))
    need("bessel_coeffs", (n_basis,))
    if arrays["embedding"].shape[0] != n:
        _fail(path, f"embedding has {arrays['embedding'].shape[0]} rows for {n} elements")
    for key in ("act/radial", "act/scalar", "readout/hidden", "readout/energy"):
        need(key)
    for t, (paths, _, _) in enumerate(blocks):
        need(f"{t}/denominator")
        for l1, l2, l3 in paths:
            need(f"w3j/{l1}{l2}{l3}", (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
