"""Probability pieces the models share, written once and tested on their own.

Likelihoods of expression given decoder output (negative binomial with observed library size
and per-gene inverse dispersion, Poisson, Gaussian on log-normalised values) and the
straight-through relaxed Bernoulli used for sparse masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sams_core.errors import SamsError
from sams_core.models.registry import LIKELIHOODS

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_STD_MIN, LOG_STD_MAX = -7.0, 3.0  # bounds of a network's log standard deviation


def clamp_log_std(log_std: torch.Tensor) -> torch.Tensor:
    """A network's log standard deviation kept in [LOG_STD_MIN, LOG_STD_MAX] (std from about 1e-3
    to 20), so that a guide can neither collapse nor explode."""
    return log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def mean_and_log_std(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Normal's mean and (clamped) log standard deviation from a network output [..., 2K]
    whose first half is the mean and second half the log standard deviation."""
    mean, log_std = out.chunk(2, dim=-1)
    return mean, clamp_log_std(log_std)


def reparam_normal_log_prob(eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log density of z = mean + exp(log_std)·eps under N(mean, exp(log_std)²), from
    the standard-normal noise ``eps`` that drew it (the guide's log q of a reparametrised draw)."""
    return -0.5 * eps * eps - log_std - _HALF_LOG_2PI


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Elementwise log density of N(mean, exp(log_std)²) at x."""
    return -0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 - log_std - _HALF_LOG_2PI


def std_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """Elementwise log density of N(0, 1) at x."""
    return -0.5 * x * x - _HALF_LOG_2PI


def kl_normal_std_normal(mean: torch.Tensor, log_std: torch.Tensor, prior_mean: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Elementwise KL( N(mean, exp(log_std)²) || N(prior_mean, 1) )."""
    return 0.5 * (torch.exp(2 * log_std) + (mean - prior_mean) ** 2 - 1.0) - log_std


def nb_log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Elementwise log pmf of the negative binomial with mean ``mu`` and inverse dispersion ``theta``."""
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def poisson_log_prob(x: torch.Tensor, mu: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Elementwise log pmf of Poisson(mu) at x."""
    return x * torch.log(mu + eps) - mu - torch.lgamma(x + 1)


def relaxed_bernoulli_st(
    logits: torch.Tensor, temperature: float = 1.0, shape: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """A straight-through relaxed Bernoulli sample and its exact Bernoulli log-probability.

    The sample is hard 0/1 in the forward pass and carries the gradient of the relaxed
    (concrete) sample at ``temperature`` in the backward pass. The log-probability is that of
    the hard value under Bernoulli(sigmoid(logits)), elementwise. ``shape`` prepends sample
    dimensions.
    """
    full = tuple(shape) + tuple(logits.shape)
    u = torch.rand(full, device=logits.device, dtype=logits.dtype).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    m = hard + (soft - soft.detach())
    log_q = m * F.logsigmoid(logits) + (1 - m) * F.logsigmoid(-logits)
    return m, log_q


class Likelihood(nn.Module):
    """p(x | decoder output) for one of :data:`LIKELIHOODS`, with per-gene parameters.

    For ``nb`` and ``poisson`` the decoder output is a vector of logits over genes; the mean is
    library size × softmax(logits). For ``gaussian`` the output is the mean itself and each gene
    has a learned standard deviation.
    """

    def __init__(self, kind: str, n_genes: int):
        super().__init__()
        if kind not in LIKELIHOODS:
            raise SamsError(f"Unknown likelihood {kind!r}. Choose one of: {', '.join(LIKELIHOODS)}.")
        self.kind = kind
        # inverse dispersion (nb) or log std (gaussian); unused for poisson
        self.gene_param = nn.Parameter(torch.zeros(n_genes) if kind != "nb" else torch.full((n_genes,), 1.0))

    def constant(self, x: torch.Tensor) -> torch.Tensor:
        """The part of log p(x | ·) that does not depend on the decoder output, per cell [B]."""
        if self.kind == "nb":
            theta = torch.exp(self.gene_param)
            return (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)).sum(-1)
        if self.kind == "poisson":
            return (-torch.lgamma(x + 1)).sum(-1)
        log_std = self.gene_param
        return (-log_std - _HALF_LOG_2PI).sum(-1).expand(x.shape[:-1])

    def varying(self, x: torch.Tensor, out: torch.Tensor, log_library: torch.Tensor) -> torch.Tensor:
        """The part of log p(x | out) that depends on the decoder output, summed over genes.

        ``out`` may carry leading particle dimensions that broadcast against ``x``.
        """
        out = out.float()
        if self.kind == "gaussian":
            inv_std = torch.exp(-self.gene_param)
            return -0.5 * (((x - out) * inv_std) ** 2).sum(-1)
        log_mu = F.log_softmax(out, dim=-1) + log_library.unsqueeze(-1)
        if self.kind == "poisson":
            return (x * log_mu - torch.exp(log_mu)).sum(-1)
        theta = torch.exp(self.gene_param)
        log_theta = self.gene_param
        # theta*log(theta) - (theta + x)*log(theta + mu) + x*log(mu); mu is at most the library
        # size, so log(theta + exp(log_mu)) cannot overflow, and it costs a quarter less than
        # logaddexp over particles × cells × genes (the bulk of a CPU training step's arithmetic)
        log_theta_mu = torch.log(theta + torch.exp(log_mu))
        return (theta * log_theta - (theta + x) * log_theta_mu + x * log_mu).sum(-1)

    def log_prob(self, x: torch.Tensor, out: torch.Tensor, log_library: torch.Tensor) -> torch.Tensor:
        """log p(x | out) summed over genes (leading particle dimensions broadcast)."""
        return self.varying(x, out, log_library) + self.constant(x)

    def mean(self, out: torch.Tensor, library: torch.Tensor | float) -> torch.Tensor:
        """Expected expression given decoder output (counts for nb/poisson)."""
        out = out.float()
        if self.kind == "gaussian":
            return out
        lib = library if isinstance(library, float) else library.unsqueeze(-1)
        return torch.softmax(out, dim=-1) * lib

    def sample(self, out: torch.Tensor, library: torch.Tensor | float) -> torch.Tensor:
        """A draw of expression given decoder output."""
        mu = self.mean(out, library)
        if self.kind == "gaussian":
            return mu + torch.exp(self.gene_param) * torch.randn_like(mu)
        if self.kind == "poisson":
            return torch.poisson(mu)
        theta = torch.exp(self.gene_param)
        rate = torch.distributions.Gamma(theta.expand_as(mu), (theta / mu.clamp_min(1e-8))).sample()
        return torch.poisson(rate)
