"""The `attnc` command line: summaries, diagnostics as file:line:col, and never a traceback."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import run_cli as run

CAUSAL = "attention causal\nmask kv <= q\n"
SOFTPLUS_REWEIGHT = """\
attention softplus_reweight
param p = 3.0, tau = 1.0
mask kv <= q
let A = softplus(log(visible) * score) / rowsum(softplus(log(visible) * score))
let R = relu(visible * A - tau) ** p
probs R / rowsum(R) if rowsum(R) > 0 else A
"""
ALIBI = "attention alibi\ninput slopes: float[Hq] learnable\nmask kv <= q\nscore s - slopes[h] * (q - kv)\n"
BAD = "attention bad\nparam window = 3\nmask kv <= q and q - kv < windw\n"




@pytest.fixture
def specs(tmp_path):
    files = {}
    for name, text in {"causal": CAUSAL, "softplus_reweight": SOFTPLUS_REWEIGHT, "alibi": ALIBI, "bad": BAD}.items():
        files[name] = tmp_path / f"{name}.attn"
        files[name].write_text(text)
    return files


def test_check_ok_one_line_summary_per_spec(specs):
    code, out = run("check", str(specs["causal"]), str(specs["softplus_reweight"]), str(specs["alibi"]))
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0] == f"{specs['causal']}: ok: attention causal (softmax, 1 pass; params: none; inputs: none)"
    assert lines[1] == f"{specs['softplus_reweight']}: ok: attention softplus_reweight (general, 2 passes; params: p, tau; inputs: none)"
    assert lines[2] == f"{specs['alibi']}: ok: attention alibi (softmax, 1 pass; params: none; inputs: slopes*)"


def test_check_bad_spec_exit_1_with_location(specs):
    code, out = run("check", str(specs["bad"]))
    assert code == 1
    assert f"{specs['bad']}:3:27: error: unknown name 'windw'" in out
    assert "^^^^^" in out
    assert "hint: did you mean 'window'?" in out


def test_check_refuses_ampersand_between_comparisons_with_location(tmp_path):
    spec = tmp_path / "flex.attn"
    spec.write_text("attention flex\nmask kv <= q & q - kv < 8\n")
    code, out = run("check", str(spec))
    assert code == 1
    assert (f"{spec}:2:14: error: '&' inside a comparison: this reads as kv <= (q & (q - kv)) < 8, because '&' "
            "binds tighter than comparisons") in out
    assert "hint: to combine the conditions write 'and': kv <= q and q - kv < 8" in out
    assert "Traceback" not in out


def test_check_mixed_good_and_bad_exit_1_but_reports_both(specs):
    code, out = run("check", str(specs["causal"]), str(specs["bad"]))
    assert code == 1
    assert "ok: attention causal" in out
    assert ":3:27: error:" in out


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "empty", "bad_utf8", "nul", "huge"])
def test_check_junk_never_tracebacks(tmp_path, kind):
    path = tmp_path / "junk.attn"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bad_utf8":
        path.write_bytes(b"attention t\nmask kv <= q and \xff\xfe > 1\n")
    elif kind == "nul":
        path.write_bytes(b"attention t\nmask kv <= q\x00\n")
    elif kind == "huge":
        path.write_bytes(b"attention t\n" + b"#" * (2 << 20))
    code, out = run("check", str(path))
    assert code == 1
    assert str(path) in out and "error:" in out
    if kind == "bad_utf8":
        assert f"{path}:2:18: error: spec is not valid UTF-8" in out
    if kind == "empty":
        assert f"{path}:1:1: error: empty spec" in out
    if kind == "nul":
        assert f"{path}:2:13: error: unexpected character '\\x00'" in out


def test_check_requires_an_argument():
    code, out = run("check")
    assert code == 2 and "Usage" in out


def test_ir_prints_the_dump(specs):
    code, out = run("ir", str(specs["softplus_reweight"]))
    assert code == 0
    assert out.startswith(f"attention softplus_reweight    # {specs['softplus_reweight']}\n")
    assert "passes     2 over the keys" in out
    assert re.search(r"^  pass 2 +r2 = rowsum\(", out, re.MULTILINE)


def test_ir_bad_spec(specs, tmp_path):
    code, out = run("ir", str(specs["bad"]))
    assert code == 1 and ":3:27: error:" in out
    code, out = run("ir", str(tmp_path / "nope.attn"))
    assert code == 1 and "cannot read spec" in out


def test_version_and_help():
    code, out = run("--version")
    assert code == 0 and "attnc" in out
    code, out = run("--help")
    assert code == 0 and "check" in out


def _attnc_command():
    script = shutil.which("attnc")
    return [script] if script else [sys.executable, "-m", "attnc.cli"]


def test_real_subprocess(specs, tmp_path):
    good = subprocess.run([*_attnc_command(), "check", str(specs["causal"])], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)
    assert good.returncode == 0, good.stderr
    assert "ok: attention causal" in good.stdout
    bad = subprocess.run([*_attnc_command(), "check", str(specs["bad"]), str(tmp_path / "missing.attn")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert bad.returncode == 1
    assert f"{specs['bad']}:3:27: error: unknown name 'windw'" in bad.stderr
    assert "cannot read spec" in bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


def test_verify_draws_lengths_past_the_constants_and_reports_progress(tmp_path):
    """A const the mask compares with (64) is exceeded by the drawn length, so the spec is not tested
    as full attention only; sizes, progress and a summary line are printed; --L overrides."""
    from attnc.pipeline import compile_text
    from attnc.verify import cases

    text = "attention capped\nconst C = 64\nparam w = 5\nmask kv <= q and (kv < C or q - kv < w)\n"
    variant = compile_text(text)
    drawn = cases(variant)
    assert all(c.Lk > 64 for c in drawn)
    assert any(c.params.get("w", 5) < c.Lk for c in drawn)
    assert all(c.Lk == 9 for c in cases(variant, 9))
    spec = tmp_path / "capped.attn"
    spec.write_text(text)
    code, out = run("verify", "--L", "9", str(spec), str(spec))
    assert code == 0, out
    assert "[1/2]" in out and "[2/2]" in out
    assert "case base: B=1 Hq=2 Hk=2 Hv=2 Lq=9 Lk=9 Dqk=40 Dv=40" in out
    assert re.search(r"^verify: 2 specs: 2 ok \(\d+ s, cpu, float32\): PASS$", out, re.MULTILINE), out
    code, out = run("verify", "--L", "0", str(spec))
    assert code == 2 and "--L" in out


def test_verify_in_bf16_judges_the_kernels_on_the_inputs_they_get():
    """relu's derivative jumps at s = 0: a reference fed the unrounded inputs disagrees with any bf16
    kernel wherever rounding moves a score across 0 (found on the first GPU run). The reference now
    gets the rounded inputs, and a correct kernel passes at bf16's tolerance."""
    import torch

    import attnc
    from attnc.verify import verify_variant

    path = Path(__file__).resolve().parents[1] / "examples" / "relu.attn"
    rows = verify_variant(path, attnc.load(path), dtype=torch.bfloat16)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    # and a wrong kernel still fails: the same check on a perturbed function

    def wrong(q, k, v, **kw):
        return attnc.load(path)(q, k, v * 1.1, **kw)
    wrong.has_lse = False
    wrong.reference = attnc.load(path).reference
    assert not all(r.ok for r in verify_variant(path, wrong, dtype=torch.bfloat16))
