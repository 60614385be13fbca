"""The compressor abstraction and the shared protocols compressors are built from.

A :class:`Compressor` owns its whole communication protocol. Its ``aggregate``
takes this worker's tree ``x`` (a gradient, or an error-corrected gradient)
and returns an :class:`Aggregate`:

* ``mean``: the decoded estimate of ``mean_i x_i`` (identical on all workers);
* ``local``: what this worker's own message decodes to (error feedback
  subtracts it to form the residual; for PowerSGD it is the *globally*
  decoded value, as in the paper);
* ``state``: the compressor's new state (documented per compressor as shared
  or per worker).

Every collective goes through the :class:`~optdist.comm.Channel` it is given, which counts the bytes.

Two builders cover the element-wise compressors, so protocol code is written
once:

* :func:`summable`: the payload is linear in ``x`` (shared scale, shared
  random coordinates), so ``mean = decode(psum(payload)) / n`` — one
  all-reduce, in which the uncompressed leaves travel too;
* :func:`gathered`: payloads are all-gathered (one collective for the tree)
  and ``mean = combine_j decode(payload_j)`` (mean by default).

A compressor built by these builders also has a :class:`Codec`: its point-to-point form (encode
this worker's tree, decode a payload another worker sent), which gossip uses to send compressed
differences to neighbours (:func:`optdist.gossip`); stateful compressors (DeMo) and PowerSGD, whose
protocol is collective, have none.

A compressor may also provide ``aggregate_ef``, a fused error-feedback path
(:func:`gathered_ef` builds one from a kernel that encodes ``p = x + e`` and
writes the new residual ``p - C_i(p)`` in the same pass);
:func:`optdist.compressed_mean` uses it for ``feedback="ef"`` when present.

Scalars, and leaves whose compression rate (leaf bytes / payload bytes, from
the real encoded arrays) is below ``min_compression_rate``, skip compression
and go through one plain all-reduce mean together. (Vectors are compressed by
the element-wise compressors when that saves bytes; PowerSGD needs matrices.) All byte counts come from
:class:`optdist.comm.Channel` on the real payload arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optdist.comm.accounting import payload_bytes
from optdist.comm.channel import Channel
from optdist.comm.packing import compute_dtype, ordered_sum, packed


class Aggregate(NamedTuple):
    """What a compressor's ``aggregate`` returns (see the module docstring)."""

    mean: Any
    local: Any
    state: Any


class Codec(NamedTuple):
    """A compressor's point-to-point form: the payload one worker sends to another.

    Attributes:
      encode: ``encode(x, key) -> payload`` (a pytree of arrays; its bytes are what a send costs).
      decode: ``decode(payload, like, key) -> tree`` shaped like ``like``, with the *sender's* ``key``
        (shared-coordinate compressors rebuild their coordinates from it).

    ``decode(encode(x, key), x, key)`` is this compressor's ``C(x)``. Leaves the compressor would not
    compress (scalars, or too little saving) travel raw in the payload.
    """

    encode: Callable[[Any, jax.Array], Any]
    decode: Callable[[Any, Any, jax.Array], Any]


class Compressor(NamedTuple):
    r"""A gradient compressor with its aggregation protocol (optax style: a tuple of functions).

    Attributes:
      init: ``init(params) -> state``.
      aggregate: ``aggregate(x, state, key, step, channel) -> Aggregate``.
        ``key`` is identical on every worker (seed + step); compressors that need
        per-worker randomness fold in the worker index themselves. ``step`` is the
        step count (int32 scalar).
      name: a short human-readable name, e.g. ``"top_k(0.01)"``.
      aggregate_ef: optional fused error-feedback path,
        ``aggregate_ef(x, error, state, key, step, channel) -> (Aggregate, new_error)``:
        it aggregates ``p = x + error`` exactly as ``aggregate(p)`` would and returns the new residual
        ``p - C_i(p)`` computed in the same pass (``Aggregate.local`` is None there). None: error
        feedback adds, aggregates and subtracts in separate steps.
      codec: the point-to-point :class:`Codec`, or None where the protocol is collective only.
      contraction: a contraction :math:`\delta \in (0, 1]` the compressor guarantees on every leaf,
        :math:`\|C(x) - x\|^2 \le (1 - \delta)\|x\|^2` (``top_k(ratio)``: ``ratio``), or None where
        it declares none. EControl's default feedback strength is derived from it.
    """

    init: Callable[[Any], Any]
    aggregate: Callable[..., Aggregate]
    name: str
    aggregate_ef: Callable[..., tuple[Aggregate, Any]] | None = None
    codec: Codec | None = None
    contraction: float | None = None


