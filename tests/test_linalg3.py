"""The closed-form 3 x 3 linear algebra of the variable-cell step against numpy and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from molopt.linalg3 import det3, expm3, inv3, solve3


def test_determinant_inverse_and_solve_equal_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 40, 3, 3))
    np.testing.assert_allclose(det3(jnp.asarray(a)), np.linalg.det(a), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(inv3(jnp.asarray(a)), np.linalg.inv(a), rtol=1e-9, atol=1e-11)
    x = solve3(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("scale", [1e-9, 1e-3, 0.05, 0.3, 1.0])
def test_expm_equals_scipy(scale):
    """To ~1e-15 relative for the norms of a relaxation's log-deformations (and a few
    times that up to 1, where random matrices are less well conditioned)."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 3, 3)) * scale
    a = a[np.abs(a).sum(axis=1).max(axis=1) <= 5.3]
    mine = np.asarray(expm3(jnp.asarray(a)))
    for m, x in zip(mine, a, strict=True):
        ref = scipy.linalg.expm(x)
        tol = 2e-15 if scale < 0.5 else 1e-12
        assert np.abs(m - ref).max() <= tol * np.abs(ref).max()


def test_expm_derivative_is_the_frechet_derivative():
    rng = np.random.default_rng(2)
    a, e = rng.normal(size=(2, 3, 3)) * 0.4
    _, tangent = jax.jvp(expm3, (jnp.asarray(a),), (jnp.asarray(e),))
    np.testing.assert_allclose(tangent, scipy.linalg.expm_frechet(a, e)[1], atol=1e-14)
    # the adjoint, as the cell filter uses it: L(A, E) . G = E . L(A^T, G)
    g = rng.normal(size=(3, 3))
    (pulled,) = jax.vjp(expm3, jnp.asarray(a))[1](jnp.asarray(g))
    np.testing.assert_allclose(pulled, scipy.linalg.expm_frechet(a.T, g)[1], atol=1e-14)


def test_block_diagonal_stays_exactly_block_diagonal():
    """A slab's log-deformation moves only the in-plane block: exp keeps the out-of-plane
    row and column exactly (0, 0, 1), so the fixed cell vector does not drift by a bit."""
    rng = np.random.default_rng(3)
    # first, one the slab of test_cell_options reached (a division by a broadcast pivot
    # gave 0.9999999999999999 for its zz)
    blocks = [
        [[0.11106309736376666, -0.061714704353420725], [-0.061235990960389716, 0.6742959358593876]]
    ]
    for block in blocks + [rng.normal(size=(2, 2)) * 0.3 for _ in range(20)]:
        u = np.zeros((3, 3))
        u[:2, :2] = block
        f = np.asarray(expm3(jnp.asarray(u)))
        assert f[2].tolist() == [0.0, 0.0, 1.0] and f[:2, 2].tolist() == [0.0, 0.0]


def test_beyond_the_pade_range_is_nan():
    """A 1-norm over 5.37 (a cell stretched ~200-fold) is NaN: the system fails as a
    non-finite one, instead of an inaccurate exponential."""
    out = np.asarray(expm3(jnp.asarray(np.stack([np.eye(3) * 6.0, np.eye(3) * 0.1]))))
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1], np.eye(3) * np.exp(0.1), rtol=1e-15)
