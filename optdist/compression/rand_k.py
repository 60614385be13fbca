"""Random-k sparsification with a seed shared by all workers (summable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optdist import _checks
from optdist.compression.base import Compressor, summable
from optdist.compression.top_k import num_kept


def rand_k(ratio: float, seed: int = 0) -> Compressor:
    r"""Keeps ``k`` uniformly random coordinates, the same on every worker, scaled by ``d/k``.

    .. math:: C(x) = \frac{d}{k} \sum_{j \in S} x_j e_j, \qquad S \sim \mathrm{Unif}\binom{[d]}{k}

    Unbiased (:math:`E[C(x)] = x`), with :math:`E\|C(x)\|^2 = (d/k)\|x\|^2`.
    Because all workers draw ``S`` from the same key (``seed`` + step count +
    leaf index), only the ``k`` values are sent and they are *summed* by one
    all-reduce; the indices are rebuilt from the key, never sent. Each worker
    sends ``2 (n-1) ceil(K/n) s`` bytes for ``K`` values in total. Stateless.

    Args:
      ratio: fraction of coordinates kept, in (0, 1].
      seed: folded into the step key so different rand-k instances differ.

    Returns:
      A :class:`~optdist.compression.Compressor`.

    Example::

      tx = optax.chain(optdist.compressed_mean(optdist.compressors.rand_k(0.1), "data"), optax.sgd(0.1))

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
      Wangni, Wang, Liu, Zhang, "Gradient Sparsification for Communication-Efficient
      Distributed Optimization", NeurIPS 2018.
    """
    ratio = _checks.in_range(ratio, "ratio", 0.0, 1.0, low_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}.")

    def indices(key, size):
        k = num_kept(ratio, size)
        return jax.random.choice(jax.random.fold_in(key, seed), size, (k,), replace=False)

    def encode(x, key, aux):
        del aux
        d = x.shape[0]
        idx = indices(key, d)
        return {"values": x[idx] * (d / idx.shape[0])}

    def decode(payload, size, key, aux):
        del aux
        values = payload["values"]
        return jnp.zeros((size,), values.dtype).at[indices(key, size)].set(values)

    return summable(f"rand_k({ratio:g})", encode, decode)
