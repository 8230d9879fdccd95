import math

import pytest
import torch
from expecttest import assert_expected_inline

import liteattn_ops
from liteattn_ops.core.state import (live_fraction, live_mask, new_state, pack_bits, reset_state, state_shape,
                                unpack_bits)


def test_tile_shape_table():
    for head_dim in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            bm, bn = liteattn_ops.tile_shape(head_dim, dtype)
            assert bm % 64 == 0 and bn % 16 == 0
    assert liteattn_ops.tile_shape(64, torch.float32) == liteattn_ops.tile_shape(64, torch.bfloat16)
    assert liteattn_ops.supported_head_dims() == (64, 128)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        liteattn_ops.tile_shape(80, torch.bfloat16)
    with pytest.raises(TypeError, match="dtype must be"):
        liteattn_ops.tile_shape(64, torch.int8)


def test_tile_shape_matches_the_compiled_kernel():
    if not liteattn_ops.is_available():
        pytest.skip("the CUDA kernel is not built")
    from liteattn_ops import _C

    for head_dim in (64, 128):
        for dtype in (torch.bfloat16, torch.float16):
            name = str(dtype).removeprefix("torch.")
            assert tuple(_C.tile_shape(head_dim, name)) == liteattn_ops.tile_shape(head_dim, dtype)


def test_format():
    # 32760 tokens, 12 heads, head dim 128 (Wan2.1-1.3B at 480p): 128 x 176 tiles, 256 x 187 of them, 6 words a row.
    assert state_shape(1, 12, 32760, 32760, 128, torch.bfloat16) == (1, 12, 256, 6)
    s = new_state(2, 3, 129, 5633, 128, torch.bfloat16)     # 128 x 176 tiles: 2 query tiles, 33 key tiles
    assert s.dtype == torch.int32 and s.shape == (2, 3, 2, 2) and s.is_contiguous()
    bm, bn = liteattn_ops.tile_shape(64, torch.bfloat16)
    assert new_state(1, 1, 1000, 1000, 64, torch.bfloat16).shape == (1, 1, -(-1000 // bm), 1)
    assert bool((s == -1).all())


@pytest.mark.parametrize("nbits", [1, 31, 32, 33, 64, 100])
def test_pack_unpack_roundtrip(nbits):
    mask = torch.rand(3, 5, nbits, generator=torch.Generator().manual_seed(nbits)) < 0.5
    words = pack_bits(mask)
    assert words.dtype == torch.int32 and words.shape[-1] == math.ceil(nbits / 32)
    assert torch.equal(unpack_bits(words, nbits), mask)


def test_reset_is_in_place():
    s = new_state(1, 2, 300, 300, 64, torch.float32)
    s.zero_()
    ptr = s.data_ptr()
    assert reset_state(s) is s and s.data_ptr() == ptr and bool((s == -1).all())


def test_live_mask_and_fraction():
    mask = torch.zeros(1, 2, 3, 40, dtype=torch.bool)
    mask[0, 0, :, :10] = True           # head 0: 25 % live
    mask[0, 1] = True                   # head 1: all live
    s = pack_bits(mask)
    seqlen_k = 40 * 128 - 5              # the last tile is partial
    assert torch.equal(live_mask(s, seqlen_k, 64, torch.bfloat16), mask)
    assert float(live_fraction(s, seqlen_k, 64, torch.bfloat16)) == pytest.approx(0.625)
    assert live_fraction(s, seqlen_k, 64, torch.bfloat16, per_head=True).tolist() == [0.25, 1.0]


def test_state_summary():
    """A printed state: one line per (b, h, query tile), '#' live and '.' removed tiles."""
    mask = torch.eye(5, dtype=torch.bool).repeat(1, 1, 1, 1) | torch.eye(5, dtype=torch.bool).roll(1, 1)
    s = pack_bits(mask)
    rows = ["".join("#" if x else "." for x in row) for row in live_mask(s, 5 * 128, 64, torch.bfloat16)[0, 0].tolist()]
    assert_expected_inline("\n".join(rows), """\
##...
.##..
..##.
...##
#...#""")


def test_check_state_errors():
    q = torch.randn(1, 2, 200, 64)
    good = new_state(1, 2, 200, 200, 64, torch.float32)
    liteattn_ops.core.state.check_state(good, q, q)
    with pytest.raises(ValueError, match="does not match this call"):
        liteattn_ops.core.state.check_state(new_state(1, 2, 200, 5000, 64, torch.float32), q, q)
    with pytest.raises(ValueError, match="does not match this call"):
        liteattn_ops.core.state.check_state(new_state(1, 2, 200, 200, 64, torch.float32), q, torch.randn(1, 2, 4200, 64))
    with pytest.raises(ValueError, match="contiguous"):
        liteattn_ops.core.state.check_state(torch.full((1, 2, 2, 2), -1, dtype=torch.int32)[..., :1], q, q)
    with pytest.raises(TypeError, match="torch.Tensor"):
        liteattn_ops.core.state.check_state([1, 2], q, q)


def test_documented_bit_layout():
    """Bit n % 32 of word n // 32 is tile n (README, The skip state): pinned to literal words, so
    reversing the layout in both pack and unpack (which a round trip cannot see) fails here."""
    def one_tile(n, nbits=64):
        mask = torch.zeros(nbits, dtype=torch.bool)
        mask[n] = True
        return pack_bits(mask, fill=False).tolist()

    assert one_tile(0) == [1, 0]
    assert one_tile(1) == [2, 0]
    assert one_tile(31) == [-2**31, 0]          # the sign bit of word 0
    assert one_tile(32) == [0, 1]
    assert one_tile(37) == [0, 1 << 5]
    assert unpack_bits(torch.tensor([0b1011], dtype=torch.int32), 5).tolist() == [True, True, False, True, False]
    assert unpack_bits(torch.tensor([0, -2**31], dtype=torch.int32), 64).nonzero().flatten().tolist() == [63]
    # padding bits past N take the fill value
    assert pack_bits(torch.ones(3, dtype=torch.bool), fill=False).tolist() == [0b111]
    assert pack_bits(torch.zeros(3, dtype=torch.bool), fill=True).tolist() == [-8]


def test_live_mask_checks_its_arguments_against_the_state():
    s = new_state(1, 2, 256, 256, 64, torch.float32)                   # 2 key tiles: 1 word
    assert live_mask(s, 256, 64, torch.float32).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"seqlen_k=100000 .* needs 25 words per row, but the state has 1"):
        live_mask(s, 100000, 64, torch.float32)
    with pytest.raises(ValueError, match="seqlen_k=0"):
        live_mask(s, 0, 64, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        live_mask(s, 256, 80, torch.float32)
    with pytest.raises(TypeError, match="dtype must be"):
        live_mask(s, 256, 64, "float32")
    with pytest.raises(TypeError, match="seqlen_k must be an int"):
        live_mask(s, 256.0, 64, torch.float32)
    with pytest.raises(TypeError, match="int32"):
        live_mask(s.long(), 256, 64, torch.float32)
    with pytest.raises(TypeError, match="state must be an int32 tensor"):
        live_mask([[-1]], 256, 64, torch.float32)
    with pytest.raises(ValueError, match="needs 25 words"):
        live_fraction(s, 100000, 64, torch.float32)
