import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.formats import fp6_split
from bitsmith.formats.minifloat import FP6_E3M2


@pytest.mark.parametrize("shape", [(4,), (3, 8), (2, 5, 64), (7, 1024)])
def test_round_trip_random_codes(shape):
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(0, 64, shape, generator=g).to(torch.uint8)
    high, low = fp6_split.split_pack(codes)
    assert high.dtype == low.dtype == torch.uint8
    assert high.shape == (*shape[:-1], shape[-1] // 2) and low.shape == (*shape[:-1], shape[-1] // 4)
    assert (high.numel() + low.numel()) * 8 == codes.numel() * 6  # exactly 6 bits per code
    assert torch.equal(fp6_split.split_unpack(high, low, codes.shape), codes)


def test_all_64_codes_and_layout():
    codes = torch.arange(64, dtype=torch.uint8)
    high, low = fp6_split.split_pack(codes)
    assert torch.equal(fp6_split.split_unpack(high, low, (64,)), codes)
    # every plane entry sits inside one byte: high nibbles and low bit pairs, first code lowest
    for i in range(64):
        assert (int(high[i // 2]) >> (4 * (i % 2))) & 0xF == i >> 2
        assert (int(low[i // 4]) >> (2 * (i % 4))) & 3 == i & 3
    c = torch.tensor([0b101101, 0b000011, 0b111100, 0b010110], dtype=torch.uint8)
    high, low = fp6_split.split_pack(c)
    assert high.tolist() == [0b0000_1011, 0b0101_1111] and low.tolist() == [0b10_00_11_01]


def test_dequantization_matches_plain_fp6_decode():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=g) * 5
    codes = FP6_E3M2.encode(x)
    assert int(codes.max()) < 64
    unpacked = fp6_split.split_unpack(*fp6_split.split_pack(codes), codes.shape)
    assert torch.equal(FP6_E3M2.decode(unpacked), FP6_E3M2.decode(codes))
    assert torch.equal(FP6_E3M2.decode(unpacked), FP6_E3M2.round(x))


def test_errors():
    with pytest.raises(SpecError, match="divisible by 4"):
        fp6_split.split_pack(torch.zeros(2, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out of range"):
        fp6_split.split_pack(torch.tensor([64, 0, 0, 0], dtype=torch.uint8))
    high, low = fp6_split.split_pack(torch.zeros(2, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not hold"):
        fp6_split.split_unpack(high, low, (2, 12))
    with pytest.raises(ValueError):
        fp6_split.split_unpack(high, low, (4, 2))  # same size, but 2 is not divisible by 4
