"""Registered optimizer stacks for experiments: ``config.method`` -> optax transform.

A *method* is a registered name plus declared settings: every setting lives in the training
config under ``config.hparams.<method>`` (``hparams.top_k.ratio``, ``hparams.diloco.sync_every``,
``hparams.shampoo.block_size``, ...), so each is settable from the command line::

  python -m experiments.main --config.method=diloco --config.hparams.diloco.sync_every=20

A *preset* is a short name for a method with some of its settings fixed (``diloco_h50`` is
``diloco`` with ``sync_every=50``); the preset writes those values into ``config.hparams``, where
they are stored with the run. Setting one of a preset's fields to a third value is an error (use
the method's own name instead). ``python -m experiments.main --list`` prints every method, its
fields and defaults, and every preset.

Every method is built for worker axis ``axis_name`` and takes per-worker gradients.
``communicates`` says whether the method talks to other workers (then non-finite steps are skipped
in agreement over the axis; otherwise each worker decides alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

import optdist
import optdist.stragglers
from optdist import memory

FEEDBACK = ("none", "ef", "ef21", "econtrol")


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: ``build(config, options, axis_name)`` with declared ``options``."""

    name: str
    build: Callable[[Any, Any, str], optax.GradientTransformation]
    options: dict
    communicates: bool = True
    description: str = ""
    family: str = "mean"


@dataclasses.dataclass(frozen=True)
class Preset:
    """``method`` with ``settings`` (a subset of its options) fixed."""

    name: str
    method: str
    settings: dict
    description: str = ""


METHODS: dict[str, Method] = {}
PRESETS: dict[str, Preset] = {}


def register(
    name: str,
    options: dict | None = None,
    *,
    communicates: bool = True,
    description: str = "",
    family: str = "mean",
):
    """Registers ``fn(config, options, axis_name) -> transform`` under ``name`` with ``options``."""

    def deco(fn):
        if name in METHODS or name in PRESETS:
            raise ValueError(f"Method name {name!r} is registered twice.")
        METHODS[name] = Method(name, fn, dict(options or {}), communicates, description, family)
        return fn

    return deco


def preset(name: str, method: str, description: str = "", **settings) -> None:
    """Registers preset ``name`` = ``method`` with ``settings``."""
    if name in METHODS or name in PRESETS:
        raise ValueError(f"Method name {name!r} is registered twice.")
    unknown = set(settings) - set(METHODS[method].options)
    if unknown:
        raise ValueError(f"Preset {name!r} sets unknown {method} options {sorted(unknown)}.")
    PRESETS[name] = Preset(name, method, settings, description or METHODS[method].description)


def default_hparams() -> ml_collections.ConfigDict:
    """One ConfigDict per registered method holding its options' defaults (``config.hparams``)."""
    return ml_collections.ConfigDict({name: dict(m.options) for name, m in METHODS.items()})


def known_names() -> list[str]:
    return sorted(METHODS) + sorted(PRESETS)


def resolve(name: str) -> tuple[Method, dict]:
    """``(method, preset settings)`` for a method or preset name; a clear error otherwise."""
    if name in METHODS:
        return METHODS[name], {}
    if name in PRESETS:
        p = PRESETS[name]
        return METHODS[p.method], dict(p.settings)
    hint = ""
    if name.startswith("robust/"):
        hint = (
            " Robust runs are now config fields: --config.method=robust --config.hparams.robust.attack=alie "
            "--config.hparams.robust.aggregator=trimmed_mean --config.hparams.robust.nnm=True "
            "--config.hparams.robust.worker_momentum=True."
        )
    elif name.startswith("shampoo/"):
        hint = (
            " Shampoo settings are now config fields: --config.method=shampoo "
            "--config.hparams.shampoo.precondition_every=10 --config.hparams.shampoo.block_size=128 "
            "--config.hparams.shampoo.grafting=adam."
        )
    raise ValueError(
        f"Unknown method {name!r}.{hint} Methods: {', '.join(sorted(METHODS))}. "
        f"Presets: {', '.join(sorted(PRESETS))}. (`python -m experiments.main --list` describes them.)"
    )


