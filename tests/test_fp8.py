"""float8_e4m3fn latent cache: exact stored bytes for append, scale helper, bad scales."""
import pytest
import torch

import mla_ext
from mla_ext import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_append_fp8_exact_bytes(device, dtype, block_size):
    gen = torch.Generator().manual_seed(block_size * 10 + int(dtype.itemsize))
    tokens, num_blocks = 700, 900 // block_size + 2
    # Magnitudes over 5 decades so subnormals, normals and saturated values all occur.
    kv_c = torch.randn(tokens, 512, generator=gen) * torch.logspace(-5, 1, tokens)[:, None]
    k_pe = torch.randn(tokens, 64, generator=gen)
    scale = mla_ext.fp8_scale_for(torch.cat([kv_c, k_pe], -1), margin=0.25).to(device)  # forces saturation
    kv_c, k_pe = kv_c.to(dtype).to(device), k_pe.to(dtype).to(device)
    cache = torch.full((num_blocks, block_size, 576), float("nan"), device=device).to(torch.float8_e4m3fn)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[::5] = -1  # padding tokens

    expected = reference.append_kv(kv_c, k_pe, cache, slots, scale=scale)
    mla_ext.append_kv(kv_c, k_pe, cache, slots, scale=scale)

    assert torch.equal(_bytes(cache), _bytes(expected))
    stored = cache.float()
    assert (stored.abs() == 448).any(), "the test should exercise saturation"
    written = reference.gather_sequence(cache.view(-1, 1, 576), slots[slots >= 0].int(), int((slots >= 0).sum()))
    assert torch.isfinite(written.float()).all(), "saturation must never store inf or NaN"


def test_fp8_rounding_matches_torch_in_range():
    # Inside +-448 the stored byte must be torch's own round-to-nearest-even cast of x / scale.
    values = torch.linspace(-448, 448, 512 * 64).view(64, 512)
    k_pe = torch.zeros(64, 64)
    scale = torch.tensor([1.0])
    cache = torch.zeros(64, 1, 576, dtype=torch.float8_e4m3fn)
    mla_ext.append_kv(values, k_pe, cache, torch.arange(64), scale=scale)
    assert torch.equal(_bytes(cache[:, 0, :512]), _bytes(values.to(torch.float8_e4m3fn)))


def test_fp8_scale_for():
    x = torch.tensor([[-3.0, 1.5], [0.25, 2.0]])
    assert torch.allclose(mla_ext.fp8_scale_for(x), torch.tensor([3.0 / 448]))
    assert torch.allclose(mla_ext.fp8_scale_for(x, margin=2.0), torch.tensor([6.0 / 448]))
    assert mla_ext.fp8_scale_for(torch.zeros(3)).item() == 1.0


@pytest.mark.parametrize(
    "scale, match",
    [
        (None, "needs scale"),
        (torch.tensor([1.0], dtype=torch.float64), "scale must be float32"),
        (torch.tensor([1.0, 2.0]), "scale must hold 1 element"),
        (torch.tensor([0.0]), "scale must be finite and > 0"),
        (torch.tensor([float("nan")]), "scale must be finite and > 0"),
    ],
)
def test_fp8_bad_scale_leaves_cache_untouched(scale, match):
    cache = torch.zeros(4, 16, 576, dtype=torch.float8_e4m3fn)
    before = cache.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        mla_ext.append_kv(torch.randn(3, 512), torch.randn(3, 64), cache, torch.arange(3), scale=scale)
    assert torch.equal(_bytes(cache), _bytes(before))


def test_scale_rejected_for_bf16_cache():
    cache = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scale is only for a float8_e4m3fn cache"):
        mla_ext.append_kv(torch.randn(3, 512, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16), cache,
                          torch.arange(3), scale=torch.tensor([1.0]))
