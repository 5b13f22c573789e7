"""attnc: an attention compiler. `.attn` specs in, verified Triton kernels out."""

__version__ = "0.1.0"
