"""Closed-form 3 x 3 linear algebra for the compiled step: determinant, inverse, solve and
matrix exponential of stacks of cells and deformation gradients, shape (..., 3, 3).

``jax.numpy.linalg`` and ``jax.scipy.linalg.expm`` are general-size routines: an LU
factorization with pivoting per inverse, and an exponential that evaluates all five of
scipy's Pade orders and picks one by the norm. Inside a variable-cell step they made up most
of its program, and its compile time. Here each is a few dozen elementwise operations and
small matrix products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _cofactors(a: jax.Array) -> jax.Array:
    """Cofactor matrices (..., 3, 3): C_ij = a[i+1, j+1] a[i+2, j+2] - a[i+1, j+2] a[i+2, j+1],
    indices mod 3, from four cyclic shifts of ``a`` (a handful of operations; ``jnp.cross``
    lowers each cross product to dozens of slices)."""

    def shifted(rows: int, cols: int) -> jax.Array:
        return jnp.roll(jnp.roll(a, -rows, axis=-2), -cols, axis=-1)

    return shifted(1, 1) * shifted(2, 2) - shifted(1, 2) * shifted(2, 1)


def det3(a: jax.Array) -> jax.Array:
    """Determinants (...,) of ``a`` (..., 3, 3), expanded along the first row."""
    return jnp.sum(a[..., 0, :] * _cofactors(a)[..., 0, :], axis=-1)


def inv3(a: jax.Array) -> jax.Array:
    """Inverses (..., 3, 3) of ``a`` (..., 3, 3) by the adjugate, the transposed cofactors
    over the determinant (inf/NaN for a singular matrix, as a factorization would give)."""
    cofactors = _cofactors(a)
    det = jnp.sum(a[..., 0, :] * cofactors[..., 0, :], axis=-1)
    return jnp.swapaxes(cofactors, -1, -2) / det[..., None, None]


def solve3(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solutions x (..., 3, 3) of a x = b for ``a``, ``b`` (..., 3, 3): Gauss-Jordan
    elimination with partial pivoting, unrolled. A row whose multiplier is zero is left
    exactly as it was, so a block-diagonal ``a`` and ``b`` give an exactly block-diagonal x
    (a slab's fixed out-of-plane cell vector stays bit for bit), as LAPACK's LU does and the
    adjugate formula does not."""
    augmented = jnp.concatenate([a, b], axis=-1)
    rows = [augmented[..., k, :] for k in range(3)]
    for k in range(3):
        for i in range(k + 1, 3):  # the first row of largest |a_ik| becomes the pivot row
            swap = (jnp.abs(rows[i][..., k]) > jnp.abs(rows[k][..., k]))[..., None]
            rows[k], rows[i] = jnp.where(swap, rows[i], rows[k]), jnp.where(swap, rows[k], rows[i])
        pivot = rows[k]
        for i in range(3):
            if i != k:
                rows[i] = rows[i] - (rows[i][..., k] / pivot[..., k])[..., None] * pivot
    # element by element: XLA rewrites a division by a broadcast as a product with the
    # reciprocal, which does not give b / b = 1 exactly
    return jnp.stack(
        [
            jnp.stack([rows[k][..., 3 + j] / rows[k][..., k] for j in range(3)], -1)
            for k in range(3)
        ],
        axis=-2,
    )


#: Coefficients b_0..b_13 of the [13/13] Pade approximant of exp, and the largest 1-norm
#: for which it is accurate to double-precision unit roundoff: Higham, SIAM J. Matrix Anal.
#: Appl. 26, 1179 (2005), Table 2.3 and eq. (2.3).
_PADE13 = (
    64764752532480000.0,
    32382376266240000.0,
    7771770303897600.0,
    1187353796428800.0,
    129060195264000.0,
    10559470521600.0,
    670442572800.0,
    33522128640.0,
    1323241920.0,
    40840800.0,
    960960.0,
    16380.0,
    182.0,
    1.0,
)
_THETA13 = 5.371920351148152


def expm3(a: jax.Array) -> jax.Array:
    """Matrix exponentials (..., 3, 3) of ``a`` (..., 3, 3) by the [13/13] Pade approximant
    (Higham 2005; scipy.linalg.expm takes it for norms above 2.1, lower orders below), NaN
    where the 1-norm of ``a`` exceeds 5.37, beyond which the approximant needs scaling and
    squaring. A variable-cell relaxation calls it with U/N = log F, F the deformation
    gradient: 5.37 is a cell stretched ~200-fold, a system that has blown up (it fails as a
    non-finite one does). The squarings are left out: their loop, and the scan of saved
    squares in the derivative, took about a third of a variable-cell step's compile time.
    Reverse-mode
    differentiable; the derivative is the Frechet derivative of the exponential to rounding.
    Agrees with scipy.linalg.expm to ~1e-16 relative for norms below 1."""
    b = _PADE13
    norm = jax.lax.stop_gradient(jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1))
    eye = jnp.broadcast_to(jnp.eye(3, dtype=a.dtype), a.shape)
    a2 = a @ a
    a4 = a2 @ a2
    a6 = a4 @ a2
    u = a @ (a6 @ (b[13] * a6 + b[11] * a4 + b[9] * a2) + b[7] * a6 + b[5] * a4 + b[3] * a2)
    u = u + b[1] * a
    v = a6 @ (b[12] * a6 + b[10] * a4 + b[8] * a2) + b[6] * a6 + b[4] * a4 + b[2] * a2
    v = v + b[0] * eye
    return jnp.where((norm <= _THETA13)[..., None, None], solve3(v - u, v + u), jnp.nan)
