"""Build generated modules and load them: `attnc build` and `attnc.load`.

`load(path)` (and `compile_spec(text)`, as `attnc.compile`) compiles a spec into a content-addressed cache (keyed by the spec text, the compiler's
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
from .errors import SpecError
from .pipeline import (
    MAX_SPEC_BYTES,
    block_variant,
    compile_file,
    compile_text,
    generate_module,
    read_spec,
    sink_free_variant,
)


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
    if isinstance(path, str) and _looks_like_spec_text(path) and not Path(path).exists():
        raise ValueError("attnc.load: argument 'path': expected the path of a .attn file, got what looks like "
                         f"spec text ({path if len(path) <= 40 else path[:40] + '...'!r}); compile text with attnc.compile(text)")
    name, text = read_spec(path)
    return load_text(text, name)


def _looks_like_spec_text(path: str) -> bool:
    return "\n" in path or path.lstrip().startswith("attention ")


def compile_spec(text: str, name: str | None = None):
    """`load` for spec text (`attnc.compile`): the same build cache (keyed by the text and the compiler),
    the same attention function. `name` labels the text in error messages (default "<string>")."""
    label = "<string>" if name is None else str(name)
    if not isinstance(text, str):
        raise TypeError(f"attnc.compile: argument 'text': expected the spec as a str, got {type(text).__name__}"
                         + ("; decode it first, or pass a path to attnc.load" if isinstance(text, bytes) else ""))
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError.at(f"spec is over {MAX_SPEC_BYTES} bytes", None, path=label)
    return load_text(text.removeprefix("\ufeff"), label)  # a byte-order mark, as read_spec drops it


def load_text(text: str, path: str = "<spec>", unbounded: tuple | None = None, and_mask: tuple | None = None,
              shifted: str | None = None, sink_free: bool = False):
    """`load` for a spec given as text (`path` names it in error messages). Derived variants, built from
    the checked IR (attnc/ir.py) and cached under keys of their own:
    `unbounded=(param, suffix)`: `Variant.unbounded`, the spec with a parameter at infinity (no window);
    `sink_free=True`: the spec without its softmax sink (context parallelism adds it after merging);
    `shifted=suffix`: `Variant.shifted`, the spec on a block of a longer problem (global positions and
    lengths as params: context parallelism's ring steps);
    `and_mask=(suffix, inputs)`: `Variant.and_mask`, extra boolean inputs ANDed into the mask (the
    integrations' padding variants); applied last."""
    variant = compile_text(text, path)
    material = [text]
    if unbounded is not None:
        variant = variant.unbounded(*unbounded)
        material += ["unbounded", repr(tuple(unbounded))]
    if sink_free:
        variant = sink_free_variant(variant, "nosink")
        material += ["sink_free"]
    if shifted is not None:
        variant = block_variant(variant, shifted)
        material += ["shifted", shifted]
    if and_mask is not None:
        suffix, inputs = and_mask
        inputs = tuple(tuple(i) for i in inputs)
        variant = variant.and_mask(suffix, inputs)
        material += ["and_mask", suffix, repr(inputs)]
    return load_variant(variant, material)


def load_variant(variant, material: list):
    """The attention function of a checked (or derived) IR variant, built once into the cache under a key
    of `material`: the spec text and the derivations that made the variant from it."""
    key = cache_key("\0".join(material))  # equal to cache_key(text) for the spec itself
    target = cache_dir() / f"{variant.name}_{key}.py"
    if not target.exists():
        write_module(generate_module(variant), target)
    module = import_module_from(target, f"attnc_generated.{variant.name}_{key}")
    return getattr(module, variant.name)
