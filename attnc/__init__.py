"""attnc: an attention compiler. `.attn` specs in, verified Triton kernels out.

The public API (everything else is internal and may change):

- `load(path)`: compile a spec (cached by content) and return its attention function
  `attn(q, k, v, scale=None, return_lse=False, plan=None, **inputs)`, with `attn.reference`,
  `attn.plan`, `attn.mask`, `attn.Module` and `attn.signature`.
- `compile(text, name=None)`: `load` for spec text (same cache, same function); `name` labels the text
  in error messages.
- `build_source(path)`: the generated module's source, as `attnc build` writes it.
- `SpecError` (a spec that does not parse or type-check) and `BuildError` (one that cannot be built).
- `attnc.integrations.transformers.register(name, spec_path, **inputs)`: a Hugging Face attention backend.
- `attnc.distributed.context_parallel(attn, group, layout)`: ring attention over torch.distributed.
"""

from .errors import BuildError, SpecError

__version__ = "0.1.0"

__all__ = ["BuildError", "SpecError", "__version__", "build_source", "compile", "load"]


def load(path):
    """Compile a `.attn` spec (cached by content) and return its attention function."""
    from .build import load as _load

    return _load(path)


def compile(text, name=None):
    """Compile spec text (cached like files, by the text and the compiler) and return its attention function,
    as `load` does for a file: `attnc.compile("attention causal\\nmask kv <= q\\n")`."""
    from .build import compile_spec

    return compile_spec(text, name)


def build_source(path) -> str:
    """The source of the module generated for the spec at `path` (what `attnc build` writes)."""
    from .build import build_source as _build_source

    return _build_source(path)