def apply_preset(config, prefix: str = "config") -> None:
    """Writes ``config.method``'s preset settings into ``config.hparams`` (in place).

    A field the preset fixes must be at the method's default or at the preset's value; any other
    value was set by the user and would be silently lost, so it is an error.
    """
    method, settings = resolve(config.method)
    options = config.hparams[method.name]
    for key, value in settings.items():
        current, default = options[key], method.options[key]
        if current != default and current != value:
            raise ValueError(
                f"{prefix}.hparams.{method.name}.{key}={current!r} conflicts with preset "
                f"{config.method!r} (which sets {key}={value!r}); use --config.method={method.name} "
                f"to choose {key} yourself."
            )
        options[key] = value


def base_optimizer(config) -> optax.GradientTransformation:
    """The per-step optimizer chained after the communication transform."""
    lr = config.learning_rate
    if config.optimizer == "sgd":
        return optax.sgd(lr, momentum=config.momentum)
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=config.weight_decay)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}: choose 'sgd', 'adam' or 'adamw'.")


def _feedback(o) -> str | None:
    if o.feedback not in FEEDBACK:
        raise ValueError(f"feedback={o.feedback!r}: choose one of {FEEDBACK}.")
    return None if o.feedback == "none" else o.feedback


@register("exact_mean", description="synchronous data parallel: exact all-reduce mean")
def _exact_mean(config, o, axis_name):
    return optax.chain(optdist.mean_gradients(axis_name), base_optimizer(config))


@register(
    "micro_adam",
    {"density": 0.01, "window": 10, "bits": 4},
    description="exact mean + MicroAdam (learning_rate, weight_decay of the config) instead of the optimizer",
    family="preconditioning",
)
def _micro_adam(config, o, axis_name):
    wd = config.weight_decay if config.optimizer == "adamw" else 0.0
    tx = memory.micro_adam(
        config.learning_rate, density=o.density, window=o.window, bits=o.bits, weight_decay=wd
    )
    return optax.chain(optdist.mean_gradients(axis_name), tx)


@register("local_only", communicates=False, description="each worker trains alone", family="local")
def _local_only(config, o, axis_name):
    return base_optimizer(config)


# Gradient compression (issue 3): a compressed mean (optionally with error feedback), then the
# base optimizer.
@register("powersgd", {"rank": 2}, description="PowerSGD (rank) with error feedback", family="compression")
def _powersgd(config, o, axis_name):
    return optax.chain(optdist.powersgd(o.rank, axis_name), base_optimizer(config))


def _compressed(name, options, make, description):
    options = {**options, "feedback": options.get("feedback", "none")}

    @register(name, options, description=description, family="compression")
    def build_fn(config, o, axis_name):
        tx = optdist.compressed_mean(make(o), axis_name, feedback=_feedback(o))
        return optax.chain(tx, base_optimizer(config))


_compressed(
    "top_k",
    {"ratio": 0.01, "feedback": "ef"},
    lambda o: optdist.compressors.top_k(o.ratio),
    "top-k (ratio of entries kept), feedback none/ef/ef21/econtrol",
)
_compressed(
    "qsgd",
    {"levels": 127, "bucket_size": 512},
    lambda o: optdist.compressors.qsgd(o.levels, o.bucket_size),
    "QSGD (levels, bucket_size)",
)
_compressed(
    "terngrad",
    {"clip_sigma": 2.5},
    lambda o: optdist.compressors.terngrad(o.clip_sigma),
    "TernGrad, clipped at clip_sigma standard deviations",
)
_compressed(
    "sign",
    {"scaled": True, "feedback": "ef"},
    lambda o: optdist.compressors.sign(scaled=o.scaled),
    "(scaled) sign compression",
)
_compressed(
    "cast",
    {"dtype": "bfloat16"},
    lambda o: optdist.compressors.cast(jnp.dtype(o.dtype)),
    "cast to a narrower dtype (dtype)",
)
_compressed(
    "demo",
    {"chunk": 64, "topk": 8},
    lambda o: optdist.compressors.demo(o.chunk, o.topk),
    "DeMo: 2-D DCT tiles up to chunk x chunk, top-k coefficients per tile",
)
_compressed(
    "int8",
    {"bucket_size": 256, "rounding": "nearest", "feedback": "ef"},
    lambda o: optdist.compressors.int8(o.bucket_size, o.rounding),
    "int8 per bucket (fused EF kernel)",
)
_compressed(
    "ternary",
    {"bucket_size": 256, "feedback": "ef"},
    lambda o: optdist.compressors.ternary(o.bucket_size),
    "ternary (2-bit) per bucket (fused EF kernel)",
)
_compressed(
    "scaled_sign",
    {"bucket_size": 256, "feedback": "ef"},
    lambda o: optdist.compressors.scaled_sign(o.bucket_size),
    "scaled sign per bucket (fused EF kernel)",
)
_compressed(
    "threshold_top_k",
    {"ratio": 0.01, "feedback": "ef"},
    lambda o: optdist.compressors.threshold_top_k(o.ratio),
    "threshold top-k, no sort (fused EF kernel)",
)

