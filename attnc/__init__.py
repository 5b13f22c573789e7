"""attnc: an attention compiler. `.attn` specs in, verified Triton kernels out."""

__version__ = "0.1.0"


def load(path):
    """Compile a `.attn` spec (cached by content) and return its attention function."""
    from .build import load as _load

    return _load(path)
