"""bench/gpu_check.py rehearsed on the CPU: `--dry-run` takes every path of the GPU run (verify, the
speed table beside SDPA and FlexAttention, the sparse masks, the normalizations, decoding, trained
biases, linear attention beside flash-linear-attention) at tiny sizes through Triton's interpreter, so
the one GPU call cannot fail on a path that never ran.

fla's Triton kernels do not run under the interpreter (no driver), so the dry run meets a stand-in
`fla` package written here: the functions of fla 0.6.0 with its signatures, computed in PyTorch. It
also shadows a real fla that a developer may have installed."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CONFIG = r"\d+x\d+ w\d+ s\d+"  # one kernel's entry of the configs column: BLOCK_M x BLOCK_N, warps, stages

FLA_STUB = {  # fla 0.6.0's chunked linear attention API ([B, T, H, D] tensors), in float32 PyTorch
    "__init__.py": "__version__ = '0.0.stub'\n",
    "ops/__init__.py": "",
    "ops/_ref.py": """import torch


def attend(q, k, v, scale, log_decay=None, normalize=False):
    qh, kh, vh = (x.transpose(1, 2).float() for x in (q, k, v))
    t = torch.arange(q.shape[1], device=q.device)
    gap = (t[:, None] - t[None, :]).float()
    w = (scale * qh @ kh.transpose(-1, -2)).masked_fill(gap < 0, 0.0)
    if log_decay is not None:
        w = w * torch.exp(log_decay.view(1, -1, 1, 1) * gap.clamp(min=0))
    o = w @ vh
    if normalize:
        o = o / (w.sum(-1, keepdim=True) + 1e-10)
    return o.transpose(1, 2).to(q.dtype)
""",
    "ops/linear_attn/__init__.py": """from fla.ops._ref import attend


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    return attend(q, k, v, k.shape[-1] ** -0.5 if scale is None else scale, normalize=normalize), None
""",
    "ops/simple_gla/__init__.py": """from fla.ops._ref import attend


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     cu_seqlens=None, **kwargs):
    return attend(q, k, v, k.shape[-1] ** -0.5 if scale is None else scale, g_gamma), None