for _rank in (1, 2, 4):
    preset(f"powersgd_r{_rank}", "powersgd", f"PowerSGD rank {_rank} with EF", rank=_rank)
preset("topk_1pct_ef", "top_k", "top-k 1% with EF", ratio=0.01, feedback="ef")
preset("topk_1pct", "top_k", "top-k 1%, no feedback", ratio=0.01, feedback="none")
preset("topk_1pct_ef21", "top_k", "top-k 1% with EF21", ratio=0.01, feedback="ef21")
preset("topk_1pct_econtrol", "top_k", "top-k 1% with EControl", ratio=0.01, feedback="econtrol")
preset("qsgd_8bit", "qsgd", "QSGD 127 levels, buckets of 512", levels=127, bucket_size=512, feedback="none")
preset("sign_ef", "sign", "scaled sign with EF", scaled=True, feedback="ef")
preset("bf16", "cast", "bfloat16 cast", dtype="bfloat16", feedback="none")
preset("int8_ef", "int8", "int8, buckets of 256, fused EF kernel", bucket_size=256, feedback="ef")
preset("ternary_ef", "ternary", "ternary (2-bit), buckets of 256, fused EF", bucket_size=256, feedback="ef")
preset("scaled_sign_ef", "scaled_sign", "scaled sign per bucket, fused EF", bucket_size=256, feedback="ef")
preset("threshold_topk_1pct_ef", "threshold_top_k", "threshold top-k 1%, fused EF", ratio=0.01, feedback="ef")


# Local-update outer loops (issue 5).
DILOCO = {
    "sync_every": 50,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
    "inner_weight_decay": 0.0,
    "powersgd_rank": 0,  # > 0: pseudo-gradients compressed by PowerSGD of that rank with EF
}


@register(
    "diloco", DILOCO, description="DiLoCo: inner AdamW (lr = learning_rate), outer Nesterov", family="outer"
)
def _diloco(config, o, axis_name):
    aggregator = {"aggregator": optdist.aggregation.powersgd(o.powersgd_rank)} if o.powersgd_rank else {}
    return optdist.diloco(
        inner_lr=config.learning_rate,
        outer_lr=o.outer_lr,
        outer_momentum=o.outer_momentum,
        sync_every=o.sync_every,
        axis_name=axis_name,
        inner_weight_decay=o.inner_weight_decay,
        **aggregator,
    )


for _h in (10, 50, 200):
    preset(f"diloco_h{_h}", "diloco", f"DiLoCo: inner AdamW, outer Nesterov(0.7, 0.9), H={_h}", sync_every=_h)
preset(
    "diloco_h50_powersgd_r16",
    "diloco",
    "DiLoCo H=50, pseudo-gradients compressed by PowerSGD rank 16 with error feedback",
    sync_every=50,
    powersgd_rank=16,
)


@register(
    "local_sgd",
    {"sync_every": 10},
    description="Local SGD: base optimizer locally, average every sync_every",
    family="outer",
)
def _local_sgd(config, o, axis_name):
    return optdist.local_sgd(base_optimizer(config), o.sync_every, axis_name)


preset("local_sgd_h10", "local_sgd", "Local SGD: base optimizer locally, average every 10", sync_every=10)

STREAMING = {
    "sync_every": 50,
    "num_fragments": 2,
    "delay": 5,
    "alpha": 0.5,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
    "outer_dtype": "bfloat16",
    "inner_weight_decay": 0.0,
}


