"""`clipkit bench train --compile model`: the compiled clipkit run's command, and its compile figures read from
a metrics.jsonl (the seconds that fell in the timed steps taken out of its samples/s)."""
import json

import pytest

from clipkit.bench.train import clipkit_command, compile_figures, parse_args


def test_compile_adds_a_compiled_clipkit_run(tmp_path):
    assert "clipkit_compile" not in parse_args([]).methods
    args = parse_args(["--compile", "model", "--buckets", "", "model.trim_text=false"])
    assert args.methods == ("clipkit", "clipkit_compile", "openclip")
    compiled = clipkit_command(args, "s.tar", tmp_path, compile_mode="model")
    assert compiled[-2:] == ["train.compile=model", "model.trim_text=false"]  # the user's overrides still win
    assert not any(a.startswith("train.compile") for a in clipkit_command(args, "s.tar", tmp_path))


def test_compile_figures_take_the_timed_steps_compile_out(tmp_path):
    # 6 steps, 2 skipped: steps 3, 4, 5 are timed (step 6's end is not observed). Compiles at steps 1, 2 and 4.
    windows = {1: 100.0, 2: 40.0, 3: 0.0, 4: 30.0, 5: 0.0, 6: 5.0}
    total, lines = 0.0, []
    for step, seconds in windows.items():
        total += seconds
        lines.append(json.dumps({"step": step, "loss": 1.0, "compile": {
            "graphs": 2 + (step >= 2) + (step >= 4), "recompiles": (step >= 2) + (step >= 4), "seconds": total,
            "window_seconds": seconds}}))
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    steady = {"steps_timed": 3, "samples_timed": 96, "seconds": 90.0}
    figures = compile_figures(path, 2, steady)
    assert figures["compile"] == {"graphs": 4, "recompiles": 2, "seconds": 175.0, "seconds_in_timed_steps": 30.0}
    assert figures["samples_per_s_without_compile"] == pytest.approx(96 / 60.0)
    path.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert compile_figures(path, 2, steady) == {}  # an eager run
