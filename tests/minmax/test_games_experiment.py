"""experiments.games on a tiny bilinear game: files written, GDA diverges, extragradient and MASHA1 reach
epsilon, bytes recorded."""

import json

from experiments import games
from experiments.configs import bilinear_game


def test_games_binary_writes_metrics_and_plot(tmp_path):
    config = bilinear_game.get_config()
    config.dim, config.num_workers, config.calls, config.log_every = 8, 4, 1000, 20
    config.methods, config.epsilon, config.ratio, config.masha_lr = "gda,extragradient,masha1", 1e-2, 0.5, 0.3
    out = games.run(config, str(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["results"]) == {"gda", "extragradient", "masha1"}
    assert (tmp_path / "plot.png").stat().st_size > 0
    results = out["results"]
    assert results["gda"]["bytes_to_epsilon"] is None  # simultaneous GDA spirals out
    assert results["gda"]["distance"][-1] is None or results["gda"]["distance"][-1] > 1.0
    for name in ("extragradient", "masha1"):
        assert results[name]["bytes_to_epsilon"] > 0
        assert results[name]["ergodic_gap"][-1] < results[name]["ergodic_gap"][0]
