"""Tier-2 kernels (Triton, through the interpreter on the CPU) against the hand-written formulas.

Every tier-2 catalog entry (structured sparsity over 1-D/2-D/3-D token grids) is compiled from
examples/<name>.attn and run through the kernels, forward (o and lse) and backward (dq, dk, dv),
against tests/formulas.py evaluated in float64, fp32 inputs. Tolerances (design.md), as
max|got - ref| / max|ref|: 2e-3 forward, 5e-3 backward; NaN never passes.

The interpreter is slow, so most cases compile *test variants* of the example specs: the example's
text with its `const` values substituted (same attention, smaller grids, e.g. 5 x 7 = 35 tokens:
a multiple of neither the interpreter's 16-token kernel tile nor its 32-token plan tile), and the
formulas get the same constants. Head dims are not powers of two (Dqk = 24, Dv = 20) and several
cases read one key/value head from two query heads (GQA). These masks are not bands, so the kernels
walk per-query-tile lists of FULL/PARTIAL key tiles (tile plans); each case also checks that the plan
it ran with is exact against the formula's mask (EMPTY tiles all False, FULL tiles all True), and
says which tile classes it exercises.

The neighborhood entries also get NATTEN's border rule checked on the element mask (`fn.mask`): every
query sees exactly min(K, L') keys per axis (windows shift at the borders, never shrink), as a
contiguous run in reduced (dilated) coordinates, and the mask equals the formulas' mask builders.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import atexit  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import attnc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formulas as F  # noqa: E402
from compare import check_close  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FWD_TOL, BWD_TOL = 2e-3, 5e-3  # fp32 inputs
KERNEL_TILE = 16  # the interpreter's kernel tile (launch.kernel_configs); plan tiles are 32

_SPEC_DIR = Path(tempfile.mkdtemp(prefix="attnc-tier2-specs-"))
atexit.register(shutil.rmtree, _SPEC_DIR, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Test variants of the example specs: the same text with other `const` values
# ----------------------------------------------------------------------------------------------
def _const_defaults(text, kind="const"):
    """{name: int} of the spec's `const` (or `param`) line(s)."""
    out = {}
    for line in re.findall(rf"^{kind}\s+(.*)$", text, flags=re.M):
        for n, v in re.findall(r"(\w+)\s*=\s*(-?\d+)", line.split("#")[0]):
            out[n] = int(v)
    return out


@lru_cache(maxsize=None)
def load(name, consts=()):
    """attnc.load of examples/<name>.attn, with `consts` ((name, value), ...) substituted."""
    path = EXAMPLES / f"{name}.attn"
    if not consts:
        return attnc.load(path)
    text = path.read_text()
    for n, v in consts:
        pattern = rf"^(const\b.*?\b{n}\s*=\s*)-?\d+"
        text, count = re.subn(pattern, rf"\g<1>{v}", text, count=1, flags=re.M)
        assert count == 1, f"examples/{name}.attn has no const {n}"
    assert _const_defaults(text) == dict(_const_defaults(path.read_text()), **dict(consts))
    folder = _SPEC_DIR / "_".join(f"{n}{v}" for n, v in consts)
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.attn").write_text(text)
    return attnc.load(folder / f"{name}.attn")


def example_consts(name):
    return _const_defaults((EXAMPLES / f"{name}.attn").read_text())


def example_params(name):
    """The defaults of the spec's runtime parameters (`param`)."""
    return _const_defaults((EXAMPLES / f"{name}.attn").read_text(), "param")


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    consts: dict = field(default_factory=dict)   # substituted into the spec (and given to F)
    params: dict = field(default_factory=dict)   # runtime parameters (kwargs of fn and F)
    L: int = 0                                   # 0: the grid's product of extents
    heads: tuple = (2, 1, 1)                     # Hq, Hk, Hv
    dims: tuple = (24, 20)                       # Dqk, Dv
    B: int = 1
    scale: float = None                          # None: 1 / sqrt(Dqk)
    # tile classes (of the 32-token plan) the case must exercise: "empty", "partial", "full"
    classes: tuple = ("partial",)

    @property
    def all_consts(self):
        return dict(example_consts(self.name), **self.consts)

    @property
    def length(self):
        return self.L or token_count(self.name, self.all_consts)

    def fn(self):
        return load(self.name, tuple(sorted(self.consts.items())))


def token_count(name, c):
    if name == "neighborhood_3d_causal":
        return c["T"] * c["Y"] * c["X"]
    if name == "radial":
        return c["F"] * c["T"]
    if name == "clear":
        return c["n_text"] + c["Y"] * c["X"]
    return c["Y"] * c["X"]


