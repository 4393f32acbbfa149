"""Exact-distribution checks for samples of the Gaussian mixture (metrics=gmm)."""
from __future__ import annotations

import torch


def gmm_metrics(samples: torch.Tensor, mixture) -> dict:
    """Errors of the sample mean and covariance against the mixture's closed forms, and the average
    log-likelihood of the samples under the true density (higher = samples sit on the data)."""
    x = samples.double().cpu()
    mean_err = torch.linalg.norm(x.mean(0) - mixture.mean()).item()
    cov_err = torch.linalg.norm(torch.cov(x.T).reshape(mixture.dim, mixture.dim) - mixture.cov()).item()
    return {"mean_err": mean_err, "cov_err": cov_err, "data_loglik": mixture.log_prob(x).mean().item()}
