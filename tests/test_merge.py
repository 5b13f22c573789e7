"""runtime/merge.py: the one log-sum-exp merge, as a kernel over splits (decode) and as a torch merge of
two parts (context parallelism), against the softmax of the parts' union computed in float64."""

from __future__ import annotations

import torch
from attnc.runtime.merge import merge_lse, merge_pair


def _part(scores, values):
    """(o, lse) of one part of the keys; a part with no key (all -inf) gives o = 0 and lse = -inf."""
    lse = torch.logsumexp(scores, -1)
    weights = torch.where(torch.isfinite(lse)[..., None], torch.exp(scores - lse[..., None].clamp(min=-1e30)), 0.0)
    return weights @ values, lse


def test_merges_equal_the_softmax_of_the_union():
    torch.manual_seed(0)
    rows, keys, dv = 6, 12, 5
    scores = torch.randn(rows, keys, dtype=torch.float64)
    scores[1, 4:] = float("-inf")  # the second part sees no key of row 1
    scores[2] = float("-inf")  # no part sees a key of row 2
    values = torch.randn(keys, dv, dtype=torch.float64)
    o_a, lse_a = _part(scores[:, :4], values[:4])
    o_b, lse_b = _part(scores[:, 4:], values[4:])
    full_lse = torch.logsumexp(scores, -1)
    full_o = torch.nan_to_num(torch.softmax(scores, -1)) @ values

    o, lse = merge_pair(*merge_pair(None, None, o_a, lse_a), o_b, lse_b)
    torch.testing.assert_close(o.double(), full_o)
    torch.testing.assert_close(lse, full_lse)
    assert lse[2] == float("-inf") and bool((o[2] == 0).all())

    o_k, lse_k = merge_lse(torch.stack([o_a, o_b]).float().contiguous(), torch.stack([lse_a, lse_b]).float().contiguous(),
                           torch.float32)
    torch.testing.assert_close(o_k.double(), full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_k.double(), full_lse, atol=1e-5, rtol=1e-5)
