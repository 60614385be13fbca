"""Named optimizer stacks for experiments: ``config.method`` -> optax transform.

Every entry is built for worker axis ``axis_name`` and returns a transform
that takes per-worker gradients. ``communicates`` says whether the method
talks to other workers (then non-finite steps are skipped in agreement over
the axis; otherwise each worker decides alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import optax

import optdist


@dataclasses.dataclass(frozen=True)
class Method:
    build: Callable[[object, str], optax.GradientTransformation]
    communicates: bool = True
    description: str = ""
    family: str = "mean"


METHODS: dict[str, Method] = {}


def register(name: str, *, communicates: bool = True, description: str = "", family: str = "mean"):
    """Adds ``fn(config, axis_name) -> transform`` under ``name``; ``family`` groups methods for tests."""

    def deco(fn):
        METHODS[name] = Method(fn, communicates, description, family)
        return fn

    return deco


def base_optimizer(config) -> optax.GradientTransformation:
    """The per-step optimizer chained after the communication transform."""
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return optax.sgd(lr, momentum=config.get("momentum", 0.9))
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.get("weight_decay", 1e-4))
    raise ValueError(f"Unknown optimizer {config.optimizer!r}: choose 'sgd', 'adam' or 'adamw'.")


@register("exact_mean", description="synchronous data parallel: exact all-reduce mean")
def _exact_mean(config, axis_name):
    return optax.chain(optdist.mean_gradients(axis_name), base_optimizer(config))


@register("local_only", communicates=False, description="each worker trains alone", family="local")
def _local_only(config, axis_name):
    del axis_name
    return base_optimizer(config)


# Gradient compression (issue 3): a compressed mean (optionally with error feedback), then the
# base optimizer.
def _compressed(make_compressor, feedback=None):
    def build_fn(config, axis_name):
        tx = optdist.compressed_mean(make_compressor(), axis_name, feedback=feedback)
        return optax.chain(tx, base_optimizer(config))

    return build_fn


for _rank in (1, 2, 4):
    register(f"powersgd_r{_rank}", description=f"PowerSGD rank {_rank} with EF", family="compression")(
        lambda config, axis_name, r=_rank: optax.chain(optdist.powersgd(r, axis_name), base_optimizer(config))
    )
COMPRESSED = {
    "topk_1pct_ef": (lambda: optdist.compressors.top_k(0.01), "ef", "top-k 1% with EF"),
    "topk_1pct": (lambda: optdist.compressors.top_k(0.01), None, "top-k 1%, no feedback"),
    "topk_1pct_ef21": (lambda: optdist.compressors.top_k(0.01), "ef21", "top-k 1% with EF21"),
    "topk_1pct_econtrol": (lambda: optdist.compressors.top_k(0.01), "econtrol", "top-k 1% with EControl"),
    "qsgd_8bit": (lambda: optdist.compressors.qsgd(127, 512), None, "QSGD 127 levels, buckets of 512"),
    "terngrad": (lambda: optdist.compressors.terngrad(2.5), None, "TernGrad, clip 2.5 sigma"),
    "sign_ef": (lambda: optdist.compressors.sign(scaled=True), "ef", "scaled sign with EF"),
    "bf16": (lambda: optdist.compressors.cast(jnp.bfloat16), None, "bfloat16 cast"),
    "demo": (lambda: optdist.compressors.demo(64, 8), None, "DeMo: 2-D DCT tiles up to 64x64, top-8"),
    "int8_ef": (
        lambda: optdist.compressors.int8(256, "nearest"),
        "ef",
        "int8, buckets of 256, fused EF kernel",
    ),
    "ternary_ef": (
        lambda: optdist.compressors.ternary(256),
        "ef",
        "ternary (2-bit), buckets of 256, fused EF",
    ),
    "scaled_sign_ef": (
        lambda: optdist.compressors.scaled_sign(256),
        "ef",
        "scaled sign per bucket, fused EF",
    ),
    "threshold_topk_1pct_ef": (
        lambda: optdist.compressors.threshold_top_k(0.01),
        "ef",
        "threshold top-k 1% (no sort), fused EF kernel",
    ),
}
for _name, (_make, _fb, _desc) in COMPRESSED.items():
    register(_name, description=_desc, family="compression")(_compressed(_make, _fb))


# Local-update outer loops (issue 5). ``config.sync_every`` sets H where the name has none.
def _inner_lr(config):
    return config.learning_rate


for _h in (10, 50, 200):

    def _diloco(config, axis_name, h=_h):
        return optdist.diloco(
            inner_lr=_inner_lr(config), sync_every=h, axis_name=axis_name, inner_weight_decay=0.0
        )

    register(
        f"diloco_h{_h}", description=f"DiLoCo: inner AdamW, outer Nesterov(0.7, 0.9), H={_h}", family="outer"
    )(_diloco)


@register(
    "diloco_h50_powersgd_r16",
    description="DiLoCo H=50, pseudo-gradients compressed by PowerSGD rank 16 with error feedback",
    family="outer",
)
def _diloco_powersgd(config, axis_name):
    compressed = optdist.powersgd(16, axis_name)  # compressed_mean(powersgd(16), feedback="ef")
    return optdist.diloco(
        inner_lr=_inner_lr(config),
        sync_every=50,
        axis_name=axis_name,
        inner_weight_decay=0.0,
        aggregator=compressed,
    )


@register("local_sgd_h10", description="Local SGD: base optimizer locally, average every 10", family="outer")
def _local_sgd(config, axis_name):
    return optdist.local_sgd(base_optimizer(config), 10, axis_name)


@register(
    "streaming_diloco_h50",
    description="Streaming DiLoCo: 2 fragments, H=50, tau=5, alpha=0.5",
    family="outer",
)
def _streaming(config, axis_name):
    return optdist.streaming_diloco(
        _inner_lr(config),
        50,
        axis_name,
        num_fragments=2,
        delay=5,
        alpha=0.5,
        outer_dtype=jnp.bfloat16,
        inner_weight_decay=0.0,
    )


@register(
    "qsr_diloco", description="DiLoCo + QSR: H_t = max(10, (0.5 lr_0 / lr_t)^2), cosine lr", family="outer"
)
def _qsr(config, axis_name):
    schedule = optax.cosine_decay_schedule(_inner_lr(config), config.steps, alpha=0.05)
    return optdist.diloco(
        inner_lr=schedule,
        sync_every=optdist.qsr_sync_every(10, 0.5 * _inner_lr(config), schedule),
        axis_name=axis_name,
        inner_weight_decay=0.0,
    )


@register("fedavg_h10", description="FedAvg: client SGD, server lr 1.0, H=10", family="outer")
def _fedavg(config, axis_name):
    return optdist.fedavg(config.learning_rate, 1.0, 10, axis_name)


@register("fedadam_h10", description="FedAdam: client SGD, server Adam(lr 0.01), H=10", family="outer")
def _fedadam(config, axis_name):
    return optdist.fedadam(config.learning_rate, 0.01, 10, axis_name)


# Decentralized (no all-reduce): each worker keeps its own parameters and gossips them with its graph
# neighbours after the base optimizer's local step. Evaluation averages the workers' own models.
for _graph in ("ring", "exponential", "one_peer_exponential"):
    register(
        f"dsgd_{_graph}", description=f"D-SGD: local step, then gossip on a {_graph}", family="decentralized"
    )(lambda config, axis_name, g=_graph: optax.chain(base_optimizer(config), optdist.gossip(g, axis_name)))


@register(
    "choco_ring_topk10",
    description="CHOCO-SGD: ring gossip of top-10% compressed changes, consensus step 0.3",
    family="decentralized",
)
def _choco(config, axis_name):
    compressor = optdist.compressors.top_k(0.1)
    step_size = config.get("consensus_step_size", 0.3)
    return optax.chain(
        base_optimizer(config), optdist.gossip("ring", axis_name, compressor, consensus_step_size=step_size)
    )


@register(
    "gradient_tracking_ring",
    description="gradient tracking (DIGing): ring-gossiped gradient tracker, then ring gossip",
    family="decentralized",
)
def _gradient_tracking(config, axis_name):
    return optax.chain(
        optdist.gradient_tracking("ring", axis_name),
        base_optimizer(config),
        optdist.gossip("ring", axis_name, order="combine_then_adapt"),
    )


# Preconditioning (issue 4): Shampoo after the exact mean, so statistics are identical on all workers.
# "shampoo" uses SHAMPOO_DEFAULTS updated by config.shampoo; "shampoo/every<k>/block<b>/graft<type>"
# (each part optional) overrides the refresh cadence, the block size and the grafting type.
SHAMPOO_DEFAULTS = {  # tuned on the char-LM (BENCHMARKS.md): Shampoo of the filtered gradient
    "learning_rate": 3e-3,
    "block_size": 128,
    "precondition_every": 10,
    "start_preconditioning_step": 10,
    "beta2": 0.99,
    "momentum": 0.0,
    "gradient_ema": 0.9,  # > 0: precondition a debiased EMA of the gradients (the filtered gradient)
    "grafting": "rmsprop",
    "graft_beta2": 0.999,
    "matrix_epsilon": 1e-6,
    "exponent_override": 2,  # L^{-1/2} G R^{-1/2} (default Shampoo: -1/4 per side)
}


def _shampoo_options(config, overrides: dict) -> dict:
    options = dict(SHAMPOO_DEFAULTS)
    unknown = set(config.get("shampoo", {})) - set(options)
    if unknown:
        raise ValueError(f"config.shampoo has unknown keys {sorted(unknown)}; known: {sorted(options)}.")
    options.update(dict(config.get("shampoo", {})))
    options.update(overrides)
    return options


def shampoo_method(name: str) -> Method:
    """Parses ``shampoo[/every<k>][/block<b>][/graft<type>]`` into a :class:`Method`."""
    overrides = {}
    for part in name.split("/")[1:]:
        if part.startswith("graft") and part[5:] in ("sgd", "adagrad", "rmsprop", "adam", "none"):
            overrides["grafting"] = part[5:]
            continue
        for prefix, key in (("every", "precondition_every"), ("block", "block_size")):
            if part.startswith(prefix) and part[len(prefix) :].isdigit():
                overrides[key] = int(part[len(prefix) :])
                break
        else:
            raise ValueError(
                f"Shampoo methods are named shampoo[/every<k>][/block<b>][/graft<type>]; got {name!r}."
            )

    def build_fn(config, axis_name):
        options = _shampoo_options(config, overrides)
        lr, ema = options.pop("learning_rate"), options.pop("gradient_ema")
        return optax.chain(
            optdist.mean_gradients(axis_name),
            *([optax.ema(ema, debias=True)] if ema else []),
            optdist.shampoo(lr, weight_decay=config.get("weight_decay", 0.0), **options),
        )

    return Method(build_fn, True, f"exact mean + Shampoo {overrides or ''}".strip(), "preconditioning")


METHODS["shampoo"] = shampoo_method("shampoo")


# Byzantine robustness (issue 6): parametric names "robust/<attack>/<aggregator>[+nnm][+mom]",
# with f = config.num_byzantine Byzantine workers (the first f).
ATTACKS = {
    "none": None,
    "sign_flip": lambda: optdist.attacks.sign_flip(4.0),  # sends -4 g: reverses the plain mean at f=2/10
    "ipm": lambda: optdist.attacks.ipm(10.0),  # Xie et al.'s large-epsilon IPM (reverses the mean)
    "alie": lambda: optdist.attacks.alie(),
    "gaussian": lambda: optdist.attacks.gaussian(1.0),
    "mimic": lambda: optdist.attacks.mimic(),
    "nan_inf": lambda: optdist.attacks.nan_inf(),
}
AGGREGATORS = {
    "mean": lambda f: optdist.aggregators.mean(),
    "median": lambda f: optdist.aggregators.median(),
    "trimmed_mean": lambda f: optdist.aggregators.trimmed_mean(f),
    "krum": lambda f: optdist.aggregators.krum(f),
    "geometric_median": lambda f: optdist.aggregators.geometric_median(),
    "centered_clip": lambda f: optdist.aggregators.centered_clip(tau=0.5, iters=3),
    "monna": lambda f: optdist.aggregators.monna(f),
    "flag": lambda f: optdist.aggregators.flag(),
}


def robust_method(name: str) -> Method:
    """Parses ``robust/<attack>/<aggregator>[+nnm][+mom]`` into a :class:`Method`."""
    try:
        _, attack, agg = name.split("/")
    except ValueError:
        raise ValueError(
            f"Robust methods are named robust/<attack>/<aggregator>[+nnm][+mom]; got {name!r}."
        ) from None
    agg, *flags = agg.split("+")
    if attack not in ATTACKS or agg not in AGGREGATORS or set(flags) - {"nnm", "mom"}:
        raise ValueError(
            f"Unknown robust method {name!r}: attacks {sorted(ATTACKS)}, aggregators {sorted(AGGREGATORS)}, "
            "options +nnm, +mom."
        )

    def build_fn(config, axis_name):
        f = config.get("num_byzantine", 2)
        parts = []
        if "mom" in flags:  # worker momentum m_i = g_i + 0.9 m_i (per worker), aggregated instead of g_i
            parts.append(optax.trace(decay=0.9))
        if ATTACKS[attack] is not None:
            parts.append(optdist.attacks.byzantine(ATTACKS[attack](), num_byzantine=f, axis_name=axis_name))
        pre = optdist.aggregators.nnm(f) if "nnm" in flags else None
        parts.append(optdist.robust_mean(AGGREGATORS[agg](f), axis_name, pre_aggregation=pre))
        momentum = 0.0 if "mom" in flags else config.get("momentum", 0.9)
        parts.append(optax.sgd(config.learning_rate, momentum=momentum or None))
        return optax.chain(*parts)

    return Method(build_fn, True, f"{agg} under {attack}", "robust")


def build(config, axis_name: str = "data") -> optax.GradientTransformation:
    """The transform named by ``config.method``, wrapped in the agreed non-finite skip."""
    if config.method.startswith("robust/"):
        method = robust_method(config.method)
    elif config.method.startswith("shampoo/"):
        method = shampoo_method(config.method)
    elif config.method in METHODS:
        method = METHODS[config.method]
    else:
        raise ValueError(
            f"Unknown method {config.method!r}; choose one of {sorted(METHODS)}, robust/... or shampoo/..."
        )
    tx = method.build(config, axis_name)
    if config.get("skip_nonfinite", True):
        tx = optdist.skip_nonfinite(tx, axis_name if method.communicates else None)
    return tx
