#!/usr/bin/env bash
# The main job: train clipkit-tiny-rn on the built-in dataset, evaluate zero-shot and retrieval, export; then adapt
# it to the built-in downstream task with every fine-tuning method and print them against zero-shot.
# Extra arguments are passed to `clipkit train` (a YAML file and/or dotted overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
. launch/env.sh
# train.resume=latest: running it again continues (or, once finished, re-evaluates and re-exports) the run.
clipkit train train.resume=latest "$@"

# Where that run and its dataset are (the same config, resolved).
read -r run_dir synth_dir < <(clipkit config "$@" | python -c \
    'import sys, yaml; c = yaml.safe_load(sys.stdin); print(c["run"]["dir"], c["data"]["synth"]["out"])')
finetune_dir="$run_dir/finetune"
for method in linear_probe full wise lora; do
    out="$finetune_dir/$method"
    [ -f "$out/result.json" ] && continue  # done by an earlier run of this script
    extra=()
    case "$method" in
        # WiSE-FT interpolates towards the full fine-tune just made, instead of training it again.
        wise) extra=("finetune.wise.finetuned=$finetune_dir/full") ;;
        lora) extra=("finetune.lr=3e-3") ;;
    esac
    clipkit finetune --checkpoint "$run_dir" --data "$synth_dir/downstream" --method "$method" --out "$out" \
        launch/configs/finetune_synth.yaml ${extra[@]+"${extra[@]}"}
done
echo
echo "Built-in downstream task (how the shapes are filled; no pretraining caption names it):"
clipkit finetune-report "$finetune_dir" --out "$finetune_dir/report.json"
