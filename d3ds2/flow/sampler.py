"""Euler sampler of the rectified flow with timestep shift and classifier-free guidance."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from .guidance import cat_batches


def shifted_sigmas(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """[steps + 1] noise levels from 1 to 0: linspace(1, 0) warped by sigma' = s sigma / (1 + (s - 1) sigma).

    (diffusers' FlowMatchEulerDiscreteScheduler, used by the official pipeline, spaces the grid between
    1 and a shifted 1e-3 before appending 0; the difference is below 1e-3 in sigma.)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return shift * s / (1 + (shift - 1) * s)


def guided_velocity(
    model: Callable[[object, torch.Tensor, object], torch.Tensor],
    x,
    t: torch.Tensor,
    cond,
    uncond,
    guidance: float,
) -> torch.Tensor:
    """uncond + w (cond - uncond) from ONE model call on the doubled batch [x; x] with [cond; uncond].

    x / cond / uncond: dense [B, ...] tensors or SparseTensors; model returns a tensor whose rows follow
    x's rows (dense: samples, sparse: tokens), so the doubled output splits into two equal halves.
    guidance 1 runs the conditional prediction alone.
    """
    if guidance == 1.0:
        return model(x, t, cond)
    out = model(cat_batches(x, x), torch.cat([t, t]), cat_batches(cond, uncond))
    v_cond, v_uncond = out.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


class FlowSampler:
    """Euler integration of dx/dsigma = v from sigma = 1 (noise) to 0 (data).

    Args:
        steps, shift: the schedule (:func:`shifted_sigmas`).
        guidance: CFG weight w (uncond + w (cond - uncond)); 1 disables guidance.
        guidance_interval: (lo, hi): guidance only while lo <= sigma <= hi, plain conditional elsewhere.
    """

    def __init__(self, steps: int = 50, shift: float = 1.0, guidance: float = 1.0, guidance_interval: tuple[float, float] | None = None):
        self.steps, self.shift, self.guidance = steps, shift, guidance
        self.guidance_interval = tuple(guidance_interval) if guidance_interval is not None else None

    def guidance_at(self, sigma: float) -> float:
        if self.guidance_interval is None:
            return self.guidance
        lo, hi = self.guidance_interval
        return self.guidance if lo <= sigma <= hi else 1.0

    @torch.no_grad()
    def sample(
        self,
        velocity: Callable[[object, torch.Tensor, float], object],
        noise,
        batch_size: int,
        progress: str | None = None,
    ):
        """Integrate from ``noise`` (tensor, or SparseTensor supporting + and * scalars) to the data.

        velocity(x, t [B] on the 0..1000 scale, guidance) -> v of x's type; returns x at sigma = 0.
        """
        sigmas = shifted_sigmas(self.steps, self.shift).tolist()
        x = noise
        device = noise.device
        for i in tqdm(range(self.steps), desc=progress, disable=progress is None, leave=False):
            s, s_next = sigmas[i], sigmas[i + 1]
            t = torch.full((batch_size,), s * 1000.0, device=device, dtype=torch.float32)
            v = velocity(x, t, self.guidance_at(s))
            x = x + v * (s_next - s)
        return x
