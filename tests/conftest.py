"""Shared test setup: kernels run on the CPU through Triton's interpreter, and generated modules go
to a per-session cache directory (never the user's)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))
