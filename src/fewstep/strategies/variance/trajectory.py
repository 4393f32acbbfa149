"""Analytic-DPM's optimal trajectory (Bao et al. 2022, Sec. 4 / App.): the K timesteps that minimise the bound.

With the optimal variances the K-step DDPM bound is, up to terms that telescope, sum over jumps of
(d/2) log(1 - beta_{t|s} Gamma_t / bb_t); `dp_trajectory` minimises it by dynamic programming (least-cost
K-node path from t = 0 to N-1), with the official code's treatment of the unreliable tail where the
estimated Gamma exceeds 1 (see `split_reliable`). Indexing as in `fewstep.strategies.variance.analytic`.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ...schedule import NoiseSchedule


def jump_cost(gamma: np.ndarray, schedule: NoiseSchedule, n: Optional[int] = None) -> np.ndarray:
    """C[s, t] = log(1 - beta_{t|s} Gamma_t / bb_t) for 0 <= s < t < n (inf elsewhere): the part of the
    K-step bound (in units of d/2) that depends on the trajectory, Analytic-DPM Sec. 4."""
    n = schedule.N if n is None else n
    ab = schedule.alpha_bar[:n]
    beta_ts = 1.0 - ab[None, :] / ab[:, None]                        # beta_{t|s}, rows s, columns t
    with np.errstate(divide="ignore", invalid="ignore"):
        C = np.log(1.0 - beta_ts * (np.asarray(gamma[:n]) / (1.0 - ab))[None, :])
    C[np.tril_indices(n)] = np.inf
    return C


def least_cost_path(C: np.ndarray, K: int) -> list:
    """Increasing K-node path 0 = p_1 < ... < p_K = n-1 minimising sum C[p_k, p_{k+1}] (dynamic programming)."""
    n = C.shape[0]
    if not (2 <= K <= n or K == n == 1):
        raise ValueError(f"a path from node 0 to node {n - 1} has 2..{n} nodes (got K={K})")
    if K == n:
        return list(range(n))
    cost = np.full((K + 1, n), np.inf)
    arg = np.full((K + 1, n), -1, dtype=np.int64)
    cost[1, 0] = 0.0
    for k in range(2, K + 1):
        tot = cost[k - 1][:, None] + C                                 # [s, t]
        arg[k] = np.argmin(tot, axis=0)
        cost[k] = tot[arg[k], np.arange(n)]
    path, t = [n - 1], n - 1
    for k in range(K, 1, -1):
        t = int(arg[k, t])
        path.append(t)
    return path[::-1]


def split_reliable(gamma: np.ndarray, K: int):
    """The official `_split`: Gamma <= 1 in theory, so from the first timestep where the estimate exceeds 1
    the tail is unreliable. num_bad = 2 x (length of that tail) timesteps at the top are left out of the DP
    and get K2 evenly spaced steps, the reliable head [0, N1) gets K1 = ceil((1 - 0.8 num_bad/N) K) DP steps.
    Returns (K1, N1, K2, num_bad). (Made total: num_bad <= N-1, and K = 2 with a tail gives K1 = K2 = 1.)"""
    N = len(gamma)
    above = np.nonzero(np.asarray(gamma) > 1.0)[0]
    num_bad = 0 if len(above) == 0 else min(2 * (N - int(above[0])), N - 1)
    N1 = N - num_bad
    K1 = math.ceil((1.0 - 0.8 * num_bad / N) * K)
    K2 = K - K1
    if K1 > N1:
        K1, K2 = N1, K - N1
    if K2 > num_bad:
        K2, K1 = num_bad, K - num_bad
    if num_bad > 0 and K2 == 0:
        K2, K1 = 1, K - 1
    return K1, N1, K2, num_bad


def dp_trajectory(gamma: np.ndarray, schedule: NoiseSchedule, K: int) -> np.ndarray:
    """Analytic-DPM optimal K-step trajectory, decreasing model timesteps from N-1 to 0 (official `_dp_seg`).

    DP over the reliable head [0, N1) with cost `jump_cost`, then K2 evenly spaced steps in the unreliable
    tail (N1, N-1] (round(N - k num_bad / K2) in the paper's indices, k = 0..K2-1).
    """
    N = schedule.N
    gamma = np.asarray(gamma, dtype=np.float64)
    if gamma.shape != (N,):
        raise ValueError(f"dp_trajectory needs Gamma on all N = {N} timesteps (got shape {gamma.shape})")
    if not isinstance(K, (int, np.integer)) or not 2 <= K <= N:
        raise ValueError(f"analytic_dp needs 2 <= steps <= N = {N} (got {K})")
    if K == N:
        return np.arange(N - 1, -1, -1, dtype=np.float64)
    K1, N1, K2, num_bad = split_reliable(gamma, K)
    head = least_cost_path(jump_cost(gamma, schedule, N1), K1) if K1 > 1 else [0]
    tail = [round(N - num_bad / K2 * k) - 1 for k in range(K2)][::-1] if K2 > 0 else []
    path = head + tail
    assert len(path) == K and path[0] == 0 and path[-1] == N - 1 and all(np.diff(path) > 0), path
    return np.asarray(path[::-1], dtype=np.float64)


def trajectory_cost(gamma: np.ndarray, schedule: NoiseSchedule, ts) -> float:
    """Sum of jump_cost along a trajectory (any order): what dp_trajectory minimises."""
    ts = np.sort(np.asarray(ts, dtype=np.int64))
    ab = schedule.alpha_bar
    g = np.asarray(gamma, dtype=np.float64)
    return float(sum(math.log(1.0 - (1.0 - ab[t] / ab[s]) * g[t] / (1.0 - ab[t])) for s, t in zip(ts[:-1], ts[1:])))
