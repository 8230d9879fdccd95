"""Parsing of `threshold` and `must_do` / `must_skip` (liteattn_ops.core.params), as the module API
uses it: every case of issue 14 items 9 and 10, and what is accepted."""

import math

import numpy as np
import pytest
import torch

from liteattn_ops import LiteAttention
from liteattn_ops.core.params import ranges_tensor, threshold_values


@pytest.mark.parametrize("value,expected", [
    (-3, [-3.0]),
    (-2.5, [-2.5]),
    (0, [0.0]),
    (float("-inf"), [-math.inf]),
    (np.float32(-3), [-3.0]),
    (np.int64(-2), [-2.0]),
    ([-1, -2.5, float("-inf")], [-1.0, -2.5, -math.inf]),
    ((-1.0, 0.0), [-1.0, 0.0]),
    ([np.float32(-1), torch.tensor(-2.0)], [-1.0, -2.0]),
    (torch.tensor(-4.0), [-4.0]),
    (torch.tensor([-1.0, -2.0], dtype=torch.float64), [-1.0, -2.0]),
    (np.array([-1.0, -6.0]), [-1.0, -6.0]),
])
def test_threshold_accepted(value, expected):
    assert threshold_values(value) == expected


@pytest.mark.parametrize("value,error,match", [
    (None, TypeError, r"threshold must be a number <= 0 .* got NoneType"),
    ("abc", TypeError, "threshold must be a number.*got str 'abc'"),
    ("-5", TypeError, "got str '-5'"),
    ("0", TypeError, "got str '0'"),
    ([[-1, -2]], TypeError, r"threshold must be .*element 0 is list \[-1, -2\], not a number"),
    ([-1, "x"], TypeError, "element 1 is str"),
    (True, TypeError, "got bool"),
    (-torch.ones(2, 2), ValueError, r"got a tensor of shape \(2, 2\)"),
    (np.ones((1, 2)) * -1, ValueError, r"shape \(1, 2\)"),
    (torch.tensor([True]), TypeError, "dtype torch.bool"),
    (float("nan"), ValueError, "threshold must be <= 0 in log2 units .* got nan"),
    ([-1.0, float("nan")], ValueError, r"got nan \(head 1\)"),
    (0.5, ValueError, "threshold must be <= 0 .* got 0.5"),
    (torch.tensor([-1.0, 2.0]), ValueError, r"got 2.0 \(head 1\)"),
    ([], ValueError, "got an empty sequence"),
    (torch.empty(0), ValueError, "empty"),
    ({"a": 1}, TypeError, "got dict"),
])
def test_threshold_rejected(value, error, match):
    with pytest.raises(error, match=match):
        threshold_values(value)
    with pytest.raises(error, match=match):
        LiteAttention(threshold=value)


@pytest.mark.parametrize("value,expected", [
    (None, None),
    ([], None),
    (torch.empty(0, 2, dtype=torch.int64), None),
    ([(0, 10)], [[0, 10]]),
    ([(0.0, 10.0)], [[0, 10]]),                      # integral floats are token indices
    ([[0, 10], [20, 30]], [[0, 10], [20, 30]]),
    (torch.tensor([[5, 7]]), [[5, 7]]),
    (torch.tensor([[5.0, 7.0]]), [[5, 7]]),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
    ([torch.tensor([1, 2])], [[1, 2]]),
])
def test_ranges_accepted(value, expected):
    got = ranges_tensor("must_do", value)
    if expected is None:
        assert got is None
    else:
        assert got.dtype == torch.int32 and got.tolist() == expected


@pytest.mark.parametrize("value,error,match", [
    ([(0.5, 10)], ValueError, r"must_do bounds are token indices and must be integers, got \[\[0.5, 10.0\]\]"),
    (torch.tensor([[0.5, 10.0]]), ValueError, "must be integers"),
    ([(0, float("inf"))], ValueError, "must be integers"),
    ("0:512", TypeError, r"must_do must be a list of \(start, end\) integer pairs .* got str '0:512'"),
    (["0:512"], TypeError, "element 0 is str"),
    ([("a", 2)], TypeError, "element 0 holds str 'a', not a number"),
    ([(True, 2)], TypeError, "holds bool"),
    (5, TypeError, "got int 5"),
    ([0, 512], TypeError, "element 0 is int 0"),                 # a flat pair is not a list of pairs
    ((np.int64(3), np.int32(9)), TypeError, "element 0 is int64"),
    ([(1,)], ValueError, r"element 0 has 1 values"),
    ([(1, 2, 3)], ValueError, r"element 0 has 3 values"),
    (torch.zeros(2, 3, dtype=torch.int64), ValueError, r"got shape \(2, 3\)"),
    (torch.zeros(2, 2, 2, dtype=torch.int64), ValueError, r"got shape \(2, 2, 2\)"),
    (torch.tensor([[True, False]]), TypeError, "dtype torch.bool"),
    ([(5, 3)], ValueError, r"must_do ranges must satisfy 0 <= start < end, got \[\[5, 3\]\]"),
    ([(-1, 3)], ValueError, "0 <= start < end"),
    ([(4, 4)], ValueError, "0 <= start < end"),
    ([(0, 2**31)], ValueError, "below 2\\*\\*31"),
])
def test_ranges_rejected(value, error, match):
    with pytest.raises(error, match=match):
        ranges_tensor("must_do", value)
    with pytest.raises(error, match=match.replace("must_do", "must_skip")):
        LiteAttention(must_skip=value)


def test_failed_threshold_assignment_keeps_the_old_value():
    attn = LiteAttention(threshold=-4.0)
    attn(*(torch.randn(1, 2, 130, 64) for _ in range(3)))
    for bad in (None, "abc", [[-1, -2]], float("nan"), -torch.ones(2, 2)):
        with pytest.raises((TypeError, ValueError), match="threshold"):
            attn.threshold = bad
        assert attn.threshold == [-4.0]
        assert attn.threshold_per_head.tolist() == [-4.0, -4.0]
    attn.threshold = np.float32(-2)
    assert attn.threshold == [-2.0] and attn.threshold_per_head.tolist() == [-2.0, -2.0]
