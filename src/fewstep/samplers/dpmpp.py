"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095), Alg. 2: data prediction, orders 1-3.

In the half log-SNR lambda = log(alpha / sigma) (alpha = sqrt(ab), sigma = sqrt(1 - ab)) the
diffusion ODE is solved exactly in its linear part; with h = lambda_{i+1} - lambda_i and
D_i = x0_theta(x_i, t_i):

    order 1 (= DDIM):  x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i
    order 2 (midpoint, Alg. 2):   ... - 0.5 alpha_{i+1} (e^{-h} - 1) D1,   D1 = (D_i - D_{i-1}) / r0
    order 3 (DPM-Solver eq. / diffusers):  + alpha (phi_2) D1 - alpha (phi_3) D2

with r0 = h_{i-1} / h (previous step over this step). The last step goes to sigma = 0, where the
update is exactly x = D (the model's x0 prediction): diffusers' final_sigmas_type="zero".

Order schedule (replicates diffusers' DPMSolverMultistepScheduler.step): step 0 is first order
(warm-up: no history), step 1 at most second order; the final step (to sigma = 0) is always first
order; with lower_order_final and fewer than 15 steps the second-to-last step is at most second order.
``lower_order_final="always"`` applies that rule at every step count. It matters for order 3 on grids whose
last step is long in log-SNR: on the linspace grid with the t = 0 call the step from t = 53 to t = 0 at
20 steps has h = 2.92 against 0.66 and 0.43 for the two before it, and the third-order extrapolation over
such unequal steps costs 24 FID on the shipped model with 5000 samples (73.1 vs 49.3; experiments/README.md,
"lower_order_final").
When to use: order 2 for guided sampling, order 3 for unconditional models; keep lower_order_final on
below ~15 steps (it stabilises them), and "always" with order 3 on the endpoint grid. Time grid: the DPM-Solver paper recommends uniform log-SNR at low
resolution (timesteps=logsnr with endpoint=false is its grid: M steps between M + 1 points, no evaluation
at the clean end). On the shipped 28 x 28 model linspace with the t = 0 evaluation is better at 5-20 NFE
(experiments/README.md), so it is the default; compare grids on your model before trusting either.
"""
from __future__ import annotations

import math

import numpy as np
import torch


LOWER_ORDER_FINAL = (True, False, "always")


def check_lower_order_final(value) -> None:
    if value not in LOWER_ORDER_FINAL:
        raise ValueError(f"sampler.lower_order_final must be true, false or always (got {value!r})")


def dpmpp_orders(steps: int, order: int, lower_order_final=True) -> list:
    """Solver order used at each step, exactly as diffusers' DPMSolverMultistepScheduler chooses it
    (lower_order_final True / False); "always" also lowers the second-to-last step at >= 15 steps."""
    check_lower_order_final(lower_order_final)
    lower = lower_order_final == "always" or (lower_order_final is True and steps < 15)
    orders = []
    for i in range(steps):
        if order == 1 or i == 0 or i == steps - 1:          # warm-up; final step to sigma = 0
            orders.append(1)
        elif order == 2 or i == 1 or (lower and i == steps - 2):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def sample_dpmpp(model, x: torch.Tensor, ts: np.ndarray, schedule, order: int = 2,
                 lower_order_final=True, callback=None, extra_args=None) -> torch.Tensor:
    """DPM-Solver++(order)M from x = x_T ~ N(0, I) over decreasing timesteps ts, ending at sigma = 0.
    model(x, t, **extra_args) -> eps; callback(i, t, x, x0) before each step (as in sample_ddim)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3 (got {order})")
    ts = np.asarray(ts, dtype=np.float64)
    ab = schedule.alpha_bar_at(ts)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    extra_args = extra_args or {}
    D = []  # x0 predictions of the last steps, newest last
    for i, (t, k) in enumerate(zip(ts, dpmpp_orders(len(ts), order, lower_order_final))):
        eps = model(x, float(t), **extra_args)
        D = (D + [schedule.x0_from_eps(x, float(t), eps)])[-3:]
        if callback is not None:
            callback(i, float(t), x, D[-1])
        if i == len(ts) - 1:                               # sigma_{i+1} = 0: x = D_i exactly
            x = D[-1]
            break
        h = lam[i + 1] - lam[i]
        a, phi1 = alpha[i + 1], math.expm1(-h)             # phi1 = e^{-h} - 1
        x = (sigma[i + 1] / sigma[i]) * x - (a * phi1) * D[-1]
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            x = x - (0.5 * a * phi1) * ((D[-1] - D[-2]) / r0)
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            D1_0, D1_1 = (D[-1] - D[-2]) / r0, (D[-2] - D[-3]) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / (r0 + r1)
            x = x + (a * (phi1 / h + 1.0)) * D1 - (a * ((phi1 + h) / h ** 2 - 0.5)) * D2
    return x
