"""Cached constant tensors stay usable by autograd after their first build in inference mode."""

import torch

from bitsmith.formats import minifloat
from bitsmith.tensor_cache import tensor_cache
from bitsmith.transforms.hadamard import hadamard_transform


def test_builder_runs_outside_inference_mode():
    @tensor_cache()
    def table(n):
        return torch.arange(float(n))

    with torch.inference_mode():
        first = table(4)
    assert not first.is_inference()
    assert table(4) is first  # memoized


def test_hadamard_trains_after_an_inference_mode_call():
    n = 3 * 12 * 16  # a Paley core and a power-of-two part, a size no other test built first
    with torch.inference_mode():
        hadamard_transform(torch.randn(2, n))
    x = torch.randn(2, n, requires_grad=True)
    hadamard_transform(x).pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-4)  # orthogonal: d|Hx|^2/dx = 2x


def test_format_tables_not_inference_tensors():
    fmt = minifloat.minifloat("e2m1")
    minifloat._code_table.cache_clear()
    with torch.inference_mode():
        table = minifloat._code_table(fmt)
    assert not table.is_inference()
