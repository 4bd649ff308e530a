"""Input statistics: the statistics of a transformed input follow exactly from the original's."""

from __future__ import annotations

import torch

from bitsmith.calibration import InputChange, InputStats


def _stats(chunks):
    s = InputStats(chunks[0].shape[-1])
    for c in chunks:
        s.add(c)
    return s


def test_hessian_and_ranges_match_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 7, 12, generator=gen) * torch.linspace(0.1, 5, 12) for _ in range(3)]
    s = _stats(chunks)
    x = torch.cat([c.reshape(-1, 12) for c in chunks]).double()
    torch.testing.assert_close(s.value().double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.absmax().double(), x.abs().amax(0), rtol=0, atol=0)
    torch.testing.assert_close(s.mean().double(), x.mean(0), rtol=1e-6, atol=1e-6)


def test_changed_statistics_equal_those_of_the_changed_data():
    gen = torch.Generator().manual_seed(1)
    chunks = [torch.randn(40, 10, generator=gen) + torch.arange(10.0) for _ in range(2)]
    change = InputChange(shift=torch.randn(10, generator=gen), scale=torch.rand(10, generator=gen) + 0.5)
    direct = _stats([change.apply(c) for c in chunks])
    derived = _stats(chunks).changed(change)
    torch.testing.assert_close(derived.value(), direct.value(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived.max, direct.max, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived.min, direct.min, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(derived.mean(), direct.mean(), rtol=1e-5, atol=1e-5)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen))
    rotated = InputChange(scale=change.scale, matrix=q)
    torch.testing.assert_close(_stats(chunks).changed(rotated).value(), _stats([rotated.apply(c) for c in chunks]).value(),
                               rtol=1e-4, atol=1e-4)