def smallest_int(max_abs: int, signed: bool = True) -> np.dtype:
    """The smallest integer dtype holding ``[-max_abs, max_abs]`` (or ``[0, max_abs]``)."""
    for bits in (8, 16, 32):
        info = np.iinfo(f"int{bits}" if signed else f"uint{bits}")
        if max_abs <= info.max:
            return np.dtype(info.dtype)
    raise ValueError(f"{max_abs} does not fit a 32-bit integer.")


def pack_bits(bits: jax.Array) -> jax.Array:
    """Packs a boolean vector into uint8 words, 8 per byte (little-endian bit order)."""
    return jnp.packbits(bits.astype(jnp.uint8), bitorder="little")


def unpack_bits(packed: jax.Array, size: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: the first ``size`` bits as booleans."""
    return jnp.unpackbits(packed, count=size, bitorder="little").astype(bool)


def leaf_keys(key: jax.Array, num_leaves: int) -> list[jax.Array]:
    """One key per leaf (identical on every worker when ``key`` is)."""
    return [jax.random.fold_in(key, i) for i in range(num_leaves)]


def private_key(key: jax.Array, channel: Channel) -> jax.Array:
    """A key that differs per worker: ``fold_in(key, worker_index)``."""
    return jax.random.fold_in(key, channel.index)


def is_compressible(leaf: Any, encoded_nbytes: int, min_compression_rate: float) -> bool:
    """Compress only if ``leaf bytes / payload bytes >= min_compression_rate`` (never a scalar)."""
    size = math.prod(jnp.shape(leaf))
    if size <= 1 or encoded_nbytes == 0:
        return False
    return size * jnp.dtype(leaf.dtype).itemsize / encoded_nbytes >= min_compression_rate


def restore(leaf_like: Any, flat: jax.Array) -> jax.Array:
    """A decoded flat vector back in the leaf's shape and dtype."""
    return flat.reshape(jnp.shape(leaf_like)).astype(leaf_like.dtype)


def _encoded_nbytes(encode: Callable, leaf: Any, *extra_specs: Any, shaped: bool = False) -> int:
    """Bytes of the payload ``encode`` produces for ``leaf`` (traced abstractly, nothing runs).

    ``extra_specs`` are abstract extra arguments; a stateful encode returns
    ``(payload, state)`` and only the payload is counted. ``shaped``: encode
    takes the leaf in its own shape rather than flattened.
    """
    shape = tuple(jnp.shape(leaf)) if shaped else (math.prod(jnp.shape(leaf)),)
    spec = jax.ShapeDtypeStruct(shape, compute_dtype(leaf.dtype))
    out = jax.eval_shape(encode, spec, jax.random.key(0), *extra_specs)
    return payload_bytes(out[0] if extra_specs and isinstance(out, tuple) else out)


def flatten_floating(x: Any, who: str) -> tuple[list[jax.Array], Any]:
    leaves, treedef = jax.tree_util.tree_flatten(x)
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(f"{who} needs floating-point gradients; got a leaf of dtype {leaf.dtype}.")
    return leaves, treedef


def _flat(leaf: jax.Array) -> jax.Array:
    return leaf.reshape(-1).astype(compute_dtype(leaf.dtype))


def leafwise_codec(
    name: str,
    plan: Callable[[list], list[int]],
    encode_leaf: Callable[[jax.Array, jax.Array], Any],
    decode_leaf: Callable[[Any, jax.Array, jax.Array], jax.Array],
) -> Codec:
    """A :class:`Codec` that encodes the leaves ``plan(leaves)`` selects and sends the others raw.

    ``encode_leaf(leaf, key) -> payload``; ``decode_leaf(payload, leaf, key) -> flat or shaped
    decoded leaf``; one key per leaf from ``key`` (:func:`leaf_keys`).
    """

    def encode(x, key):
        leaves, _ = flatten_floating(x, name)
        keys = leaf_keys(key, len(leaves))
        chosen = set(plan(leaves))
        return [encode_leaf(leaf, keys[i]) if i in chosen else leaf for i, leaf in enumerate(leaves)]

    def decode(payload, like, key):
        leaves, treedef = jax.tree_util.tree_flatten(like)
        keys = leaf_keys(key, len(leaves))
        chosen = set(plan(leaves))
        out = [
            restore(leaf, decode_leaf(p, leaf, keys[i])) if i in chosen else p
            for i, (leaf, p) in enumerate(zip(leaves, payload))
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    return Codec(encode, decode)


_SCALAR = jax.ShapeDtypeStruct((), jnp.float32)  # abstract ``aux`` for sizing a summable payload


def summable(
    name: str,
    encode: Callable[..., Any],
    decode: Callable[..., jax.Array],
    *,
    prepare: Callable[[Sequence[jax.Array], Channel], Sequence[Any]] | None = None,
    min_compression_rate: float = 1.0,
    placing: bool = False,
) -> Compressor:
    """A compressor whose payloads are summed by one all-reduce.

    ``encode(x, key, aux) -> payload`` must be linear in ``x`` and
    ``decode(payload, size, key, aux) -> flat`` linear in the payload, so that
    ``decode(sum_i payload_i) = sum_i decode(payload_i)``. ``key`` and ``aux``
    are identical on every worker: the key rebuilds shared random coordinates
    that are never sent; ``aux`` is a float32 scalar per leaf or None.
    ``prepare(flat_leaves, channel) -> aux per leaf`` may communicate first (e.g. a
    shared scale from a ``pmax``); its bytes are counted too.
    ``placing=True`` says that ``decode`` only places payload entries into zeros (no arithmetic, no
    two entries on one coordinate, as rand-k's scatter): the mean's ``1/n`` is then applied to the
    summed payload before decoding, the same values bit for bit without a full-size pass.

    The uncompressed leaves travel in the same all-reduce (divided by ``n``).
    The compressor is stateless (its state is ``()``).
    """

    def plan(leaves):
        return [
            i
            for i, leaf in enumerate(leaves)
            if is_compressible(leaf, _encoded_nbytes(encode, leaf, _SCALAR), min_compression_rate)
        ]

    def aggregate(x, state, key, step, channel):
        del step
        leaves, treedef = flatten_floating(x, name)
        keys = leaf_keys(key, len(leaves))
        compressed = plan(leaves)
        plain = [i for i in range(len(leaves)) if i not in compressed]
        flats = [_flat(leaves[i]) for i in compressed]
        aux = list(prepare(flats, channel)) if (prepare is not None and flats) else [None] * len(flats)
        payloads = [encode(f, keys[i], a) for f, i, a in zip(flats, compressed, aux)]
        local = [decode(p, f.shape[0], keys[i], a) for p, f, i, a in zip(payloads, flats, compressed, aux)]
        summed, plain_sum = channel.psum((payloads, [leaves[i] for i in plain]))
        n = channel.size
        mean_leaves = list(leaves)
        local_leaves = list(leaves)
        for j, i in enumerate(compressed):
            size = flats[j].shape[0]
            if placing:
                mean = decode(jax.tree_util.tree_map(lambda v: v / n, summed[j]), size, keys[i], aux[j])
            else:
                mean = decode(summed[j], size, keys[i], aux[j]) / n
            mean_leaves[i] = restore(leaves[i], mean)
            local_leaves[i] = restore(leaves[i], local[j])
        for j, i in enumerate(plain):
            mean_leaves[i] = plain_sum[j] / jnp.asarray(n, plain_sum[j].dtype)
        unflat = lambda ls: jax.tree_util.tree_unflatten(treedef, ls)
        return Aggregate(unflat(mean_leaves), unflat(local_leaves), state)

    codec = None
    if prepare is None:  # a shared scale needs a collective first: no point-to-point form
        codec = leafwise_codec(
            name,
            plan,
            lambda leaf, key: encode(_flat(leaf), key, None),
            lambda payload, leaf, key: decode(payload, leaf.size, key, None),
        )
    return Compressor(lambda params: (), aggregate, name, codec=codec)


def mean_over_workers(decoded: jax.Array) -> jax.Array:
    return ordered_sum(decoded) / decoded.shape[0]


def accumulated_mean(
    decode_accumulate: Callable[[Any, jax.Array], jax.Array],
    stacked: Any,
    size: int,
    dtype: Any,
    receive: str = "unrolled",
) -> jax.Array:
    """``(decode(p_0) + ... + decode(p_{n-1})) / n`` for gathered payloads ``stacked`` (a leading
    worker axis), summed into one flat ``size`` buffer of ``dtype`` in worker order:
    ``acc <- decode_accumulate(p_j, acc)``, ``j = 0 .. n-1``, from zeros. No ``(n, size)`` stack of
    decoded payloads is built; the additions are those of :func:`mean_over_workers` on that stack
    (``0 + d_0 = d_0`` exactly). ``receive``: ``"unrolled"`` (one ``decode_accumulate`` per worker in
    the program) or ``"scan"`` (a ``lax.scan`` over the workers), the same bits either way."""
    workers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    total = jnp.zeros((size,), dtype)
    if receive == "scan":
        total = lax.scan(lambda acc, p: (decode_accumulate(p, acc), None), total, stacked)[0]
    else:
        for j in range(workers):
            total = decode_accumulate(jax.tree_util.tree_map(lambda p, j=j: p[j], stacked), total)
    return total / workers


def gathered(
    name: str,
    encode: Callable[..., Any],
    decode: Callable[[Any, int], jax.Array],
    *,
    combine: Callable[[jax.Array], jax.Array] = mean_over_workers,
    accumulate: Callable[[Any, jax.Array], jax.Array] | None = None,
    init_leaf: Callable[[jax.Array], Any] | None = None,
    min_compression_rate: float = 1.0,
    shaped: bool = False,
) -> Compressor:
    """A compressor whose payloads are all-gathered and decoded per worker.

    ``encode(x, key) -> payload`` (stateless), or with ``init_leaf`` given,
    ``encode(x, key, s) -> (payload, new_s)`` with a per-worker, per-leaf state
    ``s = init_leaf(flat_leaf)``. ``key`` differs per worker (stochastic rounding).
    ``decode(payload, size)`` returns the flat decoded vector. With ``shaped=True``
    ``x`` (and ``init_leaf``'s argument) keep the leaf's shape and ``decode``
    gets the shape instead of the size (e.g. DeMo's 2-D tiles); ``mean =
    combine(stack_j decode(payload_j))`` (the mean by default; majority vote for
    unscaled sign). One all-gather carries every compressed leaf; the plain
    leaves go through one all-reduce mean.

    ``accumulate(payload, acc) -> acc + decode(payload)`` (flat, in ``decode``'s dtype), for the
    default mean only: the receive side then sums the workers' payloads into one buffer
    (:func:`accumulated_mean`: the same additions in the same order) instead of decoding a
    ``(workers, size)`` stack. Each worker decodes every payload, so on a mesh that stack is
    ``workers`` full-size passes per worker. Simulated workers (:attr:`Channel.simulated`) keep the
    stack: there it is one copy for all of them, shared with their local decodes.
    """
    stateful = init_leaf is not None
    if accumulate is not None and (shaped or combine is not mean_over_workers):
        raise ValueError(
            f"{name}: accumulate= applies to the default mean of flat leaves only; drop it, or drop "
            "combine= and shaped=True."
        )

    def view(leaf):  # what encode and init_leaf see
        return leaf.astype(compute_dtype(leaf.dtype)) if shaped else _flat(leaf)

    def extent(leaf):  # what decode gets
        return tuple(leaf.shape) if shaped else leaf.size

    def plan(leaves):
        def nbytes(leaf):
            if not stateful:
                return _encoded_nbytes(encode, leaf, shaped=shaped)
            s = jax.eval_shape(init_leaf, jax.ShapeDtypeStruct(view(leaf).shape, compute_dtype(leaf.dtype)))
            return _encoded_nbytes(encode, leaf, s, shaped=shaped)

        return [
            i for i, leaf in enumerate(leaves) if is_compressible(leaf, nbytes(leaf), min_compression_rate)
        ]

    def init(params):
        if not stateful:
            return ()
        leaves = jax.tree_util.tree_leaves(params)
        chosen = set(plan(leaves))
        return tuple(init_leaf(view(leaf)) if i in chosen else None for i, leaf in enumerate(leaves))

    def aggregate(x, state, key, step, channel):
        del step
        leaves, treedef = flatten_floating(x, name)
        keys = [private_key(k, channel) for k in leaf_keys(key, len(leaves))]
        compressed = plan(leaves)
        new_state = list(state) if stateful else state
        payloads = []
        for i in compressed:
            if stateful:
                payload, new_state[i] = encode(view(leaves[i]), keys[i], state[i])
            else:
                payload = encode(view(leaves[i]), keys[i])
            payloads.append(payload)

        def mean_of(stacked, leaf):
            # Simulated workers share one decoded stack (XLA merges it with the local decodes).
            if accumulate is not None and not channel.simulated:
                row = jax.tree_util.tree_map(lambda p: p[0], stacked)
                dtype = jax.eval_shape(lambda p: decode(p, leaf.size), row).dtype  # decode's own dtype
                return accumulated_mean(accumulate, stacked, leaf.size, dtype)
            return combine(jax.vmap(lambda p: decode(p, extent(leaf)))(stacked))

        mean_leaves = _exchange(leaves, compressed, payloads, channel, mean_of)
        local_leaves = list(leaves)
        for j, i in enumerate(compressed):
            local_leaves[i] = restore(leaves[i], decode(payloads[j], extent(leaves[i])))
        if stateful:
            new_state = tuple(new_state)
        unflat = lambda ls: jax.tree_util.tree_unflatten(treedef, ls)
        return Aggregate(unflat(mean_leaves), unflat(local_leaves), new_state)

    codec = None
    if not stateful:
        codec = leafwise_codec(
            name,
            plan,
            lambda leaf, key: encode(view(leaf), key),
            lambda payload, leaf, key: decode(payload, extent(leaf)),
        )
    return Compressor(init, aggregate, name, codec=codec)


def _exchange(
    leaves: list, compressed: list[int], payloads: list, channel: Channel, mean_of: Callable
) -> list:
    """The gathered protocol's communication: one all-gather carries every compressed leaf's payload
    (``mean_of(stacked_payload, leaf) -> mean``), one all-reduce mean carries the other leaves."""
    mean_leaves = list(leaves)
    if compressed:
        stacked = packed(channel.all_gather, payloads, gathered=True)
        for j, i in enumerate(compressed):
            mean_leaves[i] = restore(leaves[i], mean_of(stacked[j], leaves[i]))
    plain = [i for i in range(len(leaves)) if i not in compressed]
    if plain:
        for i, m in zip(plain, channel.pmean([leaves[i] for i in plain])):
            mean_leaves[i] = m
    return mean_leaves


def gathered_ef(
    name: str,
    encode_ef: Callable[[jax.Array, jax.Array, jax.Array], tuple[Any, jax.Array]],
    decode_accumulate: Callable[[Any, jax.Array], jax.Array],
    *,
    min_compression_rate: float = 1.0,
    receive: str = "unrolled",
) -> Compressor:
    """A stateless gathered compressor built on a fused error-feedback encoder (e.g. a Pallas kernel).

    ``encode_ef(x, e, key) -> (payload, e_new)`` encodes ``p = x + e`` (flat float32) and returns the
    residual ``e_new = p - decode(payload)`` from the same pass; ``key`` differs per worker.
    ``decode_accumulate(payload, acc) -> acc + decode(payload)`` (flat float32).

    * ``aggregate(x)`` encodes with ``e = 0``; ``local = decode_accumulate(payload, 0)``.
    * ``aggregate_ef(x, error)`` encodes ``x + error`` in one pass and returns ``e_new`` as the new
      residual (the leaf's dtype); :func:`optdist.compressed_mean` uses it for ``feedback="ef"``.

    Both run the protocol of :func:`gathered`: one all-gather of every compressed leaf's payload, and
    the receive side sums the workers' payloads with ``decode_accumulate`` in worker order, then
    divides by ``n``: ``receive="unrolled"`` (one ``decode_accumulate`` per worker in the program) or
    ``"scan"`` (a ``lax.scan`` over the workers). Both make the same additions in the same order
    (the same bits), but XLA:CPU fuses them differently: unrolled, a bit-packed payload's unpacking
    is fused into every consumer (the bucketed sign moves 2.2x the bytes of its scan), while a scan's
    carry is copied every trip (int8 codes: 2.1x the bytes of the unrolled form). Uncompressed
    leaves (scalars, or where the payload would not be ``min_compression_rate`` times smaller) go
    through one all-reduce mean, and their residual is 0 (they are sent exactly).
    """

    def encode(x, key):
        return encode_ef(x, jnp.zeros_like(x), key)[0]

    if receive not in ("unrolled", "scan"):
        raise ValueError(f"receive must be 'unrolled' or 'scan'; got {receive!r}.")

    def mean_of(stacked, leaf):
        return accumulated_mean(decode_accumulate, stacked, leaf.size, jnp.float32, receive)

    def plan(leaves):
        return [
            i
            for i, leaf in enumerate(leaves)
            if is_compressible(leaf, _encoded_nbytes(encode, leaf), min_compression_rate)
        ]

    def encode_all(x, error, key, channel):
        leaves, treedef = flatten_floating(x, name)
        keys = [private_key(k, channel) for k in leaf_keys(key, len(leaves))]
        compressed = plan(leaves)
        errors = jax.tree_util.tree_leaves(error) if error is not None else [None] * len(leaves)
        payloads, residuals = [], []
        for i in compressed:
            flat = _flat(leaves[i])
            e = jnp.zeros_like(flat) if errors[i] is None else _flat(errors[i])
            payload, e_new = encode_ef(flat, e, keys[i])
            payloads.append(payload)
            residuals.append(e_new)
        return leaves, treedef, compressed, payloads, residuals

    def aggregate(x, state, key, step, channel):
        del step
        leaves, treedef, compressed, payloads, _ = encode_all(x, None, key, channel)
        mean_leaves = _exchange(leaves, compressed, payloads, channel, mean_of)
        local_leaves = list(leaves)
        for j, i in enumerate(compressed):
            zeros = jnp.zeros((leaves[i].size,), jnp.float32)
            local_leaves[i] = restore(leaves[i], decode_accumulate(payloads[j], zeros))
        unflat = lambda ls: jax.tree_util.tree_unflatten(treedef, ls)
        return Aggregate(unflat(mean_leaves), unflat(local_leaves), state)

    def aggregate_ef(x, error, state, key, step, channel):
        del step
        leaves, treedef, compressed, payloads, residuals = encode_all(x, error, key, channel)
        error_leaves = jax.tree_util.tree_leaves(error)
        # Uncompressed leaves are sent exactly: their p = x + e is averaged and the residual is 0.
        sent = [
            leaf + e if i not in compressed else leaf for i, (leaf, e) in enumerate(zip(leaves, error_leaves))
        ]
        mean_leaves = _exchange(sent, compressed, payloads, channel, mean_of)
        new_error = [jnp.zeros_like(e) for e in error_leaves]
        for j, i in enumerate(compressed):
            new_error[i] = restore(error_leaves[i], residuals[j])
        unflat = lambda ls: jax.tree_util.tree_unflatten(treedef, ls)
        agg = Aggregate(unflat(mean_leaves), None, state)
        return agg, unflat(new_error)

    codec = leafwise_codec(
        name,
        plan,
        lambda leaf, key: encode(_flat(leaf), key),
        lambda payload, leaf, key: decode_accumulate(payload, jnp.zeros((leaf.size,), jnp.float32)),
    )
    return Compressor(lambda params: (), aggregate, name, aggregate_ef, codec)
