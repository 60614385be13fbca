"""Flax (nnx) models for the experiments, exposed as pure functions of params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """A small MLP classifier (digits: 64 -> hidden -> hidden -> 10)."""

    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


class CNN(nnx.Module):
    """A small CNN classifier for 8x8 digit images."""

    def __init__(self, channels: int, dout: int, *, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, channels, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
        self.out = nnx.Linear(channels * 16, dout, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(*x.shape[:-1], 8, 8, 1)
        x = jax.nn.relu(self.c1(x))
        x = nnx.avg_pool(jax.nn.relu(self.c2(x)), (2, 2), (2, 2))
        return self.out(x.reshape(*x.shape[:-3], -1))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharTransformer(nnx.Module):
    """A small decoder-only transformer over characters."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, seq_len: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        seq = tokens.shape[-1]
        x = self.embed(tokens) + self.pos[...][:seq]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def build(config, num_classes: int, seed: int):
    """Returns ``(params, apply_fn)`` with ``apply_fn(params, x) -> logits``."""
    rngs = nnx.Rngs(seed)
    if config.model == "mlp":
        model = MLP(64, config.hidden, num_classes, rngs=rngs)
    elif config.model == "cnn":
        model = CNN(config.hidden, num_classes, rngs=rngs)
    elif config.model == "transformer":
        model = CharTransformer(
            num_classes, config.dim, config.heads, config.layers, config.seq_len, rngs=rngs
        )
    else:
        raise ValueError(f"Unknown model {config.model!r}: choose 'mlp', 'cnn' or 'transformer'.")
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(params, x):
        return nnx.merge(graphdef, params)(x)

    return params, apply_fn


def cross_entropy(logits, labels):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))