""",
}


def _fla_stub(root: Path) -> str:
    """Writes the stand-in fla under root; returns a PYTHONPATH that puts it first."""
    for name, text in FLA_STUB.items():
        path = root / "fla" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *args, timeout=600, **env_vars):
    out = tmp_path / "gpu_check.md"
    env = dict(os.environ, TRITON_INTERPRET="1", **env_vars)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    return proc, out, time.monotonic() - start


@pytest.mark.slow
def test_dry_run_takes_every_path(tmp_path):
    proc, out, _ = _run(tmp_path, PYTHONPATH=_fla_stub(tmp_path / "stub"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    gpu_check = _module()
    settings = gpu_check.Settings.make(dry_run=True)
    assert math.isclose(sum(gpu_check.SHARES.values()), 1.0) and list(gpu_check.SHARES)[-1] == "linear"
    for title in gpu_check.TITLES.values():
        assert f"## {title}" in text
    for name in ("speed", "sparse", "norm", "linear"):  # the configs column's header in those tables
        header = "| " + " | ".join(h for _, h, _ in gpu_check.COLUMNS[name]) + " | note |"
        assert header in text and "| configs |" in header, name
    assert re.search(rf"\| fwd {CONFIG}; dq {CONFIG}; dkdv {CONFIG}", text)  # the interpreter's one config
    for bad in ("FAILED", "timeout", "skipped", "MISMATCH", "nan"):
        assert bad not in text, f"{bad} in the dry run's table:\n{text}"
    assert "torch " in text and "triton " in text and "DRY RUN" in text

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["total_s"] is not None
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SHARES)
    for name, section in sections.items():
        assert section["status"] == "done", name
        rows = section["rows"]
        # forward, and forward + backward; the linear section's fla units fill in the attnc units' rows
        per_unit = 1 if name in ("verify", "decode", "learn", "linear", "stats") else 2
        assert len(rows) == per_unit * len(gpu_check.units(name, settings)), name
        for row in rows:
            assert not row.get("note") or row["note"] == "Flex has no backward on the CPU", row
    assert [r["spec"] for r in sections["verify"]["rows"]] == list(settings.verify)
    assert all(r["result"] == "ok" for r in sections["verify"]["rows"])
    for name in ("speed", "sparse", "norm", "linear"):
        for row in sections[name]["rows"]:
            assert isinstance(row["attnc_ms"], float) and row["attnc_ms"] > 0, row
    for name in ("speed", "sparse", "norm"):  # each attnc kernel's config, read after the timed calls
        for row in sections[name]["rows"]:
            kernels = r"fwd " + CONFIG + ("" if row["pass"] == "fwd" else rf"; dq {CONFIG}; dkdv {CONFIG}")
            assert re.fullmatch(kernels + rf"(; rows {CONFIG})?", row["configs"]), row
    speed = sections["speed"]["rows"]
    assert {r["spec"] for r in speed} == set(gpu_check.BENCH)
    for row in speed + sections["sparse"]["rows"]:
        if row["pass"] == "fwd":  # attnc and FlexAttention compute the same attention (bf16 outputs)
            assert isinstance(row["flex_ms"], float) and row["diff_flex"] < 0.05, row
    sdpa = [r for r in speed if r["spec"] in ("full", "causal")]
    assert sdpa and all(isinstance(r["sdpa_ms"], float) and math.isfinite(r["vs_sdpa"]) for r in sdpa)
    assert any(r["density"] < 1 for r in sections["sparse"]["rows"])  # a plan that skips tiles
    assert {r["passes"] for r in sections["norm"]["rows"]} == {1, 2}
    assert all(r["target"] == {1: 1.3, 2: 2.0}[r["passes"]] for r in sections["norm"]["rows"])
    for row in sections["decode"]["rows"]:  # split-KV decoding equals SDPA on the same keys
        assert isinstance(row["attnc_ms"], float) and row["diff_sdpa"] < 0.05, row
    learn = sections["learn"]["rows"]  # a learnable bias's gradient: timed, and right
    assert {r["spec"] for r in learn} == set(gpu_check.LEARNED)
    for row in learn:
        assert isinstance(row["fixed_ms"], float) and row["grad_err"] < 1e-3, row
    for row in sections["varlen"]["rows"]:  # varlen: a plain call's launches, however many sequences; the others
        if row["spec"] == "varlen":  # compute the same
            assert row["launches"] == (1 if row["pass"] == "fwd" else 3), row
        if row["spec"] != "varlen" and row["pass"] == "fwd":
            assert row["diff"] < 1e-5, row
    stats = sections["stats"]["rows"]  # the statistics' passes beside the same call without them
    assert {(r["spec"], r["pass"]) for r in stats} == {("call", "fwd"), ("call", "fwd+bwd"), ("decode", "fwd")}
    for row in stats:
        assert isinstance(row["attnc_ms"], float) and isinstance(row["plain_ms"], float) and row["ratio"] > 0, row
    linear = sections["linear"]["rows"]  # chunked linear attention, fla's results filled in beside attnc's
    assert [(r["spec"], r["L"], r["pass"]) for r in linear] == [
        (name, L, pass_) for L, _, _ in settings.linear_shapes for name in gpu_check.LINEAR
        for pass_ in ("fwd", "fwd+bwd")]
    for row in linear:
        assert isinstance(row["fla_ms"], float) and math.isfinite(row["vs_fla"]), row
        assert row["configs"].startswith("chunk "), row
        if row["pass"] == "fwd":  # both compute the same attention (bf16 outputs)
            assert row["diff_fla"] < 0.02 * max(1.0, row["out_max"]), row


def test_out_of_budget_still_writes_the_tables(tmp_path):
    proc, out, seconds = _run(tmp_path, "--budget", "0.5", "--sections", "verify,sparse")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    for name in ("verify", "sparse"):
        rows = data["sections"][name]["rows"]
        assert rows and all(r["note"] in ("skipped (budget)", "timeout (budget)") for r in rows), rows
        assert "skipped (budget)" in data["sections"][name]["status"]
    assert "skipped (budget)" in out.read_text()
    assert seconds < 60


def test_quick_autotune_keeps_the_first_config(monkeypatch):
    from attnc.runtime import launch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter has a one-config space anyway
    monkeypatch.delenv("ATTNC_AUTOTUNE", raising=False)
    for kind in ("fwd", "dq", "dkdv"):
        full = launch.kernel_configs(kind)
        assert len(full) > 1
        monkeypatch.setenv("ATTNC_AUTOTUNE", "quick")
        quick = launch.kernel_configs(kind)
        monkeypatch.delenv("ATTNC_AUTOTUNE")
        assert len(quick) == 1 and str(quick[0]) == str(full[0])


def test_a_dying_section_process_costs_its_rows_not_the_run(tmp_path):
    """Children that die (a CUDA fault, a segfault in a compiler) are replaced; after two deaths in a
    row before any row finished, the section gives up instead of burning its time on restarts."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os, sys\nif '--child' in sys.argv:\n    os._exit(7)\n")
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    proc, out, _ = _run(tmp_path, "--sections", "verify,norm", PYTHONPATH=path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    for name in ("verify", "norm"):
        notes = [r["note"] for r in data["sections"][name]["rows"]]
        assert notes[:2] == ["FAILED: the process died (exit 7)"] * 2, notes
        assert all(n.startswith("FAILED: not run") for n in notes[2:]), notes
    assert len(data["sections"]["norm"]["rows"]) > 2  # rows given up on, not tried one by one
    assert "FAILED" in out.read_text()


def test_linear_baseline_without_fla_or_with_another_fla(monkeypatch):
    """No fla: "n/a (fla not installed)". An fla whose functions moved or whose signature differs: a
    "FAILED" cell with the error in the note, and the section goes on."""
    import types

    import torch

    gpu_check = _module()
    settings = gpu_check.Settings.make(dry_run=True)
    L, B, H = settings.linear_shapes[0]

    def rows(name):
        got = []
        gpu_check.run_linear(settings, got.append, name, L, B, H, True)
        return got

    monkeypatch.setitem(sys.modules, "fla", None)  # `import fla` raises ModuleNotFoundError
    for row in rows("lightning"):
        assert row["fla_ms"] == "n/a (fla not installed)" and not row["note"], row

    fla = types.ModuleType("fla")  # an fla whose linear_attn takes other arguments, without simple_gla
    linear_attn = types.ModuleType("fla.ops.linear_attn")
    linear_attn.chunk_linear_attn = lambda q, k, v, *, mode: (q, None)
    for name, module in (("fla", fla), ("fla.ops", types.ModuleType("fla.ops")),
                         ("fla.ops.linear_attn", linear_attn), ("fla.ops.simple_gla", types.ModuleType("x"))):
        monkeypatch.setitem(sys.modules, name, module)
    for row in rows("linear_elu"):
        assert row["fla_ms"] == "FAILED" and "TypeError" in row["note"], row
    for row in rows("lightning"):
        assert row["fla_ms"] == "FAILED" and "ImportError" in row["note"] and "chunk_simple_gla" in row["note"], row
    assert torch.is_grad_enabled()


def test_kernel_configs_reads_what_is_there():
    """The configs column: best_config where a call chose one, the one config where there is nothing to
    tune, "-" where a module has no such kernels (or no module)."""
    import types

    import triton

    gpu_check = _module()
    module = types.ModuleType("attnc_fake_module")
    tuned = types.SimpleNamespace(best_config=triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8,
                                                            num_stages=3), configs=[])
    untuned = types.SimpleNamespace(configs=[triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4,
                                                           num_stages=2)])
    module._fwd, module._bwd_dq, module._bwd_dkdv = tuned, untuned, types.SimpleNamespace(configs=[1, 2])
    sys.modules[module.__name__] = module
    try:
        fn = types.SimpleNamespace(__module__=module.__name__)
        assert gpu_check.kernel_configs(fn) == "fwd 128x64 w8 s3; dq 64x128 w4 s2"
        assert gpu_check.kernel_configs(fn, ("fwd",)) == "fwd 128x64 w8 s3"
        assert gpu_check.kernel_configs(types.SimpleNamespace(__module__="no_such_module")) == "-"
        assert gpu_check.kernel_configs(object()) == "-"
    finally:
        del sys.modules[module.__name__]