@register(
    "streaming_diloco",
    STREAMING,
    description="Streaming DiLoCo: fragments, overlap delay tau, mixing alpha",
    family="outer",
)
def _streaming(config, o, axis_name):
    return optdist.streaming_diloco(
        config.learning_rate,
        o.sync_every,
        axis_name,
        num_fragments=o.num_fragments,
        delay=o.delay,
        alpha=o.alpha,
        outer_lr=o.outer_lr,
        outer_momentum=o.outer_momentum,
        outer_dtype=jnp.dtype(o.outer_dtype),
        inner_weight_decay=o.inner_weight_decay,
    )


preset(
    "streaming_diloco_h50",
    "streaming_diloco",
    "Streaming DiLoCo: 2 fragments, H=50, tau=5, alpha=0.5",
    sync_every=50,
)


@register(
    "qsr_diloco",
    {"min_sync_every": 10, "growth": 0.5, "final_lr_fraction": 0.05},
    description="DiLoCo + QSR: H_t = max(min_sync_every, (growth lr_0 / lr_t)^2), cosine lr",
    family="outer",
)
def _qsr(config, o, axis_name):
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=o.final_lr_fraction)
    return optdist.diloco(
        inner_lr=schedule,
        sync_every=optdist.qsr_sync_every(o.min_sync_every, o.growth * config.learning_rate, schedule),
        axis_name=axis_name,
        inner_weight_decay=0.0,
    )


@register(
    "fedavg",
    {"sync_every": 10, "server_lr": 1.0},
    description="FedAvg: client SGD (lr = learning_rate), server SGD",
    family="outer",
)
def _fedavg(config, o, axis_name):
    return optdist.fedavg(config.learning_rate, o.server_lr, o.sync_every, axis_name)


@register(
    "fedadam",
    {"sync_every": 10, "server_lr": 0.01},
    description="FedAdam: client SGD, server Adam",
    family="outer",
)
def _fedadam(config, o, axis_name):
    return optdist.fedadam(config.learning_rate, o.server_lr, o.sync_every, axis_name)


preset("fedavg_h10", "fedavg", "FedAvg: client SGD, server lr 1.0, H=10", sync_every=10, server_lr=1.0)
preset(
    "fedadam_h10", "fedadam", "FedAdam: client SGD, server Adam(lr 0.01), H=10", sync_every=10, server_lr=0.01
)


# Decentralized (no all-reduce): each worker keeps its own parameters and gossips them with its graph
# neighbours after the base optimizer's local step. Evaluation averages the workers' own models.
@register(
    "dsgd",
    {"graph": "ring", "gossip_every": 1},
    description="D-SGD: local step, then gossip on graph",
    family="decentralized",
)
def _dsgd(config, o, axis_name):
    return optax.chain(
        base_optimizer(config), optdist.gossip(o.graph, axis_name, gossip_every=o.gossip_every)
    )


for _graph in ("ring", "exponential", "one_peer_exponential"):
    preset(f"dsgd_{_graph}", "dsgd", f"D-SGD: local step, then gossip on a {_graph}", graph=_graph)


@register(
    "choco",
    {"graph": "ring", "ratio": 0.1, "consensus_step_size": 0.3},
    description="CHOCO-SGD: gossip of top-k (ratio) compressed changes, consensus_step_size",
    family="decentralized",
)
def _choco(config, o, axis_name):
    compressor = optdist.compressors.top_k(o.ratio)
    gossip = optdist.gossip(o.graph, axis_name, compressor, consensus_step_size=o.consensus_step_size)
    return optax.chain(base_optimizer(config), gossip)


preset(
    "choco_ring_topk10",
    "choco",
    "CHOCO-SGD: ring gossip of top-10% changes, consensus step 0.3",
    graph="ring",
    ratio=0.1,
    consensus_step_size=0.3,
)


@register(
    "gradient_tracking",
    {"graph": "ring"},
    description="gradient tracking (DIGing): gossiped gradient tracker, then gossip",
    family="decentralized",
)
def _gradient_tracking(config, o, axis_name):
    return optax.chain(
        optdist.gradient_tracking(o.graph, axis_name),
        base_optimizer(config),
        optdist.gossip(o.graph, axis_name, order="combine_then_adapt"),
    )


preset("gradient_tracking_ring", "gradient_tracking", "gradient tracking on a ring", graph="ring")


