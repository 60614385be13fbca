"""The Claim record, the registry and the shared runners (digits training, full-batch simulation)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optdist


@dataclasses.dataclass(frozen=True)
class Claim:
    """One paper claim and how we check it.

    Attributes:
      name: short id (``--only=name``).
      paper: authors, title, venue.
      claim: the claim in one sentence.
      paper_figure: the paper's own number / figure for it.
      criterion: the pass criterion, fixed before our number was seen.
      config: ``config(quick) -> str``, the setup we ran.
      run: ``run(quick) -> dict`` of measured numbers (JSON-serialisable).
      passes: ``passes(measured) -> bool``, the criterion as code.
      ours: ``ours(measured) -> str``, the measured numbers in one line.
    """

    name: str
    paper: str
    claim: str
    paper_figure: str
    criterion: str
    config: Callable[[bool], str]
    run: Callable[[bool], dict]
    passes: Callable[[dict], bool]
    ours: Callable[[dict], str]


REGISTRY: dict[str, Claim] = {}


def register(claim: Claim) -> Claim:
    if claim.name in REGISTRY:
        raise ValueError(f"claim {claim.name!r} is registered twice")
    REGISTRY[claim.name] = claim
    return claim


# --------------------------------------------------------------------------- #
# Digits (scikit-learn 8x8 images, MLP, 8 simulated workers) through experiments.train's Task/Runner.

_DIGITS_CACHE: dict[str, dict] = {}


def digits_config(quick: bool, **fields):
    """The default digits config (experiments/configs/default.py) at the claim's size.

    Quick: 300 steps, hidden 128; full: 1000 steps, hidden 256. ``fields`` override top-level
    fields; a key ``"hparams.<method>.<field>"`` sets a method setting.
    """
    from experiments.configs import default

    c = default.get_config()
    c.steps = 300 if quick else 1000
    c.hidden = 128 if quick else 256
    c.eval_every = 25
    for key, value in fields.items():
        node, *path = key.split(".")
        if not path:
            setattr(c, key, value)
            continue
        target = getattr(c, node)
        for p in path[:-1]:
            target = getattr(target, p)
        setattr(target, path[-1], value)
    return c


def train_digits(config, tx: optax.GradientTransformation | None = None) -> dict:
    """Trains ``tx`` (default: ``experiments.methods.build(config)``) on the config's task.

    Returns ``{"history": [{step, test_loss, test_accuracy, bytes_per_worker}], "final": {...}}``;
    bytes are worker 0's cumulative bytes (``optdist.bytes_sent``). Results of configs built from
    the registry (``tx=None``) are cached by config, so claims sharing a baseline run it once.
    """
    from experiments import methods, train

    key = json.dumps(config.to_dict(), sort_keys=True, default=str) if tx is None else None
    if key is not None and key in _DIGITS_CACHE:
        return _DIGITS_CACHE[key]
    task = train.Task(config)
    tx = methods.build(config) if tx is None else tx
    params_w, state_w = optdist.replicate((task.params, tx.init(task.params)), config.num_workers)
    run = train.Runner(task, tx, config.execution)
    evaluate = jax.jit(jax.vmap(task.evaluate))
    history, step = [], 0
    while step < config.steps:
        n = min(config.eval_every, config.steps - step)
        params_w, state_w, _, _ = run(params_w, state_w, task.shards, step, n)
        step += n
        loss, acc = evaluate(params_w)
        history.append(
            {
                "step": step,
                "test_loss": float(np.mean(loss)),
                "test_accuracy": float(np.mean(acc)),
                "bytes_per_worker": int(np.max(np.asarray(optdist.bytes_sent(state_w)))),
            }
        )
    result = {"history": history, "final": history[-1]}
    if key is not None:
        _DIGITS_CACHE[key] = result
    return result


def steps_to(history: list[dict], field: str, target: float, below: bool = True) -> int | None:
    """First evaluated step where ``field`` is <= target (``below``) or >= target; None if never."""
    for h in history:
        if (h[field] <= target) if below else (h[field] >= target):
            return h["step"]
    return None


# --------------------------------------------------------------------------- #
# Full-batch synthetic problems on simulated workers.


def heterogeneous_least_squares(n: int = 8, m: int = 20, d: int = 10, seed: int = 0):
    """Worker i: f_i(x) = 1/(2m) ||A_i x - b_i||^2 with its own target model (non-IID).

    Returns ``(A [n, m, d], b [n, m], x_star [d])``, x_star the float64 minimiser of the mean.
    """
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, m, d))
    targets = rng.normal(size=(n, d)) * 2.0  # far-apart local optima: strong heterogeneity
    b = np.einsum("nmd,nd->nm", a, targets) + 0.1 * rng.normal(size=(n, m))
    h = np.einsum("nmd,nme->de", a, a) / (n * m)
    x_star = np.linalg.solve(h, np.einsum("nmd,nm->d", a, b) / (n * m))
    return a.astype(np.float32), b.astype(np.float32), x_star


def ls_loss(x, a_i, b_i):
    r = a_i @ x - b_i
    return 0.5 * jnp.mean(r * r)


def run_full_batch(tx, loss, x0, data, steps: int, record_every: int = 0):
    """``steps`` full-batch steps of ``tx`` on every worker (worker i gets ``data[k][i]``).

    Returns ``(x_w [n, ...], state_w, trace)`` where trace is the per-worker iterates every
    ``record_every`` steps (``[T, n, ...]``; empty when 0).
    """
    n = jax.tree_util.tree_leaves(data)[0].shape[0]

    def step(x, s, *d):
        g = jax.grad(loss)(x, *d)
        u, s = tx.update(g, s, x)
        return optax.apply_updates(x, u), s

    run = optdist.simulate(step, "data", jit=False)

    @jax.jit
    def scan(carry):
        def body(c, _):
            c = run(*c, *data)
            return c, c[0]

        return jax.lax.scan(body, carry, None, length=steps)

    carry = optdist.replicate((x0, tx.init(x0)), n)
    (x_w, s_w), trace = scan(carry)
    if record_every:
        trace = trace[record_every - 1 :: record_every]
    else:
        trace = None
    return x_w, s_w, trace
