#!/usr/bin/env bash
# docker/build-backend.sh — THE build of the Triton backend, used by docker/Dockerfile and by
# `make test` (with PREFIX set to a temporary directory). Runs from any cwd.
#
#   PREFIX=/opt/tritonserver docker/build-backend.sh
#
# 1. Finds Triton's C API headers the way build.rs does: $TRITON_INCLUDE_DIR, else
#    /opt/tritonserver/include (inside a Triton container), else .cache/triton-headers, which
#    scripts/setup fills (run here only when neither of the first two has them). The variable is
#    not exported when unset, so this build is the same cargo build as `make test`'s and reuses it.
# 2. Makes sure build.rs finds an nvcc for the CUDA kernels (build/cuda.rs looks in $NVCC,
#    $CUDA_HOME/bin, .cuda/NVCC_PATH, PATH): if none of those has one, it exports
#    NVCC=/usr/local/cuda/bin/nvcc when that exists, else runs scripts/setup, which installs the
#    pinned CUDA 13.0 nvcc from PyPI into .cuda/. Nothing is exported when build.rs would find
#    one anyway, so the environment cargo sees stays the one `make test` gave it.
# 3. cargo build --release --locked --lib --bin unweight.
# 4. Installs libtriton_unweight.so into $PREFIX/backends/unweight/ (where tritonserver looks for
#    `backend: "unweight"`) and the CLI into $PREFIX/bin/unweight. PREFIX defaults to
#    /opt/tritonserver.
# 5. Checks the installed shared object: its dynamic symbols define exactly the TRITONBACKEND_*
#    entry points (the list of tests/triton_symbols.rs), SONAME is libtriton_unweight.so, it
#    records NEEDED libtritonserver.so with no run path (linked like Triton's own backends; the
#    loader finds the server library already in the process; docs/triton.md), and it imports
#    the server functions. A failed check exits 1 and leaves nothing under the final name.
#
# Environment: PREFIX, TRITON_INCLUDE_DIR, NVCC, CUDA_HOME, UNWEIGHT_REQUIRE_NVCC (build.rs: fail
# rather than build without kernels), CARGO (default cargo), CARGO_TARGET_DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

PREFIX="${PREFIX:-/opt/tritonserver}"
CARGO="${CARGO:-cargo}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
# Keep in step with EXPECTED_EXPORTS in tests/triton_symbols.rs.
EXPECTED_EXPORTS="TRITONBACKEND_Finalize
TRITONBACKEND_Initialize
TRITONBACKEND_ModelFinalize
TRITONBACKEND_ModelInitialize
TRITONBACKEND_ModelInstanceExecute
TRITONBACKEND_ModelInstanceFinalize
TRITONBACKEND_ModelInstanceInitialize"

die() { echo "build-backend: $*" >&2; exit 1; }

for tool in "$CARGO" nm readelf install sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

has_headers() {
    [ -f "$1/triton/core/tritonbackend.h" ] && [ -f "$1/triton/core/tritonserver.h" ]
}

setup_done=""
run_setup() {
    if [ -z "$setup_done" ]; then
        "$REPO/scripts/setup"
        setup_done=1
    fi
}

# ---------------------------------------------------------------- 1. headers
if [ -n "${TRITON_INCLUDE_DIR:-}" ]; then
    has_headers "$TRITON_INCLUDE_DIR" \
        || die "TRITON_INCLUDE_DIR=$TRITON_INCLUDE_DIR has no triton/core/tritonbackend.h and tritonserver.h"
    headers="$TRITON_INCLUDE_DIR"
elif has_headers /opt/tritonserver/include; then
    headers=/opt/tritonserver/include
else
    has_headers "$REPO/.cache/triton-headers" || run_setup
    headers="$REPO/.cache/triton-headers"
    has_headers "$headers" || die "scripts/setup did not provide the Triton headers in $headers"
fi

