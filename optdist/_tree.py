"""Finding the sub-states of a kind inside an optimizer state tree."""

from __future__ import annotations

from typing import Any

import jax


def instances(tree: Any, kinds: type | tuple[type, ...]) -> list[Any]:
    """Every node of ``tree`` that is an instance of ``kinds``, in the tree's flattening order (chains,
    ``skip_nonfinite``, ``inject_hyperparams`` and any other pytree nodes are searched; an instance's
    own children are not)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kinds))
    return [leaf for leaf in leaves if isinstance(leaf, kinds)]
