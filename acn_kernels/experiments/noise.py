"""Input corruptions of the noise-robustness experiment, on inputs scaled to [0, 1] (the poster's
table: Gaussian noise of standard deviation sigma, salt-and-pepper noise of probability p)."""
from __future__ import annotations

import torch


def gaussian(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2), clipped back to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device) * sigma
    return (x + noise).clamp(0, 1)


def salt_and_pepper(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each value becomes 0 or 1 (even odds) with probability p."""
    hit = torch.rand(x.shape, generator=generator, device=x.device) < p
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


CONDITIONS = {
    "clean": lambda x, g: x,
    **{f"gauss {s}": (lambda s: lambda x, g: gaussian(x, s, g))(s) for s in (0.1, 0.2, 0.4)},
    **{f"s&p {p}": (lambda p: lambda x, g: salt_and_pepper(x, p, g))(p) for p in (0.01, 0.05, 0.1)},
}
