"""``--list``: a config's fields with their values and meaning, then every method and preset."""

from __future__ import annotations

from experiments import methods
from experiments.configs import default as default_config


def describe_config(config, docs: dict, prefix: str = "") -> list[str]:
    """``field = value  # doc`` for every field (nested ConfigDicts summarised by their keys)."""
    lines = []
    for key in sorted(config.keys()):
        value = config[key]
        doc = docs.get(key, "")
        if key == "hparams":
            lines.append(f"  {prefix}{key}.<method>.<field>  # {doc} (methods below)")
        elif hasattr(value, "keys"):
            if key == "base":
                lines.append(f"  {prefix}base.<field>  # {doc}")
                lines += describe_config(value, default_config.FIELD_DOCS, prefix=f"{prefix}base.")
            else:
                lines.append(f"  {prefix}{key} = {{{', '.join(sorted(value.keys()))}}}  # {doc}")
        else:
            lines.append(f"  {prefix}{key} = {value!r}" + (f"  # {doc}" if doc else ""))
    return lines


def print_listing(config, docs: dict, title: str) -> None:
    print(f"{title} (set any with --config.<field>=<value>):")
    print("\n".join(describe_config(config, docs)))
    print()
    hparams = config.get("hparams") or (config.get("base") or {}).get("hparams")
    print(methods.describe(hparams))
