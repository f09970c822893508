"""Deterministic DDIM as small pure functions (Song et al. 2021; method.md §2, §6).

Written in the same order of operations as diffusers' `DDIMScheduler.step` with eta = 0, so our fused
sampler reproduces `StableDiffusionPipeline` bit for bit on a single full-canvas region. MRGD needs x̂0 of every
crop and a re-step from a guided x̂0, which a stateful scheduler object cannot give for many crops per step.
"""

from __future__ import annotations

import torch


def set_timesteps(scheduler, steps: int) -> list[int]:
    """The scheduler's timesteps for `steps` DDIM steps, refusing a count whose timesteps would run past the
    training schedule (SD's `steps_offset` 1 puts 1000 steps' first timestep at 1000, one past the last)."""
    from .errors import InputError

    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps.tolist()
    if max(timesteps) >= len(scheduler.alphas_cumprod):
        most = len(scheduler.alphas_cumprod) - scheduler.config.steps_offset
        raise InputError(f"steps: {steps} is more than this model's scheduler takes; use at most {most}")
    return timesteps


def alphas_at(scheduler, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_prev) for a DDIM step from `timestep`, exactly as diffusers' DDIMScheduler picks them."""
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[timestep]
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return alpha, alpha_prev


def to_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor | None,
               prediction_type: str) -> torch.Tensor:
    """The noise prediction ε̂ from an ε- or v-predicting model (SD 1.x predicts ε, SD 2.x v; ᾱ_t only for v)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha**0.5 * model_output + (1 - alpha) ** 0.5 * x_t
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use an epsilon or v_prediction model")


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step: returns (x_{t−1}, x̂0)."""
    x0 = (x_t - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    x_prev = alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
    return x_prev, x0


def ddim_restep(x_t: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided DDIM re-step of method.md §6 (classifier-guidance style).

    ε̂ = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t); ε' = ε̂ + √(1−ᾱ_t)·g; x̂0' = (x_t − √(1−ᾱ_t)·ε')/√ᾱ_t;
    x_{t−1} = √ᾱ_{t−1}·x̂0' + √(1−ᾱ_{t−1})·ε'. With g = 0 this is the unguided step from the fused x̂0.
    """
    eps = (x_t - alpha**0.5 * x0) / (1 - alpha) ** 0.5
    eps = eps + (1 - alpha) ** 0.5 * grad
    return ddim_step(x_t, eps, alpha, alpha_prev)


def ddim_invert_step(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM inversion step from ᾱ (cleaner) to ᾱ_next (noisier)."""
    x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps
