r"""(epsilon, delta) accounting for the Gaussian mechanism repeated over T steps (zero-concentrated DP).

Assumptions (stated, not checked):

* Each step releases, per worker, one message :math:`M_t(D) + \mathcal N(0, \sigma^2 C^2 I)` whose
  L2 sensitivity is bounded by clipping: :math:`\|M_t(D) - M_t(D')\| \le \Delta = c\,C` for
  neighbouring local data :math:`D, D'`, with ``sensitivity`` :math:`c = 2` when one worker's data
  may be *replaced* (a clipped message moves anywhere in the ball of radius :math:`C`) and
  :math:`c = 1` for add/remove (the message is replaced by zero). The noise is drawn fresh per
  step and per worker, independent of everything else.
* One step is :math:`\rho_1 = \Delta^2 / (2 \sigma^2 C^2) = c^2 / (2 \sigma^2)`-zCDP (Bun & Steinke
  2016, Prop. 1.6); :math:`T` adaptive steps compose to :math:`\rho = T c^2 / (2 \sigma^2)`
  (Lemma 2.3); everything computed from the released messages (the aggregate, the model) is
  post-processing.
* Conversion to :math:`(\varepsilon, \delta)`: :math:`\varepsilon = \rho + 2\sqrt{\rho \ln(1/\delta)}`
  (Prop. 1.3; the minimum over Renyi orders of :math:`\alpha\rho + \ln(1/\delta)/(\alpha - 1)`).
  This is conservative: tighter conversions and privacy amplification by subsampling are not used.
"""

from __future__ import annotations

import math

from optdist import _checks


def _common(steps: int, sensitivity: float) -> tuple[int, float]:
    steps = _checks.positive_int(steps, "steps")
    sensitivity = _checks.in_range(sensitivity, "sensitivity", 0.0, float("inf"), low_open=True)
    return steps, sensitivity


def zcdp_rho(noise_multiplier: float, steps: int, sensitivity: float = 2.0) -> float:
    r""":math:`\rho = T c^2 / (2\sigma^2)` for ``steps`` Gaussian releases of noise
    ``noise_multiplier`` :math:`\sigma` (times the clip norm) and sensitivity ``sensitivity`` :math:`c`
    (times the clip norm)."""
    sigma = _checks.in_range(noise_multiplier, "noise_multiplier", 0.0, float("inf"), low_open=True)
    steps, c = _common(steps, sensitivity)
    return steps * c * c / (2.0 * sigma * sigma)


def epsilon(noise_multiplier: float, steps: int, delta: float, sensitivity: float = 2.0) -> float:
    r"""The :math:`\varepsilon` at which ``steps`` releases are :math:`(\varepsilon, \delta)`-DP
    (see the module docstring for the assumptions): :math:`\rho + 2\sqrt{\rho\ln(1/\delta)}`."""
    delta = _checks.in_range(delta, "delta", 0.0, 1.0, low_open=True, high_open=True)
    rho = zcdp_rho(noise_multiplier, steps, sensitivity)
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def noise_multiplier_for(epsilon: float, delta: float, steps: int, sensitivity: float = 2.0) -> float:
    r"""The smallest :math:`\sigma` making ``steps`` releases :math:`(\varepsilon, \delta)`-DP under the
    module's assumptions: :math:`\sqrt\rho = \sqrt{\ln(1/\delta) + \varepsilon} - \sqrt{\ln(1/\delta)}`,
    :math:`\sigma = c\sqrt{T / (2\rho)}`.

    Args:
      epsilon: target :math:`\varepsilon > 0`.
      delta: target :math:`\delta \in (0, 1)`.
      steps: number :math:`T` of noised releases (every training step, refresh or difference).
      sensitivity: :math:`c` (2: replace one worker's data; 1: add/remove).

    Returns:
      The noise multiplier :math:`\sigma` (the noise std is :math:`\sigma C` for clip norm :math:`C`).

    Example::

      sigma = optdist.privacy.noise_multiplier_for(epsilon=8.0, delta=1e-5, steps=1000)
      tx = optax.chain(optdist.privacy.dp_diff_mean(1.0, sigma, 10, "data"), optax.sgd(0.1))
    """
    eps = _checks.in_range(epsilon, "epsilon", 0.0, float("inf"), low_open=True)
    delta = _checks.in_range(delta, "delta", 0.0, 1.0, low_open=True, high_open=True)
    steps, c = _common(steps, sensitivity)
    log_term = math.log(1.0 / delta)
    root_rho = math.sqrt(log_term + eps) - math.sqrt(log_term)
    return c * math.sqrt(steps / 2.0) / root_rho
