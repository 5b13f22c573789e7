"""Build generated modules and load them: `attnc build` and `attnc.load`.

`load(path)` compiles a spec into a content-addressed cache (keyed by the spec text, the compiler's
own sources and the torch and triton versions) and imports the result. Files are written to a temporary name and renamed,
so concurrent builds of one spec never see a half-written module.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

from . import __version__
from .codegen.module import generate_module
from .pipeline import compile_file, compile_text, read_spec


def build_source(path: str | Path) -> str:
    return generate_module(compile_file(path))


def write_module(source: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:
        f.write(source)
    os.replace(tmp, target)  # atomic: readers see the old file or the new one, never a mix
    return target


def cache_dir() -> Path:
    root = os.environ.get("ATTNC_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "attnc"


@functools.lru_cache(maxsize=1)
def compiler_fingerprint() -> str:
    """A hash of the compiler's own sources (Python, grammar, templates): a changed compiler never
    reuses modules cached by another, even under the same version number."""
    digest = hashlib.sha256()
    for package in ("attnc", "attnc.grammar", "attnc.templates", "attnc.runtime"):
        folder = Path(str(resources.files(package)))
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".lark", ".j2") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(folder)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_key(source_text: str) -> str:
    import torch
    import triton

    parts = [source_text, __version__, compiler_fingerprint(), torch.__version__, triton.__version__]
    material = "\0".join(parts)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def import_module_from(path: Path, module_name: str):
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # Triton's jit looks functions up through their module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load(path: str | Path):
    """Compile `path` (cached by content hash) and return its attention function.

    The function is called as `attn(q, k, v, scale=None, return_lse=False, **inputs)` and carries
    `attn.reference`, `attn.Module` and `attn.signature`.
    """
    name, text = read_spec(path)
    return load_text(text, name)


def load_text(text: str, path: str = "<spec>", unbounded: tuple | None = None, and_mask: tuple | None = None):
    """`load` for a spec given as text (`path` names it in error messages). Derived variants, built from
    the checked IR (attnc/ir.py) and cached under keys of their own:
    `unbounded=(param, suffix)`: `Variant.unbounded`, the spec with a parameter at infinity (no window);
    `and_mask=(suffix, inputs)`: `Variant.and_mask`, extra boolean inputs ANDed into the mask (the
    integrations' padding and context-parallel variants); applied after `unbounded`."""
    variant = compile_text(text, path)
    material = [text]
    if unbounded is not None:
        variant = variant.unbounded(*unbounded)
        material += ["unbounded", repr(tuple(unbounded))]
    if and_mask is not None:
        suffix, inputs = and_mask
        inputs = tuple(tuple(i) for i in inputs)
        variant = variant.and_mask(suffix, inputs)
        material += ["and_mask", suffix, repr(inputs)]
    key = cache_key("\0".join(material))  # equal to cache_key(text) for the spec itself
    target = cache_dir() / f"{variant.name}_{key}.py"
    if not target.exists():
        write_module(generate_module(variant), target)
    module = import_module_from(target, f"attnc_generated.{variant.name}_{key}")
    return getattr(module, variant.name)