def formula_kwargs(case):
    """The formula's keyword arguments for a case (the 1-D spec spells the stride `stride`)."""
    kw = {**case.all_consts, **example_params(case.name), **case.params}
    if case.name == "neighborhood_1d":
        kw["s"] = kw.pop("stride")
    return kw


def formula_mask(case):
    """[L, L] bool from the formulas' mask builders."""
    c, L = formula_kwargs(case), case.length
    n = case.name
    if n == "neighborhood_1d":
        return F.mask_neighborhood_axis(L, c["K"], c["d"], c["s"])
    if n == "neighborhood_2d":
        return F.mask_neighborhood((c["Y"], c["X"]), (c["KY"], c["KX"]))
    if n == "dilated_neighborhood_2d":
        return F.mask_neighborhood((c["Y"], c["X"]), (c["KY"], c["KX"]), (c["DY"], c["DX"]))
    if n == "neighborhood_3d_causal":
        return F.mask_neighborhood((c["T"], c["Y"], c["X"]), (c["KT"], c["KY"], c["KX"]), (1, 1, 1),
                                   (1, c["SY"], c["SX"]), (True, False, False))
    if n == "maxvit_block":
        return F.mask_maxvit_block(c["Y"], c["X"], c["P"])
    if n == "maxvit_grid":
        return F.mask_maxvit_grid(c["Y"], c["X"], c["G"])
    if n == "dilated_sliding_window":
        return F.mask_dilated_sliding_window(L, L, c["window"], c["dilation"])
    if n == "radial":
        return F.mask_radial(c["F"], c["T"])
    if n == "clear":
        return F.mask_clear(c["n_text"], c["Y"], c["X"], c["r"])
    raise KeyError(n)


