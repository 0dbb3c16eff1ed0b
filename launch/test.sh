#!/usr/bin/env bash
# The test suite: both tiers, tests/unit (in-process, seconds each) and tests/process (torchrun jobs, the CLI,
# services), as CI runs it. `--quick` runs the unit tier only, for the inner loop (a few minutes).
# Tests run on CLIPKIT_TEST_WORKERS pytest-xdist workers (default 2; 0 runs them in this process, in order);
# the DeepSpeed jobs share one worker, and the workers take the longest groups first (docs/testing.md).
# Other arguments go to pytest (e.g. -k loss, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
tiers=(tests)
if [ "${1:-}" = "--quick" ]; then
    shift
    tiers=(tests/unit)
fi
python -m pytest -q --strict-markers -n "${CLIPKIT_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "${tiers[@]}" "$@"
