#!/usr/bin/env bash
# The ONE command of a GPU call, run from the repository root on the GPU machine (no network there):
#
#   command: bash bench/gpu_run.sh        carry: ["gpu_wheels"]        timeout_s: 570
#
# First, here: `bash bench/gpu_prepare.sh` (fills gpu_wheels/). This script installs attnc and whichever
# of its pure-Python dependencies are missing from gpu_wheels/ into a private folder (never touching
# torch or triton), prints the versions and nvidia-smi, then runs bench/gpu_check.py under `timeout`.
# Everything lands in $OUT (default ./gpu_out): gpu_check.md and .json (rewritten after every row, so a
# killed run still returns what it did), gpu_check.stdout, gpu_check.stderr and gpu_run.log.
#
# Options: --budget N   seconds for gpu_check.py from its start (default 480; the hard limit is N + 30)
#          --dry-run    the whole check on the CPU through Triton's interpreter (a rehearsal)
#          anything else is passed to gpu_check.py (e.g. --sections verify,speed --autotune quick)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
export OUT
mkdir -p "$OUT"
BUDGET=480
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=$2; shift 2 ;;
        --budget=*) BUDGET=${1#--budget=}; shift ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
BUDGET=${BUDGET%.*}
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
echo "gpu_run: $(date -u +%FT%TZ) on $(hostname); OUT=$OUT; budget ${BUDGET}s; ${EXTRA[*]:-}"

# -- the Python that has torch and triton
PY=""
for candidate in ${PYTHON:-} python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch, triton" 2>/dev/null; then
        PY=$(command -v "$candidate")
        break
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_run: no Python with torch and triton found" >&2
    exit 2
fi
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '| cuda', torch.version.cuda, '| devices', torch.cuda.device_count())"
nvidia-smi 2>&1 || echo "gpu_run: nvidia-smi not available"

# -- attnc and the missing dependencies, from gpu_wheels/ only, into a private folder on PYTHONPATH
SITE=${TMPDIR:-/tmp}/attnc_gpu_site
rm -rf "$SITE"
mkdir -p "$SITE"
WANT=(attnc)
for module in lark jinja2 markupsafe sympy mpmath click; do
    "$PY" -c "import $module" 2>/dev/null || WANT+=("$module")
done
# flash-linear-attention's kernels (fla-core, pure Python), only where carried and not already there;
# --no-deps below: it never pulls torch or triton
if ls gpu_wheels/fla_core-*.whl >/dev/null 2>&1 \
    && ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fla') is None)" 2>/dev/null; then
    WANT+=(fla-core)
    for module in einops packaging; do
        "$PY" -c "import $module" 2>/dev/null || WANT+=("$module")
    done
fi
echo "gpu_run: installing ${WANT[*]} from gpu_wheels/"
if ! "$PY" -m pip install -q --no-index --find-links gpu_wheels --no-deps --no-compile --target "$SITE" "${WANT[@]}"; then
    echo "gpu_run: pip failed; unpacking the wheels instead" >&2
    "$PY" - "$SITE" "${WANT[@]}" <<'EOF'
import glob, os, sys, zipfile
site, names = sys.argv[1], sys.argv[2:]
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
for name in names:
    stem = name.replace("-", "_")  # fla-core's wheel is fla_core-*.whl
    found = [w for w in glob.glob(f"gpu_wheels/{stem}-*.whl") if "-none-any" in w or f"-{tag}-" in w]
    if not found:
        print(f"gpu_run: no wheel for {name} ({tag})", file=sys.stderr)
        continue
    zipfile.ZipFile(sorted(found)[-1]).extractall(site)
EOF
fi
# A wheel built before the last commits would run old code: compare it with the repository's sources
# (the folder mapping of pyproject.toml) and use the sources if they differ.
"$PY" - "$SITE" <<'EOF'
import shutil, sys
from pathlib import Path
site = Path(sys.argv[1])
mapping = {"attnc": "attnc", "attnc/runtime": "runtime", "attnc/grammar": "grammar", "attnc/templates": "templates"}
nested = ("runtime", "grammar", "templates")  # inside the installed attnc/, compared on their own
def files(root, top):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*")
            if p.suffix in (".py", ".lark", ".j2") and "__pycache__" not in p.parts
            and not (top == "attnc" and p.relative_to(root).parts[0] in nested)}
stale = [src for pkg, src in mapping.items() if files(site / pkg, src) != files(Path(src), src)]
if stale:
    print(f"gpu_run: WARNING: gpu_wheels/attnc differs from the repository in {stale}: using the "
          "repository's sources (run bench/gpu_prepare.sh after the last commit)")
    shutil.rmtree(site / "attnc")
    for pkg, src in sorted(mapping.items()):
        shutil.copytree(src, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
else:
    print("gpu_run: gpu_wheels/attnc matches the repository's sources")
EOF
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export ATTNC_CACHE_DIR=${ATTNC_CACHE_DIR:-${TMPDIR:-/tmp}/attnc_gpu_cache}
# (from another folder: in the repository root, its attnc/ source folder would shadow the wheel)
(cd "$SITE" && "$PY" -c "import attnc, attnc.runtime.launch, lark, jinja2, sympy, click
print('gpu_run: attnc from', attnc.__file__)") \
    || echo "gpu_run: attnc or a dependency does not import; gpu_check will say more" >&2
(cd "$SITE" && "$PY" -c "import importlib.util as u; import sys
spec = u.find_spec('fla'); print('gpu_run: fla from', spec.origin if spec else 'nowhere (linear section: n/a)')") || true

# -- the check: its own files go straight to $OUT, row by row
LIMIT=(timeout -k 15 $((BUDGET + 30)))
command -v timeout >/dev/null || { LIMIT=(); echo "gpu_run: no timeout command; relying on --budget" >&2; }
${LIMIT[@]+"${LIMIT[@]}"} "$PY" bench/gpu_check.py --budget "$BUDGET" --out "$OUT/gpu_check.md" ${EXTRA[@]+"${EXTRA[@]}"} \
    > >(tee "$OUT/gpu_check.stdout") 2> >(tee "$OUT/gpu_check.stderr" >&2)
rc=$?
[ "$rc" = 124 ] && echo "gpu_run: gpu_check.py hit the hard time limit ($((BUDGET + 30)) s)" >&2
sleep 1  # let the tees finish
echo "gpu_run: gpu_check.py exit $rc; files in $OUT:"
ls -l "$OUT"
exit "$rc"
