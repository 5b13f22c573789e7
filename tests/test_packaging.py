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
                            "-q", "-w", str(wheels)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("attnc-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return wheel, target


def _run(args, target, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(target)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


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
