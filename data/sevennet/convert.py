"""Convert a SevenNet checkpoint from the installed ``sevenn`` wheel into molopt's own files.

Run it in an environment with sevenn and torch (neither is a molopt dependency)::

    python -m venv /tmp/venv-sevenn && /tmp/venv-sevenn/bin/pip install sevenn
    /tmp/venv-sevenn/bin/python data/sevennet/convert.py            # sevennet-0
    /tmp/venv-sevenn/bin/python data/sevennet/convert.py --model 7net-l3i5 --name sevennet-l3i5

It writes ``potentials/<name>.npz`` (plain arrays, read with ``allow_pickle=False``) and
``potentials/<name>.toml`` (the card: architecture, elements, cutoff, provenance, licence).

The arrays are the checkpoint's own float32 parameters, rearranged from e3nn's flat layout
into one dense matrix per angular momentum ell, rows and columns in e3nn's order of irreps:

- ``embedding`` (n_elements, C): the linear map of the one-hot species, rows in molopt's
  species order (elements sorted by atomic number);
- ``bessel_coeffs`` (n_basis,): the trained Bessel frequencies;
- per interaction block ``t``: ``{t}/self_connection/l{l}``, ``{t}/linear_in/l{l}``,
  ``{t}/linear_out/l{l}`` (in_l, out_l); ``{t}/radial/{k}`` the radial network's layers;
  ``{t}/denominator`` ();
- ``readout/hidden``, ``readout/energy``; ``shift``, ``scale`` (n_elements,) eV;
- ``w3j/{l1}{l2}{l3}`` the Wigner 3j symbols e3nn uses (constants, stored so that the JAX
  side needs no e3nn conventions of its own); ``act/radial``, ``act/scalar``, ``act/gate``
  the second-moment normalisation constants e3nn computed for SiLU (a Monte Carlo estimate,
  so stored, not recomputed).

Normalisations that follow from the shapes (e3nn's ``path_normalization="element"``:
1/sqrt(fan-in) for linear maps, sqrt(2 l_out + 1) for the uvu tensor-product paths) are
checked here against e3nn's own instruction tables and recomputed on the JAX side.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def need_sevenn():
    try:
        import sevenn  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "convert.py needs the sevenn package and PyTorch (not molopt dependencies):\n"
            "  python -m venv /tmp/venv-sevenn && /tmp/venv-sevenn/bin/pip install sevenn\n"
            "  /tmp/venv-sevenn/bin/python data/sevennet/convert.py"
        )


def irreps_ls(irreps) -> list[tuple[int, int]]:
    """[(mul, l)] of an e3nn Irreps; refuses odd parity (SevenNet-0 is built without it)."""
    out = []
    for mul, ir in irreps:
        if ir.p != 1:
            raise SystemExit(f"irrep {ir} has odd parity: only is_parity=False models convert")
        out.append((mul, ir.l))
    return out


def dense_linear(linear):
    """Per-l dense matrices (in_l, out_l) of an e3nn ``o3.Linear`` (no biases)."""
    import numpy as np

    if linear.bias.numel():
        raise SystemExit("linear layers with biases are not supported")
    ins, outs = irreps_ls(linear.irreps_in), irreps_ls(linear.irreps_out)

    def offsets(blocks):
        seen, table = {}, []
        for mul, ell in blocks:
            table.append(seen.get(ell, 0))
            seen[ell] = seen.get(ell, 0) + mul
        return table, seen

    in_off, in_tot = offsets(ins)
    out_off, out_tot = offsets(outs)
    mats = {ell: np.zeros((in_tot.get(ell, 0), n), np.float32) for ell, n in out_tot.items()}
    flat = linear.weight.detach().cpu().numpy()
    pos = 0
    for instr in linear.instructions:
        mul_in, ell = ins[instr.i_in]
        mul_out, l_out = outs[instr.i_out]
        assert ell == l_out
        block = flat[pos : pos + mul_in * mul_out].reshape(mul_in, mul_out)
        pos += mul_in * mul_out
        r, c = in_off[instr.i_in], out_off[instr.i_out]
        mats[ell][r : r + mul_in, c : c + mul_out] = block
        expected = 1.0 / math.sqrt(in_tot[ell])
        if not math.isclose(instr.path_weight, expected, rel_tol=1e-12):
            raise SystemExit(f"unexpected linear normalisation {instr.path_weight} != {expected}")
    assert pos == flat.size
    return mats


def wigner_3j_used(tp, l1: int, l2: int, l3: int):
    """The Wigner 3j symbol the compiled e3nn tensor product multiplies by: its buffer (made
    in float32, so rounded to float32) where it keeps one, else the exact value (e3nn writes
    paths through l = 0 as Python-float constants)."""
    import torch
    from e3nn import o3

    exact = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
    for name, buffer in tp.named_buffers():
        if name.endswith(f"_w3j_{l1}_{l2}_{l3}"):
            used = buffer.detach().to(torch.float64)
            assert torch.allclose(used, exact, atol=1e-6)
            return used.numpy()
    return exact.numpy()


def act_constant(act) -> float:
    """e3nn's normalize2mom constant of a (wrapped) SiLU, 1.0 when e3nn treats it as identity."""
    import torch

    probe = torch.linspace(-3, 3, 7, dtype=torch.float64)
    if hasattr(act, "irreps_in"):  # e3nn.nn.Activation: every channel of its irreps
        probe = probe[:, None].expand(7, act.irreps_in.dim).contiguous()
    ratio = (act(probe) / torch.nn.functional.silu(probe))[probe != 0]
    if not torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12):
        raise SystemExit(f"activation {act} is not a scaled SiLU")
    return float(ratio[0])