# Preconditioning (issue 4): Shampoo after the exact mean, so statistics are identical on all workers.
SHAMPOO_DEFAULTS = {  # tuned on the char-LM (BENCHMARKS.md): Shampoo of the filtered gradient
    "learning_rate": 3e-3,
    "weight_decay": 0.0,
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


@register(
    "shampoo",
    SHAMPOO_DEFAULTS,
    description="exact mean + Shampoo (own learning_rate, weight_decay)",
    family="preconditioning",
)
def _shampoo(config, o, axis_name):
    options = o.to_dict()
    lr, ema, wd = options.pop("learning_rate"), options.pop("gradient_ema"), options.pop("weight_decay")
    return optax.chain(
        optdist.mean_gradients(axis_name),
        *([optax.ema(ema, debias=True)] if ema else []),
        optdist.shampoo(lr, weight_decay=wd, **options),
    )


# Byzantine robustness (issue 6): f = config.num_byzantine Byzantine workers (the first f).
ATTACKS = {
    "none": None,
    "sign_flip": lambda o: optdist.attacks.sign_flip(o.sign_flip_scale),  # -4 g reverses the mean at f=2/10
    "ipm": lambda o: optdist.attacks.ipm(o.ipm_eps),  # Xie et al.'s large-epsilon IPM (reverses the mean)
    "alie": lambda o: optdist.attacks.alie(),
    "gaussian": lambda o: optdist.attacks.gaussian(o.gaussian_std),
    "mimic": lambda o: optdist.attacks.mimic(),
    "nan_inf": lambda o: optdist.attacks.nan_inf(),
}
AGGREGATORS = {
    "mean": lambda f, o: optdist.aggregators.mean(),
    "median": lambda f, o: optdist.aggregators.median(),
    "trimmed_mean": lambda f, o: optdist.aggregators.trimmed_mean(f),
    "krum": lambda f, o: optdist.aggregators.krum(f),
    "geometric_median": lambda f, o: optdist.aggregators.geometric_median(),
    "centered_clip": lambda f, o: optdist.aggregators.centered_clip(tau=o.clip_tau, iters=o.clip_iters),
    "monna": lambda f, o: optdist.aggregators.monna(f),
    "flag": lambda f, o: optdist.aggregators.flag(),
}
ROBUST = {
    "attack": "none",
    "aggregator": "mean",
    "nnm": False,  # nearest-neighbour mixing before aggregating
    "worker_momentum": False,  # aggregate per-worker momentum m_i = g_i + 0.9 m_i instead of g_i
    "sign_flip_scale": 4.0,
    "ipm_eps": 10.0,
    "gaussian_std": 1.0,
    "clip_tau": 0.5,
    "clip_iters": 3,
}


@register(
    "robust",
    ROBUST,
    description="robust mean under config.num_byzantine attackers, then SGD(learning_rate, momentum)",
    family="robust",
)
def _robust(config, o, axis_name):
    if o.attack not in ATTACKS:
        raise ValueError(f"attack={o.attack!r}: choose one of {sorted(ATTACKS)}.")
    if o.aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator={o.aggregator!r}: choose one of {sorted(AGGREGATORS)}.")
    f = config.num_byzantine
    parts = []
    if o.worker_momentum:
        parts.append(optax.trace(decay=0.9))
    if ATTACKS[o.attack] is not None:
        parts.append(optdist.attacks.byzantine(ATTACKS[o.attack](o), num_byzantine=f, axis_name=axis_name))
    pre = optdist.aggregators.nnm(f) if o.nnm else None
    parts.append(optdist.robust_mean(AGGREGATORS[o.aggregator](f, o), axis_name, pre_aggregation=pre))
    momentum = 0.0 if o.worker_momentum else config.momentum
    parts.append(optax.sgd(config.learning_rate, momentum=momentum or None))
    return optax.chain(*parts)


preset(
    "trimmed_mean_nnm_mom",
    "robust",
    "robust trimmed mean with NNM and worker momentum (no attack)",
    aggregator="trimmed_mean",
    nnm=True,
    worker_momentum=True,
)


# --------------------------------------------------------------------------- #
# Compressed outer syncs (issue 14): low-bit and sparse pseudo-gradients.

CODECS = (
    "none",
    "int8",
    "int8_summed",
    "int4_summed",
    "fp4_requantized",
    "int4_requantized",
    "int8_6sigma",
    "fp4",
    "int2",
    "sparse",
)
SYNC_CODEC = {
    "codec": "int8",  # one of CODECS
    "feedback": "none",  # "none" or "ef" (error feedback on the pseudo-gradients)
    "error_decay": 1.0,  # beta of the decayed EF accumulator (SparseLoCo), feedback="ef" only
    "density": 0.03,  # codec="sparse": kept fraction per chunk
    "value_bits": 2,  # codec="sparse": bits per kept value
    "chunk_size": 4096,  # entries per scale (and per top-k chunk)
    "rounding": "stochastic",  # the quantize codecs' rounding ("stochastic" or "nearest")
}


def _sync_aggregator(o):
    """The outer sync's aggregator from the ``SYNC_CODEC`` fields (None: the exact mean)."""
    if o.codec not in CODECS:
        raise ValueError(f"codec={o.codec!r}: choose one of {CODECS}.")
    q = optdist.compressors
    quant = {"chunk_size": o.chunk_size, "rounding": o.rounding}
    codecs = {
        "int8": lambda: q.quantize(8, **quant),
        # codes on shared chunk scales, all-reduced as integers (2(n-1)/n x the payload, not n-1)
        "int8_summed": lambda: q.quantize(8, **quant, exchange="summed"),
        "int4_summed": lambda: q.quantize(4, **quant, exchange="summed"),
        # a quantized reduce-scatter + all-gather (2(n-1)/n x the payload; the mean re-encoded once)
        "fp4_requantized": lambda: q.quantize(4, "e2m1", **quant, exchange="requantized"),
        "int4_requantized": lambda: q.quantize(4, **quant, exchange="requantized"),
        "int8_6sigma": lambda: q.quantize(8, scale="sigma", sigmas=6.0, rounding=o.rounding),
        "fp4": lambda: q.quantize(4, "e2m1", **quant),
        "int2": lambda: q.quantize(2, **quant),
        "sparse": lambda: q.chunked_top_k(o.density, o.chunk_size, o.value_bits),
    }
    if o.codec == "none":
        return None
    decay = {"error_decay": o.error_decay} if o.feedback == "ef" else {}
    return optdist.aggregation.compressed(codecs[o.codec](), _feedback(o), **decay)


@register(
    "diloco_compressed",
    {"sync_every": 100, "outer_lr": 0.7, "outer_momentum": 0.9, "overlap": False, **SYNC_CODEC},
    description="DiLoCo whose sync sends low-bit / sparse pseudo-gradients (codec, feedback, ...)",
    family="outer",
)
def _diloco_compressed(config, o, axis_name):
    return optdist.diloco(
        inner_lr=config.learning_rate,
        outer_lr=o.outer_lr,
        outer_momentum=o.outer_momentum,
        sync_every=o.sync_every,
        axis_name=axis_name,
        inner_weight_decay=0.0,
        aggregator=_sync_aggregator(o),
        overlap=o.overlap,
    )


@register(
    "streaming_diloco_compressed",
    {**STREAMING, "sync_every": 100, "outer_dtype": "float32", **SYNC_CODEC, "codec": "fp4"},
    description="Streaming DiLoCo with each fragment's sync compressed (default 4-bit E2M1)",
    family="outer",
)
def _streaming_compressed(config, o, axis_name):
    return optdist.streaming_diloco(
        config.learning_rate,
        o.sync_every,
        axis_name,
        num_fragments=o.num_fragments,
        delay=o.delay,
        alpha=o.alpha,
        outer_lr=o.outer_lr,
        outer_momentum=o.outer_momentum,
        inner_weight_decay=o.inner_weight_decay,
        aggregator=_sync_aggregator(o),
    )


@register(
    "sparseloco",
    {
        "sync_every": 30,
        "density": 0.03,
        "chunk_size": 4096,
        "value_bits": 2,
        "scale_size": 0,  # 0: one scale per chunk (the paper)
        "indices": "own",  # "cyclic": one worker's positions per round (compressors.cyclic_top_k)
        # "summed": int8 codes all-reduced (needs indices="cyclic"); not "values", a ConfigDict method
        "value_exchange": "gathered",
        "error_decay": 0.95,
        "outer_lr": 1.0,
    },
    description="SparseLoCo: chunk top-k + 2-bit values + decayed EF instead of outer momentum",
    family="outer",
)
def _sparseloco(config, o, axis_name):
    return optdist.sparseloco(
        config.learning_rate,
        o.sync_every,
        axis_name,
        density=o.density,
        chunk_size=o.chunk_size,
        value_bits=o.value_bits,
        scale_size=o.scale_size or None,
        indices=o.indices,
        values=o.value_exchange,
        error_decay=o.error_decay,
        outer_lr=o.outer_lr,
        inner_weight_decay=0.0,
    )


# The experiments' models' input and output layers (top-level module names): AdamW in MuLoCo.
_MUON_EXCLUDED = ("embed", "pos", "head", "out")
_ATTENTION_INPUTS = ("query", "key", "value")


def muon_hidden_dimension_numbers(params):
    """Muon on the hidden weight matrices of the experiments' models, AdamW on the rest (the split
    Jordan et al. recommend for Muon): None for the embeddings, positions, output layer, biases and
    norms; attention's query / key / value kernels ``[d, heads, head_dim]`` reduce over ``d`` into
    ``heads × head_dim``; every other kernel (dense, attention output, conv) reduces over all but its
    last axis."""
    contrib = optax.contrib

    def spec(path, leaf):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[0] in _MUON_EXCLUDED or "kernel" not in names or leaf.ndim < 2:
            return None
        module = names[names.index("kernel") - 1]  # (nnx paths end in the Variable's ".value")
        if module in _ATTENTION_INPUTS and leaf.ndim == 3:
            return contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
        return contrib.MuonDimensionNumbers(
            reduction_axis=tuple(range(leaf.ndim - 1)), output_axis=leaf.ndim - 1
        )

    return jax.tree_util.tree_map_with_path(spec, params)


def _muon_split(o, config) -> dict:
    """``optdist.muloco``'s Muon arguments from ``o.muon_on`` and ``o.adam_lr``."""
    if o.muon_on not in ("hidden", "matrices"):
        raise ValueError(f"muon_on={o.muon_on!r}: choose 'hidden' or 'matrices'.")
    return {
        "adam_learning_rate": o.adam_lr or config.learning_rate,
        "muon_dimension_numbers": muon_hidden_dimension_numbers if o.muon_on == "hidden" else None,
    }


def _muon(o, config):
    """optax's Muon at ``o.inner_lr`` with the experiments' split."""
    split = _muon_split(o, config)
    return optax.contrib.muon(
        o.inner_lr,
        adam_learning_rate=split["adam_learning_rate"],
        muon_weight_dimension_numbers=split["muon_dimension_numbers"],
    )


@register(
    "muon_mean",
    {"inner_lr": 0.02, "adam_lr": 0.0, "muon_on": "hidden"},
    description="synchronous data parallel (exact all-reduce mean every step) with muloco's Muon "
    "(inner_lr, adam_lr, muon_on) instead of the config's optimizer: MuLoCo's reference",
)
def _muon_mean(config, o, axis_name):
    return optax.chain(optdist.mean_gradients(axis_name), _muon(o, config))


@register(
    "muloco",
    {
        "sync_every": 30,
        "inner_lr": 0.02,
        "adam_lr": 0.0,
        "muon_on": "hidden",
        "bits": 2,
        "chunk_size": 4096,
        "outer_lr": 0.7,
        "outer_momentum": 0.9,
        # "ef": the paper's sync (bits-bit stochastic codes + error feedback); or one of CODECS without
        # error feedback (chunk_size, rounding as in diloco_compressed; bits unused)
        "codec": "ef",
        "rounding": "stochastic",
    },
    description="MuLoCo: Muon inner optimizer (inner_lr) on the hidden matrices (muon_on='hidden'; "
    "'matrices': every 2-D leaf), AdamW at adam_lr (0: the config's learning_rate) on the rest, 2-bit "
    "EF pseudo-gradients (codec='ef'; or a diloco_compressed codec), Nesterov outer",
    family="outer",
)
def _muloco(config, o, axis_name):
    if o.codec == "ef":  # the paper's sync, which optdist.muloco builds from bits and chunk_size
        sync = {"bits": o.bits, "chunk_size": o.chunk_size}
    else:
        codec = {**SYNC_CODEC, "codec": o.codec, "chunk_size": o.chunk_size, "rounding": o.rounding}
        sync = {"aggregator": _sync_aggregator(ml_collections.ConfigDict(codec))}
    return optdist.muloco(
        o.inner_lr,
        o.sync_every,
        axis_name,
        outer_lr=o.outer_lr,
        outer_momentum=o.outer_momentum,
        **sync,
        **_muon_split(o, config),
    )


# --------------------------------------------------------------------------- #
# Stragglers on a simulated clock (issue 17): backup workers, static and DBW.

STRAGGLER_CLOCK = {
    "delays": "pareto",  # exponential, shifted_exponential, pareto or lognormal
    "delay_a": 1.0,  # exponential: mean; shifted_exponential: shift; pareto: scale; lognormal: mu
    "delay_b": 1.5,  # shifted_exponential: mean; pareto: alpha; lognormal: sigma (unused: exponential)
    "clock_seed": 0,
}


def _delay_model(o):
    c = optdist.stragglers.clock
    makers = {
        "exponential": lambda: c.exponential(o.delay_a),
        "shifted_exponential": lambda: c.shifted_exponential(o.delay_a, o.delay_b),
        "pareto": lambda: c.pareto(o.delay_a, o.delay_b),
        "lognormal": lambda: c.lognormal(o.delay_a, o.delay_b),
    }
    if o.delays not in makers:
        raise ValueError(f"delays={o.delays!r}: choose one of {sorted(makers)}.")
    return makers[o.delays]()


@register(
    "backup",
    {**STRAGGLER_CLOCK, "num_backup": 2},
    description="mean of the n - num_backup fastest workers on a simulated clock, then the optimizer",
)
def _backup(config, o, axis_name):
    tx = optdist.stragglers.backup_mean_gradients(o.num_backup, axis_name, _delay_model(o), o.clock_seed)
    return optax.chain(tx, base_optimizer(config))


@register(
    "dbw",
    {**STRAGGLER_CLOCK, "initial_backup": 2, "smoothness": 0.0, "decay": 0.9},
    description="DBW: backup workers chosen online (gain model at the config's learning rate; "
    "smoothness 0 = estimated online), then the optimizer",
)
def _dbw(config, o, axis_name):
    tx = optdist.stragglers.dynamic_backup_mean_gradients(
        axis_name,
        config.num_workers,
        _delay_model(o),
        config.learning_rate,
        seed=o.clock_seed,
        smoothness=o.smoothness or None,
        decay=o.decay,
        initial_backup=o.initial_backup,
    )
    return optax.chain(tx, base_optimizer(config))


def build(config, axis_name: str = "data", prefix: str = "config") -> optax.GradientTransformation:
    """The transform named by ``config.method`` (method or preset), wrapped in the agreed non-finite skip.

    Preset settings are written into ``config.hparams`` first; a factory's error names the config
    field group it came from.
    """
    method, _ = resolve(config.method)
    apply_preset(config, prefix)
    options = config.hparams[method.name]
    try:
        tx = method.build(config, options, axis_name)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{prefix}.hparams.{method.name} ({config.method}): {e}") from e
    if config.skip_nonfinite:
        tx = optdist.skip_nonfinite(tx, axis_name if method.communicates else None)
    return tx


def communicates(config) -> bool:
    return resolve(config.method)[0].communicates


def describe(hparams=None) -> str:
    """Text listing every method with its fields (values from ``hparams``, else defaults), and presets."""
    lines = ["Methods (--config.method=NAME; fields: --config.hparams.NAME.FIELD=VALUE):"]
    for name, m in METHODS.items():
        lines.append(f"  {name:<20} {m.description}")
        current = hparams[name] if hparams is not None and name in hparams else m.options
        for key, default in m.options.items():
            value = current[key]
            note = "" if value == default else f"  (default {default!r})"
            lines.append(f"      {key} = {value!r}{note}")
    lines.append("Presets (a method with some fields fixed):")
    for name, p in PRESETS.items():
        fields = ", ".join(f"{k}={v!r}" for k, v in p.settings.items())
        lines.append(f"  {name:<24} = {p.method}({fields})")
    return "\n".join(lines)
