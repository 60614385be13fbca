"""The README's code runs as written (the Colab notebooks: tests/test_notebooks.py)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_examples_run():
    namespace = {}
    blocks = _readme_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    loss = namespace["loss"]
    assert float(loss.mean()) < 2.3  # below the 10-class chance loss after 50 steps
    assert namespace["optdist"].bytes_sent(namespace["optimizer_w"].opt_state).shape == (8,)
    assert float(namespace["stack_loss"].mean()) < 1.0  # the composed stack trains too (0.43 here)
    assert int(namespace["optdist"].bytes_sent(namespace["stack_w"][1])[0]) > 0
    assert float(namespace["dec_loss"].mean()) < 1.0  # decentralized CHOCO-SGD trains
    assert namespace["spread"] < 0.5  # and the workers' parameters stay close (consensus)
    assert (namespace["optdist"].bytes_sent(namespace["spsa_w"][1]) == 20 * 7).all()  # one byte each
