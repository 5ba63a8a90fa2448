#!/usr/bin/env bash
# Creates target/pyenv, a Python venv with the independent implementations the
# tests check pde against (RFC 8785 and ed25519), at pinned versions, and
# prints the path of its python. Idempotent: a venv that already has the pins
# is reused. Tests find it through PDE_TEST_PYTHON (scripts/test.sh exports it).
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned: a new release must not change what "independent" means under us.
PINS=(rfc8785==0.1.4 pynacl==1.6.2)
dir="${CARGO_TARGET_DIR:-target}/pyenv"
py="$dir/bin/python"
stamp="$dir/.pde-pins"
if [ -x "$py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PINS[*]}" ]; then
    echo "$(cd "$dir" && pwd)/bin/python"
    exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 is needed for the RFC 8785 cross-check tests (apt-get install python3 python3-venv)" >&2
    exit 2
fi
echo "==> creating $dir (python3 -m venv) with ${PINS[*]}" >&2
rm -rf "$dir"
python3 -m venv "$dir" >&2
"$py" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
echo "${PINS[*]}" >"$stamp"
echo "$(cd "$dir" && pwd)/bin/python"
