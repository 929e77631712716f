"""The ``lowres`` input module (reduced-resolution denoiser for large inputs): shapes, identity at
initialisation, per-sample forward, validated config, save/load round trip, digest."""

from __future__ import annotations

import pytest
import torch

from blackbox_rs.errors import ConfigError, InvalidInputError
from blackbox_rs.modules import LowResDenoiser, create_module, list_modules, load_module

SHAPE = (3, 32, 32)


def _make(**kw: object) -> LowResDenoiser:
    torch.manual_seed(0)
    m = create_module("lowres", input_shape=SHAPE, **{"factor": 4, "depth": 3, "width": 8, **kw})
    assert isinstance(m, LowResDenoiser)
    return m


def _perturb(m: LowResDenoiser, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    theta = m.flat_parameters()
    m.set_flat_parameters(theta + 0.1 * torch.randn(theta.shape, generator=g))


def test_registered() -> None:
    assert "lowres" in list_modules()


@pytest.mark.parametrize("output", ["gated", "residual"])
def test_identity_at_init_and_shapes(output: str) -> None:
    m = _make(output=output).eval()
    x = torch.rand(5, *SHAPE) * 1.6 - 0.3  # noisy inputs lie outside [0, 1]
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x)
    _perturb(m)
    y = m(x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_works_at_reduced_resolution() -> None:
    """The convolutions see (H/f) x (W/f): the head's output is 8 x 8 for 32 x 32 inputs, factor 4."""
    m = _make()
    seen: list[tuple[int, ...]] = []
    m.net.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    m(torch.rand(2, *SHAPE))
    assert seen == [(2, 8, 8, 8)]


def test_gated_output_can_remove_pixel_noise() -> None:
    """With the gate at 1 and no residual the output is the upsampled area average: pixel noise
    averages out (what makes the gated form a denoiser), while the residual form keeps it."""
    g = torch.Generator().manual_seed(0)
    clean = torch.full((1, *SHAPE), 0.5)
    noisy = clean + 0.25 * torch.randn(clean.shape, generator=g)
    gated = _make()
    with torch.no_grad():
        gated.net.tail.bias[3:] = 1.0  # gate channels
    with torch.no_grad():
        err_gated = float((gated(noisy) - clean).pow(2).mean())
    err_noisy = float((noisy - clean).pow(2).mean())
    assert err_gated < err_noisy / 8
    residual = _make(output="residual")
    assert torch.equal(residual(noisy), noisy)


def test_per_sample() -> None:
    m = _make()
    _perturb(m)
    x = torch.rand(4, *SHAPE)
    together = m(x)
    alone = torch.cat([m(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_factor_must_divide_h_and_w() -> None:
    with pytest.raises(ConfigError, match=r"factor.*must divide H and W.*\(3, 30, 32\)"):
        create_module("lowres", input_shape=(3, 30, 32), factor=4)
    with pytest.raises(ConfigError, match="kernel_size"):
        create_module("lowres", input_shape=SHAPE, kernel_size=4)
    with pytest.raises(ConfigError, match="output"):
        create_module("lowres", input_shape=SHAPE, output="sharpen")
    m = _make()  # spatially flexible, but only at multiples of the factor
    assert m(torch.rand(1, 3, 16, 24)).shape == (1, 3, 16, 24)
    with pytest.raises(InvalidInputError, match="factor=4"):
        m(torch.rand(1, 3, 18, 24))


def test_save_load_round_trip(tmp_path) -> None:
    m = _make()
    _perturb(m)
    d = m.save(tmp_path / "mod")
    assert sorted(p.name for p in d.iterdir()) == ["module.safetensors", "module_config.json"]
    back = load_module(d)
    assert isinstance(back, LowResDenoiser)
    assert back.config == m.config
    assert back.digest() == m.digest()
    x = torch.rand(3, *SHAPE)
    assert torch.equal(back(x), m.eval()(x))


def test_digest_changes_with_settings_and_weights() -> None:
    base = _make()
    digests = {base.digest()}
    for kw in ({"factor": 2}, {"width": 4}, {"depth": 4}, {"output": "residual"}, {"kernel_size": 5}):
        digests.add(_make(**kw).digest())
    assert len(digests) == 6
    assert _make().digest() == base.digest()  # same settings, same init: same digest
    _perturb(base)
    assert base.digest() not in digests
