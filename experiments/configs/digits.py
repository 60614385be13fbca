"""Digits (scikit-learn's bundled 8x8 images) with an MLP and 8 simulated workers: the default config."""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config()
