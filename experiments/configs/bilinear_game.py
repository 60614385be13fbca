"""A distributed bilinear game for the min-max methods (``optdist.minmax``).

python -m experiments.games --config=experiments/configs/bilinear_game.py --workdir=runs/bilinear_game

Worker m holds f_m(x, y) = x^T A_m y + b_m^T x + c_m^T y (+ reg/2 |x|^2 - reg/2 |y|^2); the game is their
mean. A has singular values in [0.5, 1.5]; the workers' matrices differ by ``spread / sqrt(dim)``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dim = 50  # per player: z = (x, y) has 2 * dim entries
    c.num_workers = 8
    c.spread = 0.3
    c.reg = 0.0  # 0: the pure bilinear game (simultaneous GDA diverges)
    c.seed = 3
    c.calls = 3000  # operator evaluations per worker (an extragradient step is two)
    c.log_every = 10
    c.epsilon = 1e-4  # relative distance to the saddle for the bytes-to-epsilon column
    # name -> step size; compressed methods also take ratio (kept fraction) and tau = 1 - ratio.
    # local_gda (GDA between syncs) diverges on the pure bilinear game: add it with reg > 0.
    c.methods = (
        "gda,extragradient,past_extragradient,optimistic_gradient,reflected_gradient,masha1,masha2,"
        "masha1_int8,masha2_int8"
    )
    c.learning_rate = 0.2
    c.extragradient_lr = 0.6  # the best of 0.3-0.9 (0.65 slower, 0.7 diverges)
    c.masha_lr = 0.2
    c.ratio = 0.25
    # masha1_int8 / masha2_int8: int8 codes on a shared scale, all-reduced (quantize(8,
    # exchange="summed")); step and tau the best of BENCHMARKS.md's sweep (step 0.3-0.6, tau 0.3-0.9).
    c.masha_int8_lr = 0.55
    c.masha_int8_tau = 0.5
    c.local_gda_h = 4
    return c
