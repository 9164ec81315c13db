"""transformers' 2-bit packing (bitnet_train.export.packing): round trips, the bit order checked
against transformers' own pack/unpack and its documented example, and the refusals."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet_train.errors import ExportError
from bitnet_train.export.hf import check_hf_packable
from bitnet_train.export.packing import pack_ternary, packed_rows, unpack_ternary

# odd and even shapes, out not divisible by 4, a single row, a 1-D vector
SHAPES = [(4, 3), (8, 5), (5, 7), (6, 6), (7, 1), (1, 1), (13, 17), (64, 64), (160, 64), (9,)]


def random_ternary(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=gen).to(torch.int8)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape):
    codes = random_ternary(shape)
    before = codes.clone()
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (-(-shape[0] // 4), *shape[1:])
    assert torch.equal(codes, before)  # unlike transformers' pack_weights, input untouched
    assert torch.equal(unpack_ternary(packed, shape[0]), codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_equal_transformers_pack_weights(shape):
    codes = random_ternary(shape, seed=1)
    theirs = pack_weights(codes.clone().long())  # adds 1 to its argument in place
    assert torch.equal(pack_ternary(codes), theirs)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] % 4 == 0])
def test_transformers_unpacks_our_bytes(shape):
    codes = random_ternary(shape, seed=2)
    with torch.compiler.set_stance("force_eager"):  # same function, without a 20 s CPU compile
        theirs = unpack_weights(pack_ternary(codes), dtype=torch.float32)
    assert torch.equal(theirs, codes.float())


def test_documented_example_and_bit_order():
    # The example in transformers' unpack_weights docstring (bits 2i..2i+1 hold row i*R + r).
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor([[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1],
                             [1, -1]], dtype=torch.int8)
    assert torch.equal(unpack_ternary(packed, 8), expected)
    assert torch.equal(pack_ternary(expected), packed)
    # by hand: out = 5 -> R = 2; rows 0..4 go to (r, shift) = (0,0) (1,0) (0,2) (1,2) (0,4)
    codes = torch.tensor([[1], [0], [-1], [1], [0]], dtype=torch.int8)
    assert pack_ternary(codes).flatten().tolist() == [
        (2 << 0) | (0 << 2) | (1 << 4),  # rows 0, 2, 4 (codes t + 1 = 2, 0, 1)
        (1 << 0) | (2 << 2),  # rows 1, 3; row 5 is padding (0b00)
    ]


def test_padding_rows_read_as_minus_one_in_transformers():
    codes = torch.ones(5, 2, dtype=torch.int8)
    with torch.compiler.set_stance("force_eager"):
        theirs = unpack_weights(pack_ternary(codes), dtype=torch.float32)
    assert theirs.shape == (8, 2)  # 4 * ceil(5 / 4): transformers cannot tell padding apart
    assert torch.equal(theirs[5:], -torch.ones(3, 2))
    assert torch.equal(unpack_ternary(pack_ternary(codes), 5), codes)  # ours drops it


@pytest.mark.parametrize("bad", [
    torch.tensor([[2, 0]], dtype=torch.int8),
    torch.tensor([[-2, 0]], dtype=torch.int8),
    torch.tensor([[0.0, 1.0]]),
    torch.zeros(0, 3, dtype=torch.int8),
])
def test_pack_refuses_non_ternary(bad):
    with pytest.raises(ExportError):
        pack_ternary(bad, name="layer.q_proj.weight")


def test_unpack_refuses_wrong_rows_dtype_and_code():
    packed = pack_ternary(random_ternary((8, 3)))
    assert packed_rows(8) == 2 and packed_rows(9) == 3
    with pytest.raises(ExportError, match="cannot hold 9 rows"):
        unpack_ternary(packed, 9)
    with pytest.raises(ExportError, match="cannot hold 4 rows"):
        unpack_ternary(packed, 4)
    with pytest.raises(ExportError, match="uint8"):
        unpack_ternary(packed.to(torch.int16), 8)
    with pytest.raises(ExportError, match="0b11"):
        unpack_ternary(torch.full((1, 1), 0b11, dtype=torch.uint8), 4)


def test_hf_refuses_rows_not_divisible_by_four():
    check_hf_packable("model.layers.0.mlp.gate_proj.weight", 160)
    with pytest.raises(ExportError, match="gate_proj.*162 output rows"):
        check_hf_packable("model.layers.0.mlp.gate_proj.weight", 162)
