"""Golden IR dumps (`attnc ir`) for representative specs. ATTNC_UPDATE_GOLDEN=1 rewrites tests/golden/*.txt;
read the diff before committing it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from attnc.analysis.rowstats import plan_rows
from attnc.irdump import dump
from attnc.pipeline import analyse, compile_text

GOLDEN = Path(__file__).parent / "golden"

SPECS = {
    "causal": """\
attention causal
mask kv <= q
""",
    "sliding_window": """\
attention sliding_window
param window = 256
mask kv <= q and q - kv < window
""",
    "document": """\
attention document
input doc_ids: int[B, L]
mask doc_ids[b, q] == doc_ids[b, kv] and kv <= q
""",
    "alibi": """\
attention alibi
input slopes: float[Hq] learnable
mask kv <= q
score s - slopes[h] * (q - kv)
""",
    "neighborhood_2d": """\
attention neighborhood_2d
const Y = 16, X = 16, KY = 7, KX = 7
let (qy, qx) = unravel(q, Y, X)
let (ky, kx) = unravel(kv, Y, X)
let cy = clamp(qy, KY // 2, Y - 1 - KY // 2)
let cx = clamp(qx, KX // 2, X - 1 - KX // 2)
mask abs(cy - ky) <= KY // 2 and abs(cx - kx) <= KX // 2
probs softmax(score)
""",
    "softplus_reweight": """\
attention softplus_reweight
param p = 3.0, tau = 1.0
mask kv <= q
let A = softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))
let R = relu(visible * A - tau) ** p
probs R / rowsum(R) if rowsum(R) > 0 else A
""",
    "sink_softmax1": """\
attention sink_softmax1
mask kv <= q
probs exp(score) / (1 + rowsum(exp(score)))
""",
}


def _dump(name: str) -> str:
    return dump(analyse(compile_text(SPECS[name], f"{name}.attn")))


@pytest.mark.parametrize("name", list(SPECS))
def test_golden_ir(name):
    got = _dump(name)
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("ATTNC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"no golden file {path}; run with ATTNC_UPDATE_GOLDEN=1"
    assert got == path.read_text(), f"IR dump of {name} changed; if intended, run with ATTNC_UPDATE_GOLDEN=1"


# ---- the facts the goldens encode, asserted directly so a regenerated golden cannot hide a regression ----
@pytest.mark.parametrize("name,passes", [("causal", 1), ("sliding_window", 1), ("document", 1), ("alibi", 1),
                                         ("neighborhood_2d", 1), ("softplus_reweight", 2), ("sink_softmax1", 1)])
def test_pass_counts(name, passes):
    assert plan_rows(compile_text(SPECS[name])).passes == passes


@pytest.mark.parametrize("name,sink", [("causal", None), ("sliding_window", None), ("document", None),
                                       ("alibi", None), ("neighborhood_2d", None), ("sink_softmax1", 0)])
def test_softmax_recognised(name, sink):
    rows = plan_rows(compile_text(SPECS[name]))
    assert rows.softmax is not None
    assert (rows.softmax.sink is None) if sink is None else (rows.softmax.sink == sink)


def test_softplus_reweight_is_not_a_softmax():
    assert plan_rows(compile_text(SPECS["softplus_reweight"])).softmax is None


@pytest.mark.parametrize("name,visible", [
    ("causal", "visible    1 + min(q, -1 + Lk)"),
    ("sliding_window", "visible    max(0, 1 - max(0, 1 + q - window) + min(q, -1 + Lk))"),
    ("softplus_reweight", "closed form visible = 1 + min(q, -1 + Lk)"),
])
def test_visible_in_closed_form(name, visible):
    assert visible in _dump(name)


def test_document_needs_equal_lengths_and_counts_visible_nowhere():
    text = _dump("document")
    assert "(Lq == Lk required)" in text
    assert "input      doc_ids: int[B, L]" in text
    assert "visible" not in text.split("row stats")[1]  # softmax does not need it, so none is printed


def test_alibi_learnable_and_score():
    text = _dump("alibi")
    assert "input      slopes: float[Hq]  learnable" in text
    assert "softmax(logits = s - (q - kv)*slopes[h])" in text


def test_neighborhood_layouts():
    text = _dump("neighborhood_2d")
    assert "layout     q -> (qy, qx) over 16 x 16: qy = (q // 16), qx = (q % 16)" in text
    assert "layout     kv -> (ky, kx) over 16 x 16: ky = (kv // 16), kx = (kv % 16)" in text
    assert "mask       (abs(-min(12, max(3, (q // 16))) + (kv // 16)) <= 3) and " in text


def test_softplus_reweight_passes_and_output():
    text = _dump("softplus_reweight")
    assert "  pass 1      r1 = rowsum(softplus(s*log(visible)))" in text
    assert "  pass 2      r2 = rowsum(relu(-tau + visible*softplus(s*log(visible))/r1)**p)" in text
    assert "output     pass 2: " in text
    assert "lse        none (not a softmax)" in text


def test_sink_softmax1_lse_includes_sink():
    text = _dump("sink_softmax1")
    assert "softmax(logits = s, sink = 0)" in text
    assert "denominator includes the sink" in text


def test_backward_plan_of_l1_normalization_needs_no_pass():
    """softplus: dP/dr1 = -P / r1, so the adjoint comes from delta = rowsum(dO * O) alone."""
    text = dump(analyse(compile_text("attention softplus\nmask kv <= q\n"
                                     "probs softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))\n")))
    assert "  adjoint     rbar1 = -delta/r1" in text
    assert "row pass" not in text
    assert "kernels    row adjoints (from delta = rowsum(dO * O), no pass), dQ, dK/dV" in text


def test_backward_plan_of_reweighting_has_one_row_pass():
    text = _dump("softplus_reweight")
    assert "  adjoint     rbar2 = delta*(-1/r2 if r2 > 0 else 0)" in text  # proportional: no pass for r2
    assert "  row pass    a1 = sum_kv dp * dP/dr1" in text  # R depends on r1 otherwise than as a factor
    assert "  row pass    b2_1 = sum_kv dg2/dr1" in text
    assert "kernels    row adjoints (1 pass over the keys), dQ, dK/dV" in text
