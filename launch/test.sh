#!/usr/bin/env bash
# The test suite. Extra arguments go to pytest (e.g. -k loss, -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
python -m pytest -q tests "$@"