KERNEL_CASES = {
    # at the example's own constants (1-D: the extent is the sequence; a band of key tiles)
    "neighborhood_1d-example": Case("neighborhood_1d", L=37, heads=(2, 2, 2), dims=(40, 40)),
    # dilation 3 (residue classes of 14 and 13 tokens), stride 2, an even kernel
    "neighborhood_1d-K4d3s2": Case("neighborhood_1d", {"K": 4, "d": 3, "stride": 2}, L=41),
    # 7 x 9 grid (63 tokens), odd x even kernel: borders on both axes
    "neighborhood_2d-7x9-K5x4": Case("neighborhood_2d", {"Y": 7, "X": 9, "KY": 5, "KX": 4}),
    # 12 x 12, 3 x 3 kernel: 144 tokens, far key tiles skipped
    "neighborhood_2d-12x12-K3": Case("neighborhood_2d", {"Y": 12, "X": 12, "KY": 3, "KX": 3},
                                     heads=(1, 1, 1), classes=("empty", "partial")),
    # 9 x 7 grid, dilation 2 x 3: residue classes of 5/4 rows and 3/2/2 columns
    "dilated_neighborhood_2d-9x7": Case("dilated_neighborhood_2d",
                                        {"Y": 9, "X": 7, "KY": 3, "KX": 2, "DY": 2, "DX": 3}),
    # 3 frames of 5 x 6, causal kernel 2 on time, 3 x 3 with stride 2 in space: 90 tokens
    "neighborhood_3d_causal-3x5x6": Case("neighborhood_3d_causal",
                                         {"T": 3, "Y": 5, "X": 6, "KT": 2, "SY": 2, "SX": 2},
                                         classes=("empty", "partial")),
    # the example's 16 x 16 grid of 4 x 4 windows (256 tokens), explicit scale
    "maxvit_block-example": Case("maxvit_block", heads=(2, 1, 1), dims=(24, 20), scale=0.3,
                                 classes=("empty", "partial")),
    # 5 x 7 grid with 2 x 2 windows: ragged windows on the last row and column
    "maxvit_block-5x7-P2": Case("maxvit_block", {"Y": 5, "X": 7, "P": 2}, B=2),
    # 5 x 7 grid, G = 2: cells of 2 x 3 (Y, X not multiples of G)
    "maxvit_grid-5x7-G2": Case("maxvit_grid", {"Y": 5, "X": 7, "G": 2}),
    # 8 x 8 grid, G = 2 (cells of 4 x 4), Dqk = 40, Dv = 24, Hk != Hv
    "maxvit_grid-8x8-G2": Case("maxvit_grid", {"Y": 8, "X": 8, "G": 2}, heads=(2, 2, 1),
                               dims=(40, 24)),
    "dilated_sliding_window-37-w9d3": Case("dilated_sliding_window", params={"window": 9, "dilation": 3},
                                           L=37),
    "dilated_sliding_window-100-w20d4": Case("dilated_sliding_window",
                                             params={"window": 20, "dilation": 4}, L=100,
                                             heads=(1, 1, 1), classes=("empty", "partial")),
    # 5 frames of 12 tokens: windows 12 (distance <= 1), 6 (2, 3), 3 (4); frame 0 a sink
    "radial-F5T12": Case("radial", {"F": 5, "T": 12}),
    # 4 frames of 16 tokens: plan tiles of 2 frames, the diagonal ones FULL
    "radial-F4T16": Case("radial", {"F": 4, "T": 16}, heads=(1, 1, 1), classes=("full", "partial")),
    # 5 text tokens, then a 6 x 6 image with radius 2: 41 tokens
    "clear-5+6x6-r2": Case("clear", {"n_text": 5, "Y": 6, "X": 6, "r": 2}),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_qkv(case, seed=0):
    (Hq, Hk, Hv), (Dqk, Dv), L, B = case.heads, case.dims, case.length, case.B
    g = _gen(seed)
    return [torch.randn(B, h, L, d, generator=g).requires_grad_(True)
            for h, d in ((Hq, Dqk), (Hk, Dqk), (Hv, Dv))]






def check_plan_exact(case, fn):
    """The plan the kernels run with, against the formula's mask at plan-tile granularity."""
    L = case.length
    plan = fn.plan(L, L, **case.params)
    dense = plan.to_dense()[0, 0]
    M = formula_mask(case)
    bm, bn = plan.block_m, plan.block_n
    seen = set()
    for i in range(dense.shape[0]):
        for j in range(dense.shape[1]):
            cell = M[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            want = 2 if cell.all() else 1 if cell.any() else 0
            assert dense[i, j] == want, f"plan tile ({i}, {j}) is class {int(dense[i, j])}, mask says {want}"
            seen.add(("empty", "partial", "full")[want])
    missing = set(case.classes) - seen
    assert not missing, f"case does not exercise {missing} tiles (classes {seen}): adjust it"


# ----------------------------------------------------------------------------------------------
# Kernels against the formulas
# ----------------------------------------------------------------------------------------------
def test_every_tier2_entry_has_a_kernel_case():
    tier2 = {"neighborhood_1d", "neighborhood_2d", "dilated_neighborhood_2d", "neighborhood_3d_causal",
             "maxvit_block", "maxvit_grid", "dilated_sliding_window", "radial", "clear"}
    assert {c.name for c in KERNEL_CASES.values()} == tier2


@pytest.mark.parametrize("cid", sorted(KERNEL_CASES))
def test_kernel_fp32(cid):
    case = KERNEL_CASES[cid]
    fn = case.fn()
    assert fn.has_kernels and fn.has_lse
    check_plan_exact(case, fn)
    q, k, v = make_qkv(case)
    extra = {} if case.scale is None else {"scale": case.scale}
    o, lse = fn(q, k, v, return_lse=True, **case.params, **extra)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ro, rlse = getattr(F, case.name)(*leaves, **formula_kwargs(case), **extra)
    assert o.dtype == torch.float32 and o.shape == ro.shape
    check_close("o", o, ro, FWD_TOL)
    assert lse.shape == rlse.shape
    assert torch.isfinite(rlse).all()  # every query of these cases sees a key
    check_close("lse", lse, rlse, FWD_TOL)
    do = torch.randn(o.shape, generator=_gen(99))
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ro, leaves, do.double())
    for n, g_, w in zip(("dq", "dk", "dv"), got, want):
        check_close(n, g_, w, BWD_TOL)


# ----------------------------------------------------------------------------------------------
# Fully masked rows: o = 0, lse = -inf, zero gradients
# ----------------------------------------------------------------------------------------------
def test_fully_masked_rows_dilated_sliding_window():
    """window = -1: abs(i - j) <= -1 never holds, every row is empty (no key tile visited)."""
    case = Case("dilated_sliding_window", params={"window": -1, "dilation": 3}, L=37, classes=("empty",))
    fn = case.fn()
    assert not formula_mask(case).any()
    assert fn.plan(case.length, case.length, **case.params).tiles_visited == 0
    q, k, v = make_qkv(case, seed=4)
    o, lse = fn(q, k, v, return_lse=True, **case.params)
    assert (o == 0).all(), "fully masked rows must output exactly 0"
    assert (lse == -math.inf).all(), "fully masked rows must have lse = -inf"
    for g_ in torch.autograd.grad(o, (q, k, v), torch.randn_like(o)):
        assert (g_ == 0).all()
    ro, rlse = F.dilated_sliding_window(q.double(), k.double(), v.double(), **case.params)
    assert (ro == 0).all() and (rlse == -math.inf).all()


# ----------------------------------------------------------------------------------------------
# Element masks: equal to the formulas' builders; NATTEN's borders
# ----------------------------------------------------------------------------------------------
MASK_CASES = {
    # every entry at the example's own constants (no kernels: cheap at L = 256..512)
    **{f"{n}-example": Case(n, L={"neighborhood_1d": 61, "dilated_sliding_window": 150}.get(n, 0))
       for n in ("neighborhood_1d", "neighborhood_2d", "dilated_neighborhood_2d", "neighborhood_3d_causal",
                 "maxvit_block", "maxvit_grid", "dilated_sliding_window", "radial", "clear")},
    **{cid: c for cid, c in KERNEL_CASES.items()},
    # residue classes shorter than the kernel (L' < K: the window is the whole class)
    "neighborhood_1d-K5d4": Case("neighborhood_1d", {"K": 5, "d": 4, "stride": 1}, L=18),
    "neighborhood_1d-K6s3": Case("neighborhood_1d", {"K": 6, "d": 1, "stride": 3}, L=20),
    "dilated_neighborhood_2d-7x11-d3x4": Case("dilated_neighborhood_2d",
                                              {"Y": 7, "X": 11, "KY": 3, "KX": 3, "DY": 3, "DX": 4}),
    "neighborhood_3d_causal-4x6x7-s3": Case("neighborhood_3d_causal",
                                            {"T": 4, "Y": 6, "X": 7, "KT": 3, "KY": 2, "KX": 5,
                                             "SY": 3, "SX": 3}),
}


@pytest.mark.parametrize("cid", sorted(MASK_CASES))
def test_mask_equals_formula(cid):
    case = MASK_CASES[cid]
    L = case.length
    m = case.fn().mask(Lq=L, Lk=L, **case.params)
    assert m.shape == (1, 1, L, L) and m.dtype == torch.bool
    want = formula_mask(case)
    diff = (m[0, 0] != want).nonzero()
    assert diff.numel() == 0, f"{len(diff)} elements differ, first (q, kv) = {diff[0].tolist()}"


def _axes(case):
    """Per axis: (extent, kernel, dilation, stride, causal), outermost first."""
    c = case.all_consts
    n = case.name
    if n == "neighborhood_1d":
        return [(case.length, c["K"], c["d"], c["stride"], False)]
    if n == "neighborhood_2d":
        return [(c["Y"], c["KY"], 1, 1, False), (c["X"], c["KX"], 1, 1, False)]
    if n == "dilated_neighborhood_2d":
        return [(c["Y"], c["KY"], c["DY"], 1, False), (c["X"], c["KX"], c["DX"], 1, False)]
    if n == "neighborhood_3d_causal":
        return [(c["T"], c["KT"], 1, 1, True), (c["Y"], c["KY"], 1, c["SY"], False),
                (c["X"], c["KX"], 1, c["SX"], False)]
    raise KeyError(n)


NEIGHBORHOOD_CASES = sorted(cid for cid, c in MASK_CASES.items() if c.name.startswith("neighborhood")
                            or c.name.startswith("dilated_neighborhood"))


@pytest.mark.parametrize("cid", NEIGHBORHOOD_CASES)
def test_natten_windows_shift_never_shrink(cid):
    """Each query sees, per axis, exactly min(K, L') keys (L' = the size of its residue class mod
    the dilation; causal axes: min(K, q' + 1)), forming a run of consecutive reduced coordinates of
    its own residue class; stride-1 non-causal windows contain the query; the visible set is the
    product of the per-axis sets."""
    case = MASK_CASES[cid]
    L = case.length
    axes = _axes(case)
    shape = [a[0] for a in axes]
    assert math.prod(shape) == L
    m = case.fn().mask(Lq=L, Lk=L)[0, 0]
    coords = torch.stack(F.unravel(L, shape), dim=1)  # [L, axes]
    for qi in range(L):
        keys = coords[m[qi]]
        expected_total = 1
        for a, (ext, K, d, s, causal) in enumerate(axes):
            qc = int(coords[qi, a])
            vals = sorted(set(keys[:, a].tolist()))
            assert all(x % d == qc % d for x in vals), (qi, a, vals)
            reduced = [x // d for x in vals]
            n_class = len(range(qc % d, ext, d))
            want = min(K, qc // d + 1) if causal else min(K, n_class)
            assert len(reduced) == want, f"query {qi} axis {a}: sees {len(reduced)} positions, want {want}"
            assert reduced == list(range(reduced[0], reduced[0] + want)), (qi, a, reduced)
            if causal:
                assert reduced[-1] == qc // d, (qi, a, reduced)  # s = 1 on the causal axes here
            elif s == 1:
                assert reduced[0] <= qc // d <= reduced[-1], (qi, a, reduced)
            expected_total *= want
        assert keys.shape[0] == expected_total, f"query {qi}: {keys.shape[0]} keys, want {expected_total}"
