"""The Colab notebooks run top to bottom in a real Jupyter kernel, started outside the repository.

Each notebook in ``colabs/`` is executed by nbclient in a fresh ``python3`` (ipykernel) kernel whose
working directory is a temporary folder, as a user's Colab would start it: only the installed
``optdist`` is importable (not the repository's ``experiments`` package, not files next to the notebook),
the 8 forced CPU devices of ``tests/conftest.py`` are not passed on, and each cell has a bounded time.
The test asserts that no cell raised and that every ``plt.show()`` displayed an inline PNG plot.
"""

import importlib.util
import json
import os
import pathlib
import re
import time

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; a whole notebook used 28-55 CPU-seconds (2-core CPU, jax 0.10.2)
EXPECTED = [
    "01_quickstart",
    "02_powersgd_and_error_feedback",
    "03_shampoo",
    "04_diloco_and_friends",
    "05_byzantine_robustness",
    "06_decentralized_and_zeroth_order",
]


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a user's runtime has its own device count, not the tests' 8
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    kept = [p for p in paths if pathlib.Path(p).resolve() != ROOT]  # the repository is not on a user's path
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


def _sources(path):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_the_six_notebooks_exist_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code, path.name
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
            f"{path.name} is committed with outputs: regenerate it with `python colabs/_build.py`"
        )


def test_notebooks_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("colabs_build", ROOT / "colabs" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for fresh in build.build(out_dir=tmp_path):
        committed = ROOT / "colabs" / fresh.name
        assert fresh.read_text() == committed.read_text(), (
            f"{committed.name} differs from colabs/_build.py's output: edit the generator and rerun it"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_uses_no_repository_only_code(path):
    sources = "\n".join(_sources(path))
    assert "import experiments" not in sources and "from experiments" not in sources
    assert "google.colab" in _sources(path)[0], "the first code cell installs optdist in Colab"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_a_kernel(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
        allow_errors=False,
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env(), cwd=str(tmp_path))
    except nbclient.exceptions.CellExecutionError as err:  # the cell's source and its traceback
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # IPython colours the traceback
        pytest.fail(f"{path.name} failed in a kernel:\n{message[-6000:]}", pytrace=False)
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    shows = sum(src.count("plt.show()") for src in _sources(path))
    assert images and len(images) == shows, f"{path.name}: {len(images)} inline plots, {shows} plt.show()"
    print(f"{path.stem}: {seconds:.1f} s, {len(images)} plots")
