"""PowerSGD numerics: the warm-started Q is re-orthogonalized each step (PyTorch's hook), so float32
stays near float64 on an ill-conditioned matrix; the paper's form (``orthogonalize_q=False``) squares
the condition number of P and loses the small singular directions. Same result in exact arithmetic."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optdist
from optdist import compression
from optdist.comm import Channel

ROWS, COLS, RANK, STEPS = 64, 32, 4, 8
SINGULAR_VALUES = np.array([1.0, 1e-2, 1e-3, 1e-4])


def _matrix() -> np.ndarray:
    """An exactly rank-4 64 x 32 float32 matrix with singular values 1, 1e-2, 1e-3, 1e-4."""
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.normal(size=(ROWS, RANK)))[0]
    v = np.linalg.qr(rng.normal(size=(COLS, RANK)))[0]
    return ((u * SINGULAR_VALUES) @ v.T).astype(np.float32)


def _gram_schmidt64(p: np.ndarray) -> np.ndarray:
    out = []
    for j in range(p.shape[-1]):
        c = p[:, j].copy()
        for q in out:
            c -= (q @ c) * q
        out.append(c / np.linalg.norm(c))
    return np.stack(out, -1)


def _reference64(m: np.ndarray, q0: np.ndarray) -> list[np.ndarray]:
    """The decoded matrix per step in float64 (one worker, warm start): P = M Q, P^ = orth(P),
    Q = M^T P^, decoded P^ Q^T. (Orthogonalizing Q first changes nothing in exact arithmetic.)"""
    m, q = m.astype(np.float64), q0.astype(np.float64)
    decoded = []
    for _ in range(STEPS):
        p = _gram_schmidt64(m @ q)
        q = m.T @ p
        decoded.append(p @ q.T)
    return decoded


@pytest.fixture(scope="module")
def matrix_and_reference():
    m = _matrix()
    q0 = np.asarray(compression.powersgd(RANK).init({"m": m}).q[0][0])
    return m, _reference64(m, q0)


def _relative_errors(m, reference, **options) -> np.ndarray:
    comp = compression.powersgd(RANK, **options)

    @jax.jit
    def decoded(x):
        def body(state, _):
            agg = comp.aggregate({"m": x}, state, jax.random.key(0), 0, Channel(None))
            return agg.state, agg.mean["m"]

        return jax.lax.scan(body, comp.init({"m": x}), None, length=STEPS)[1]

    out = np.asarray(decoded(jnp.asarray(m)), np.float64)
    return np.array([np.linalg.norm(o - r) / np.linalg.norm(r) for o, r in zip(out, reference)])


@pytest.mark.parametrize("orthogonalization", ["auto", "qr"])
def test_float32_stays_near_float64_on_an_ill_conditioned_matrix(matrix_and_reference, orthogonalization):
    m, reference = matrix_and_reference
    err = _relative_errors(m, reference, orthogonalization=orthogonalization)
    # Step 0 starts from the random Q (cond(P) = cond(M) = 1e4 either way); warm-started steps keep
    # cond(P) = cond(M), so their error is float32 rounding (measured 1.5e-7 .. 2.7e-7).
    assert err[0] < 1e-3
    assert err[1:].max() < 2e-6, err


def test_the_papers_form_loses_the_small_directions(matrix_and_reference):
    """``orthogonalize_q=False`` reuses Q = M^T P^ as is: its columns scale like the singular values,
    cond(M Q) = cond(M)^2 = 1e8 > 1/eps(float32), and Gram-Schmidt of P loses the 1e-4 direction."""
    m, reference = matrix_and_reference
    paper = _relative_errors(m, reference, orthogonalize_q=False)
    hook = _relative_errors(m, reference)
    # Losing the 1e-4 direction alone is a relative error of ~1e-4 (measured 4.5e-4; 7.6e-2 with the
    # stacked products of the previous implementation: how far beyond depends on rounding order).
    assert paper[1:].max() > 5e-5, paper
    assert paper[1:].max() > 100 * hook[1:].max()


def test_orthogonalize_q_is_validated_and_forwarded():
    with pytest.raises(TypeError, match="orthogonalize_q"):
        compression.powersgd(2, orthogonalize_q="yes")
    with pytest.raises(TypeError, match="orthogonalize_q"):
        optdist.powersgd(2, "data", orthogonalize_q=1)


@pytest.mark.parametrize("rank, limit", [(1, 9.8), (4, 10.8)])
def test_simulated_ef_step_makes_three_passes_over_the_data(rank, limit):
    """Bytes accessed (optimized HLO) of one EF step, 2 simulated workers, one 576 x 64 leaf: M = G + E
    written once and read in place by both products, the decode fused into the output and residual
    writes: ~9 passes of W*G (read G, E, write M; read M twice; read M, E, write the residual and the
    output), plus the finiteness checks and the small factors (measured 9.4 at rank 1, 10.3 at rank 4;
    the stacked path with the transposed copy of M: 11.4 and 14.0). jax 0.10.2's XLA:CPU fusion."""
    from experiments.benchmarks import hlo_cost

    workers, shape = 2, (576, 64)
    params = {"w": jnp.zeros(shape)}
    tx = optdist.powersgd(rank, "data")
    grads = {"w": jax.random.normal(jax.random.key(0), (workers, *shape))}
    state = optdist.replicate(tx.init(params), workers)
    step = optdist.simulate(lambda g, s: tx.update(g, s, params), "data")
    compiled = step.lower(grads, state).compile()
    passes = hlo_cost.bytes_accessed(compiled.as_text()).total / (workers * 4 * math.prod(shape))
    assert passes < limit, passes
