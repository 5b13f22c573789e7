"""bench/gpu_check.py rehearsed on the CPU: `--dry-run` takes every path of the GPU run (verify, the
speed table beside SDPA and FlexAttention, the sparse masks, the normalizations) at tiny sizes through
Triton's interpreter, so the one GPU call cannot fail on a path that never ran."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


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
    proc, out, _ = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    gpu_check = _module()
    settings = gpu_check.Settings.make(dry_run=True)
    for title in gpu_check.TITLES.values():
        assert f"## {title}" in text
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
        per_unit = 1 if name in ("verify", "decode", "learn") else 2  # forward, and forward + backward
        assert len(rows) == per_unit * len(gpu_check.units(name, settings)), name
        for row in rows:
            assert not row.get("note") or row["note"] == "Flex has no backward on the CPU", row
    assert [r["spec"] for r in sections["verify"]["rows"]] == list(settings.verify)
    assert all(r["result"] == "ok" for r in sections["verify"]["rows"])
    for name in ("speed", "sparse", "norm"):
        for row in sections[name]["rows"]:
            assert isinstance(row["attnc_ms"], float) and row["attnc_ms"] > 0, row
    speed = sections["speed"]["rows"]
    assert {r["spec"] for r in speed} == set(gpu_check.BENCH)
    for row in speed + sections["sparse"]["rows"]:
        if row["pass"] == "fwd":  # attnc and FlexAttention compute the same attention (bf16 outputs)
            assert isinstance(row["flex_ms"], float) and row["diff_flex"] < 0.05, row
    sdpa = [r for r in speed if r["spec"] in ("full", "causal")]
    assert sdpa and all(isinstance(r["sdpa_ms"], float) and math.isfinite(r["vs_sdpa"]) for r in sdpa)
    assert any(r["density"] < 1 for r in sections["sparse"]["rows"])  # a plan that skips tiles
    assert {r["passes"] for r in sections["norm"]["rows"]} == {1, 2}
    for row in sections["decode"]["rows"]:  # split-KV decoding equals SDPA on the same keys
        assert isinstance(row["attnc_ms"], float) and row["diff_sdpa"] < 0.05, row
    learn = sections["learn"]["rows"]  # a learnable bias's gradient: timed, and right
    assert {r["spec"] for r in learn} == set(gpu_check.LEARNED)
    for row in learn:
        assert isinstance(row["fixed_ms"], float) and row["grad_err"] < 1e-3, row


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