def convert(model_name: str):
    import numpy as np
    import sevenn
    import torch
    from sevenn import util
    from sevenn.calculator import SevenNetCalculator

    checkpoint = Path(util.pretrained_name_to_path(model_name))
    calc = SevenNetCalculator(model_name, device="cpu")
    model = calc.model
    mods = model._modules
    config = calc.checkpoint.config if hasattr(calc, "checkpoint") else None
    type_map = dict(model.type_map)  # atomic number -> sevenn type index
    numbers = sorted(type_map)
    order = [type_map[z] for z in numbers]  # sevenn rows in molopt species order

    arrays: dict[str, np.ndarray] = {}
    emb = dense_linear(mods["onehot_to_feature_x"].linear)
    assert set(emb) == {0}
    arrays["embedding"] = emb[0][order]

    edge = mods["edge_embedding"]
    arrays["bessel_coeffs"] = edge.basis_function.coeffs.detach().numpy().astype(np.float32)
    cutoff_module = edge.cutoff_function
    cutoff = float(edge.basis_function.prefactor and 2.0 / edge.basis_function.prefactor)
    if type(cutoff_module).__name__ == "XPLORCutoff":
        envelope = {"name": "xplor", "cutoff_on": float(cutoff_module.r_on)}
    elif type(cutoff_module).__name__ == "PolynomialCutoff":
        envelope = {"name": "polynomial", "p": float(cutoff_module.p)}
    else:
        raise SystemExit(f"unknown cutoff function {cutoff_module}")
    sph = edge.spherical
    if not sph.sph.normalize or sph.sph.normalization != "component":
        raise SystemExit("spherical harmonics must be normalised, 'component' normalisation")
    lmax_edge = sph.lmax

    blocks = []
    t = 0
    while f"{t}_convolution" in mods:
        conv = mods[f"{t}_convolution"]
        tp = conv.convolution
        x_ls = irreps_ls(tp.irreps_in1)
        filt = irreps_ls(tp.irreps_in2)
        assert [ell for _, ell in filt] == list(range(lmax_edge + 1))
        mid = irreps_ls(tp.irreps_out)
        paths = []
        weight_pos = 0
        for instr in tp.instructions:
            assert instr.connection_mode == "uvu" and instr.has_weight
            mul1, l1 = x_ls[instr.i_in1]
            _, l2 = filt[instr.i_in2]
            mul_out, l3 = mid[instr.i_out]
            assert mul_out == mul1
            if not math.isclose(instr.path_weight, math.sqrt(2 * l3 + 1), rel_tol=1e-12):
                raise SystemExit(f"unexpected path weight {instr.path_weight} for {instr}")
            paths.append([l1, l2, l3])
            weight_pos += mul1
            key = f"w3j/{l1}{l2}{l3}"
            if key not in arrays:
                arrays[key] = wigner_3j_used(tp, l1, l2, l3)
        # outputs of one l must come out in instruction order (e3nn sorts them so)
        assert [i.i_out for i in tp.instructions] == sorted(i.i_out for i in tp.instructions)
        mlp = conv.weight_nn
        layers = [getattr(mlp, f"layer{k}") for k in range(len(mlp.hs) - 1)]
        assert mlp.hs[-1] == weight_pos
        for k, layer in enumerate(layers):
            assert layer.var_in == 1 and layer.var_out == 1
            arrays[f"{t}/radial/{k}"] = layer.weight.detach().numpy()
        act_radial = act_constant(layers[0].act)
        for name, key in (
            ("self_connection", f"{t}_self_connection_intro"),
            ("linear_in", f"{t}_self_interaction_1"),
            ("linear_out", f"{t}_self_interaction_2"),
        ):
            for ell, mat in dense_linear(mods[key].linear).items():
                arrays[f"{t}/{name}/l{ell}"] = mat
        arrays[f"{t}/denominator"] = conv.denominator.detach().numpy().reshape(())
        gate = mods[f"{t}_equivariant_gate"].gate
        scalars = irreps_ls(gate.irreps_scalars)
        gated = irreps_ls(gate.irreps_gated)
        act_scalar = act_constant(gate.act_scalars)
        act_gate = act_constant(gate.act_gates) if gated else None
        blocks.append(
            {
                "irreps_in": [[m, ell] for m, ell in x_ls],
                "paths": paths,
                "scalars": sum(m for m, _ in scalars),
                "gated": [[m, ell] for m, ell in gated],
            }
        )
        if t == 0:
            arrays["act/radial"] = np.float64(act_radial)
            arrays["act/scalar"] = np.float64(act_scalar)
            if act_gate is not None:
                arrays["act/gate"] = np.float64(act_gate)
        else:
            assert arrays["act/radial"] == act_radial and arrays["act/scalar"] == act_scalar
        t += 1

    hidden = dense_linear(mods["reduce_input_to_hidden"].linear)
    energy = dense_linear(mods["reduce_hidden_to_energy"].linear)
    arrays["readout/hidden"], arrays["readout/energy"] = hidden[0], energy[0]
    rescale = mods["rescale_atomic_energy"]
    arrays["shift"] = rescale.shift.detach().numpy()[order]
    arrays["scale"] = rescale.scale.detach().numpy()[order]

    architecture = {
        "n_basis": int(arrays["bessel_coeffs"].size),
        "lmax_edge": int(lmax_edge),
        "envelope": envelope,
        "radial_hidden": [int(h) for h in mlp.hs[1:-1]],
        "blocks": blocks,
    }
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    provenance = {
        "package": "sevenn",
        "sevenn_version": sevenn.__version__,
        "torch_version": torch.__version__,
        "checkpoint": str(Path(*checkpoint.parts[-2:])),
        "checkpoint_sha256": digest,
        "converter": "data/sevennet/convert.py",
        "licence": "SevenNet code and pretrained weights: MIT licence (Copyright (c) 2023 "
        "MDIL-SNU, Seoul National University); see the sevenn package's LICENSE",
    }
    if config is not None:
        provenance["checkpoint_config_cutoff"] = float(config.get("cutoff", cutoff))
    return numbers, cutoff, architecture, arrays, provenance


