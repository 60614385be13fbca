"""optdist experiments: absl binaries, ml_collections configs, embedded datasets."""
