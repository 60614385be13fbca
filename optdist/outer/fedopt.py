"""FedOpt: FedAvg, FedAdagrad, FedAdam, FedYogi — adaptive server optimizers on the clients' mean update."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optdist import _checks
from optdist.comm.axes import AxisName
from optdist.outer import _validate
from optdist.outer.outer_loop import SyncEvery, outer_loop

Kind = Literal["adagrad", "adam", "yogi"]


class ScaleByFedOptState(NamedTuple):
    """Server state (identical on every worker): first moment ``m`` and second moment ``v``."""

    mu: Any
    nu: Any


def scale_by_fedopt(
    kind: Kind, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3
) -> optax.GradientTransformation:
    r"""The server direction of Reddi et al.'s Algorithm 2, fed DiLoCo's pseudo-gradient ``Δ``.

    With ``Δ = θ − mean_i θ_i`` (so the paper's ``Δ_t = mean_i(θ_i − θ) = −Δ``):

    .. math::

        m &\leftarrow β_1 m + (1 - β_1) Δ \\
        v &\leftarrow v + Δ^2 \ (\text{adagrad}), \quad
          β_2 v + (1 - β_2) Δ^2 \ (\text{adam}), \quad
          v - (1 - β_2) Δ^2 \operatorname{sign}(v - Δ^2) \ (\text{yogi}) \\
        \text{direction} &= m / (\sqrt{v} + τ)

    ``v`` starts at ``τ²`` (the paper requires ``v_{-1} ≥ τ²``), ``m`` at 0, no
    bias correction (as in the paper). Chain with ``optax.scale(-η)``: the
    server then adds ``η m_paper / (\sqrt{v} + τ)``, which is the paper's step,
    since ``m`` here is ``−m_paper`` and ``v`` is unchanged by the sign.
    """
    if kind not in ("adagrad", "adam", "yogi"):
        raise ValueError(f"kind must be 'adagrad', 'adam' or 'yogi'; got {kind!r}.")
    b1 = _validate.decay(b1, "b1")
    b2 = _validate.decay(b2, "b2")
    tau = _checks.in_range(tau, "tau", 0.0, float("inf"), low_open=True, high_open=True)

    def init_fn(params):
        mu = jax.tree_util.tree_map(jnp.zeros_like, params)
        nu = jax.tree_util.tree_map(lambda p: jnp.full_like(p, tau * tau), params)
        return ScaleByFedOptState(mu, nu)

    def second_moment(v, d):
        d2 = d * d
        if kind == "adagrad":
            return v + d2
        if kind == "adam":
            return b2 * v + (1 - b2) * d2
        return v - (1 - b2) * d2 * jnp.sign(v - d2)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree_util.tree_map(lambda m, d: b1 * m + (1 - b1) * d, state.mu, updates)
        nu = jax.tree_util.tree_map(second_moment, state.nu, updates)
        out = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return out, ScaleByFedOptState(mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def _server(kind: Kind, server_lr: Any, b1: float, b2: float, tau: float) -> optax.GradientTransformation:
    return optax.chain(scale_by_fedopt(kind, b1, b2, tau), optax.scale_by_learning_rate(server_lr))


_DOC = r"""{title}

    Clients run ``sync_every`` local SGD steps with ``client_lr`` from the
    server model ``θ``; the server forms ``Δ_t = mean_i(θ_i − θ)`` and
    {server}
    Sign convention: optdist's outer loop hands the outer optimizer DiLoCo's
    ``Δ = θ − mean_i θ_i = −Δ_t`` as a gradient to descend; the server
    transform is written for that input and gives exactly the paper's step.

    State: client SGD has no state; the server moments and ``θ`` are
    identical on every worker. Bytes: one all-reduce of the parameters per
    round. Non-finite policy: as :func:`optdist.outer.outer_loop`. Partial
    participation (the usual federated setting): ``num_participants=`` or
    ``participation=`` (see :func:`outer_loop`).

    Args:
      client_lr: client SGD learning rate ``η_l`` (float or schedule).
      server_lr: server learning rate ``η``.
      sync_every: local steps per round ``K``.
      axis_name: the worker (client) axis, or None.
      {extra}**kwargs: forwarded to :func:`outer_loop`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example::

      tx = optdist.{name}(client_lr=0.05, server_lr={example_lr}, sync_every=10, axis_name="data",
                          num_participants=4)

    References:
      Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan,
      "Adaptive Federated Optimization", ICLR 2021.
      McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
      Learning of Deep Networks from Decentralized Data", AISTATS 2017.
"""
_ADAPTIVE_ARGS = (
    "b1: server first-moment decay. b2: server second-moment decay (not used by adagrad).\n"
    "      tau: adaptivity ``τ`` (also the square root of ``v``'s initial value).\n      "
)


def _clients(client_lr: Any) -> optax.GradientTransformation:
    return optax.sgd(_validate.learning_rate(client_lr, "client_lr"))


def fedavg(
    client_lr: Any, server_lr: Any, sync_every: SyncEvery, axis_name: AxisName = "data", **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    outer = optax.sgd(_validate.learning_rate(server_lr, "server_lr"))
    return outer_loop(_clients(client_lr), outer, sync_every, axis_name, **_validate.forwarded(kwargs))


def _adaptive(kind: Kind):
    def make(
        client_lr: Any,
        server_lr: Any,
        sync_every: SyncEvery,
        axis_name: AxisName = "data",
        *,
        b1: float = 0.9,
        b2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> optax.GradientTransformationExtraArgs:
        outer = _server(kind, _validate.learning_rate(server_lr, "server_lr"), b1, b2, tau)
        return outer_loop(_clients(client_lr), outer, sync_every, axis_name, **_validate.forwarded(kwargs))

    return make


fedadagrad = _adaptive("adagrad")
fedadam = _adaptive("adam")
fedyogi = _adaptive("yogi")
fedadagrad.__name__ = fedadagrad.__qualname__ = "fedadagrad"
fedadam.__name__ = fedadam.__qualname__ = "fedadam"
fedyogi.__name__ = fedyogi.__qualname__ = "fedyogi"

fedavg.__doc__ = _DOC.format(
    title="FedAvg with a server learning rate: ``θ ← θ + η · mean_i(θ_i − θ)``.",
    server="takes the step ``θ ← θ + η Δ_t`` (``η = 1``: plain FedAvg / Local SGD).\n",
    extra="",
    name="fedavg",
    example_lr=1.0,
)
_SERVER = (
    "applies {opt} to it without bias correction (Algorithm 2):\n"
    "    ``m ← β₁ m + (1 − β₁) Δ_t``; {v}; ``θ ← θ + η m / (√v + τ)``, ``v₀ = τ²``.\n"
)
for _fn, _opt, _v in (
    (fedadagrad, "Adagrad", "``v ← v + Δ_t²``"),
    (fedadam, "Adam", "``v ← β₂ v + (1 − β₂) Δ_t²``"),
    (fedyogi, "Yogi", "``v ← v − (1 − β₂) Δ_t² sign(v − Δ_t²)``"),
):
    _fn.__doc__ = _DOC.format(
        title=f"Fed{_opt}: local client SGD, {_opt} on the server.",
        server=_SERVER.format(opt=_opt, v=_v),
        extra=_ADAPTIVE_ARGS,
        name=_fn.__name__,
        example_lr=0.01,
    )
