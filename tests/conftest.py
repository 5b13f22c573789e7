"""Shared test setup: kernels run on the CPU through Triton's interpreter, and generated modules go
to a per-session cache directory (never the user's).

TRITON_INTERPRET is forced, not defaulted: a shell that exported TRITON_INTERPRET=0 would otherwise
send CPU calls to the eager reference, and the kernel tests would compare the reference with itself.
(The kernel tests also assert that the kernels ran, through launch.count_visits().)"""

import os
import tempfile

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`
os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))