def write(name: str, numbers, cutoff, architecture, arrays, provenance, description, citation):
    import numpy as np
    import tomli_w  # noqa: F401  (checked before the weights are written)
    from ase.data import chemical_symbols

    out = ROOT / "potentials"
    weights = out / f"{name}.npz"
    tmp = weights.with_name(f".{weights.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, weights)
    n_params = sum(int(v.size) for k, v in arrays.items() if not k.startswith(("w3j/", "act/")))
    card = {
        "kind": "sevennet",
        "name": name,
        "description": description,
        "reference": citation,
        "elements": [chemical_symbols[z] for z in numbers],
        "cutoff": cutoff,
        # a universal model is used when asked for (--potential), never picked implicitly
        "implicit": False,
        "weights": weights.name,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "n_parameters": n_params,
        "architecture": architecture,
        "provenance": provenance,
    }
    text = tomli_w.dumps(card)
    (out / f"{name}.toml").write_text(text)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB, {n_params} parameters)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="7net-0", help="sevenn pretrained model name")
    parser.add_argument("--name", default="sevennet-0", help="molopt potential name")
    args = parser.parse_args()
    need_sevenn()
    try:
        import tomli_w  # noqa: F401
    except ImportError:
        sys.exit("convert.py writes the card with tomli-w: pip install tomli-w")
    numbers, cutoff, architecture, arrays, provenance = convert(args.model)
    description = (
        f"SevenNet ({args.model}), NequIP-style equivariant message passing trained on MPtrj "
        "(PBE/PBE+U), converted from the sevenn package's checkpoint"
    )
    citation = (
        "Y. Park, J. Kim, S. Hwang, S. Han, 'Scalable Parallel Algorithm for Graph Neural "
        "Network Interatomic Potentials in Molecular Dynamics Simulations', J. Chem. Theory "
        "Comput. 20, 4857 (2024), doi:10.1021/acs.jctc.4c00190"
    )
    write(args.name, numbers, cutoff, architecture, arrays, provenance, description, citation)


if __name__ == "__main__":
    main()
