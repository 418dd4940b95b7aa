"""Helpers for a float8_e4m3fn latent cache (per-tensor scale)."""
import torch

FP8_E4M3_MAX = 448.0


def fp8_scale_for(x: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """A per-tensor scale for storing `x` in float8_e4m3fn: amax(|x|) * margin / 448.

    Returns a float32 tensor of one element on x's device (keep it on the device so a
    captured CUDA graph can read it). `margin > 1` leaves headroom for later tokens whose
    values exceed those seen here; values beyond 448 * scale saturate. An all-zero `x`
    gets scale 1.
    """
    amax = x.detach().abs().amax().float().reshape(1) * margin
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