# ---------------------------------------------------------------- 2. nvcc
find_nvcc() {  # the nvcc build/cuda.rs will use, in its order; fails if none
    local p
    if [ -n "${NVCC:-}" ]; then
        echo "$NVCC"
        return 0
    fi
    if [ -n "${CUDA_HOME:-}" ] && [ -f "$CUDA_HOME/bin/nvcc" ]; then
        echo "$CUDA_HOME/bin/nvcc"
        return 0
    fi
    if [ -s "$REPO/.cuda/NVCC_PATH" ]; then
        p="$(head -n 1 "$REPO/.cuda/NVCC_PATH")"
        if [ -f "$p" ]; then
            echo "$p"
            return 0
        fi
    fi
    command -v nvcc
}

if [ -n "${NVCC:-}" ] && [ ! -f "$NVCC" ]; then
    die "NVCC=$NVCC is not a file"
fi
if ! nvcc="$(find_nvcc)"; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then
        export NVCC=/usr/local/cuda/bin/nvcc
    else
        run_setup
    fi
    nvcc="$(find_nvcc)" || die "no nvcc after scripts/setup"
fi

# ---------------------------------------------------------------- 3. build
"$CARGO" build --release --locked --lib --bin unweight

so="$TARGET_DIR/release/libtriton_unweight.so"
cli="$TARGET_DIR/release/unweight"
[ -f "$so" ] || die "$so was not built"
[ -f "$cli" ] || die "$cli was not built"

# ---------------------------------------------------------------- 4. install (to a temporary name)
backend_dir="$PREFIX/backends/unweight"
mkdir -p "$backend_dir" "$PREFIX/bin"
tmp_so="$backend_dir/.libtriton_unweight.so.tmp"
tmp_cli="$PREFIX/bin/.unweight.tmp"
trap 'rm -f "$tmp_so" "$tmp_cli"' EXIT
install -m 0755 "$so" "$tmp_so"
install -m 0755 "$cli" "$tmp_cli"

# ---------------------------------------------------------------- 5. check, then rename
exports="$(nm -D --defined-only "$tmp_so" | awk '{ sub(/@.*/, "", $NF); print $NF }' | LC_ALL=C sort)"
if [ "$exports" != "$EXPECTED_EXPORTS" ]; then
    echo "build-backend: dynamic symbols defined by $so:" >&2
    echo "$exports" >&2
    die "expected exactly: $(echo "$EXPECTED_EXPORTS" | tr '\n' ' ')"
fi
dynamic="$(readelf -d "$tmp_so")"
soname="$(sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p' <<<"$dynamic")"
[ "$soname" = libtriton_unweight.so ] || die "$so: SONAME is '$soname', expected libtriton_unweight.so"
needed="$(sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p' <<<"$dynamic")"
if ! grep -qx libtritonserver.so <<<"$needed"; then
    die "$so does not record NEEDED libtritonserver.so (NEEDED: $(echo "$needed" | tr '\n' ' '))"
fi
if grep -qE '\((RPATH|RUNPATH)\)' <<<"$dynamic"; then
    die "$so has a run path; the server library must be the one already loaded"
fi
imports="$(nm -D --undefined-only "$tmp_so" | awk '{ sub(/@.*/, "", $NF); print $NF }' | grep -c '^TRITON' || true)"
[ "$imports" -gt 0 ] || die "$so imports no TRITON* server function"
version="$("$tmp_cli" --version)" || die "$cli --version failed"

mv -f "$tmp_so" "$backend_dir/libtriton_unweight.so"
mv -f "$tmp_cli" "$PREFIX/bin/unweight"
trap - EXIT

# ---------------------------------------------------------------- report
report() {  # path
    printf '  %s  %s bytes  sha256 %s\n' "$1" "$(stat -c %s "$1")" "$(sha256sum "$1" | cut -d' ' -f1)"
}
echo "build-backend: installed ($version; $("$CARGO" --version 2>/dev/null || echo "$CARGO"))"
report "$backend_dir/libtriton_unweight.so"
report "$PREFIX/bin/unweight"
echo "  exports: $(echo "$exports" | tr '\n' ' ')"
echo "  SONAME $soname; NEEDED: $(echo "$needed" | tr '\n' ' ')"
echo "  $imports TRITON* server functions imported from libtritonserver.so"
echo "  Triton headers: $headers; nvcc: $nvcc"
