"""The wheel works on its own: built from the source tree, installed into a fresh directory, imported from
outside the repository (so the editable install cannot shadow it), with its grammar as package data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import importlib.resources, os, sys
import attnc, attnc.cli
target = os.path.realpath(sys.argv[1])
assert os.path.realpath(attnc.__file__).startswith(target + os.sep), attnc.__file__
grammar = importlib.resources.files("attnc.grammar").joinpath("attn.lark")
assert grammar.is_file() and "attention" in grammar.read_text()
import attnc.runtime, attnc.parse
print("wheel ok", attnc.__version__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    target = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], check=False, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("attnc-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], check=False, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, target


def _run(args, target, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_wheel_contains_grammar_and_runtime(installed):
    import zipfile

    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "attnc/grammar/attn.lark" in names
    assert any(n.startswith("attnc/runtime/") for n in names)
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_installed_wheel_imports_from_its_own_directory(installed, tmp_path):
    _, target = installed
    proc = _run(["-c", PROBE, str(target)], target, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wheel ok" in proc.stdout


def test_installed_wheel_checks_a_spec(installed, tmp_path):
    _, target = installed
    spec = tmp_path / "causal.attn"
    spec.write_text("attention causal\nmask kv <= q\n")
    proc = _run(["-m", "attnc.cli", "check", str(spec)], target, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: attention causal" in proc.stdout
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad\nmask kv <= qq\n")
    proc = _run(["-m", "attnc.cli", "check", str(bad)], target, tmp_path)
    assert proc.returncode == 1 and f"{bad}:2:12: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


QUICK_START = r"""
import torch
import attnc
from attnc.runtime import launch
assert attnc.__all__ and all(hasattr(attnc, name) for name in attnc.__all__)
attn = attnc.load("sliding_window.attn")              # README "Using a spec from Python"
q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
with launch.count_visits() as launches:
    o = attn(q, k, v, window=8)                        # the Triton kernels (interpreted)
assert launches, "the kernels did not run"
ref = attn.reference(q, k, v, window=8)
assert (o - ref).abs().max() < 1e-4, (o - ref).abs().max()
o, lse = attn(q, k, v, return_lse=True)
print("quick start ok", tuple(o.shape), tuple(lse.shape), attn.plan(Lq=64, Lk=64, window=8))
"""


def test_installed_wheel_runs_the_quick_start(installed, tmp_path):
    """`attnc --version`, `attnc check`, `attnc build`, and `attnc.load` with a kernel call, from the wheel
    alone (its templates, grammar, codegen families and runtime)."""
    import zipfile

    wheel, target = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "attnc/py.typed" in names
    assert any(n.startswith("attnc/codegen/families/") for n in names)
    assert "attnc/integrations/transformers.py" in names
    spec = tmp_path / "sliding_window.attn"
    spec.write_text((ROOT / "examples" / "sliding_window.attn").read_text())
    proc = _run(["-m", "attnc.cli", "--version"], target, tmp_path)
    import attnc

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"attnc, version {attnc.__version__}", proc.stdout
    proc = _run(["-m", "attnc.cli", "build", str(spec), "-o", str(tmp_path / "gen")], target, tmp_path)
    assert proc.returncode == 0 and (tmp_path / "gen" / "sliding_window.py").is_file(), proc.stdout + proc.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(target), TRITON_INTERPRET="1", ATTNC_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", QUICK_START], check=False, capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "quick start ok (1, 2, 32, 16) (1, 2, 32)" in proc.stdout
