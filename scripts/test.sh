#!/usr/bin/env bash
# Set up (if needed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tests' models are tiny: one thread per process is several times faster than two fighting over small ops.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# As root setup.sh installed Chromium: the browser tests must run then, and fail rather than skip without it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export MRGD_REQUIRE_BROWSER=${MRGD_REQUIRE_BROWSER:-1}
fi
.venv/bin/python -m pytest -q "$@"
