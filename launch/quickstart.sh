#!/usr/bin/env bash
# The main job: train clipkit-tiny on the built-in dataset, evaluate zero-shot, export.
# Extra arguments are passed to `clipkit train` (a YAML file and/or dotted overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
# train.resume=latest: running it again continues (or, once finished, re-evaluates and re-exports) the run.
clipkit train train.resume=latest "$@"
