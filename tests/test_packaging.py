"""Packaging: every subpackage is installed, kernels are namespaced, __all__ is honest."""

import pathlib
import tomllib

import optdist

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "optdist").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert "optdist_kernels" in listed and "kernels" not in listed


def test_all_names_exist():
    for name in optdist.__all__:
        assert hasattr(optdist, name), name
