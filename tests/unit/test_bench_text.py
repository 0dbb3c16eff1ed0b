"""`clipkit bench text` at a small size: the three methods run the same training step, the trimmed one gives
the full-length loss, does less work where the batch's captions are shorter than the context, and the report
holds every figure it promises. The speed itself is measured by the benchmark, not asserted here."""
import json

import open_clip

from clipkit.bench import text


def test_web_captions_have_a_long_tail():
    words = sorted(len(c.split()) for c in text.web_captions(2000, seed=0))
    assert words[1000] == 11 and 24 <= words[1900] <= 34 and words[-1] <= 63


def test_bench_text_reports_the_three_methods(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    assert text.main(["--model", "clipkit-tiny", "--batch-size", "8", "--batches", "2", "--repeats", "1", "--threads",
                      "1", "--captions", "64", "--buckets", "8,12", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    methods = {"full", "trim", "trim+buckets"}
    assert set(report["step_seconds"]) == methods and all(v > 0 for v in report["step_seconds"].values())
    assert report["loss_difference_trim_vs_full"] < 1e-5
    longest_mean = report["mean_longest_caption_per_batch"]
    assert longest_mean["bucketed"] <= longest_mean["plain"]
    flops, longest = report["gflop_per_step"], report["timed_batches_longest"]
    assert longest["trim"] == longest["full"] and flops["trim"] <= flops["full"]  # same batches, never more work
    assert report["matmul_peak_gflop_s"] > 0 and set(report["mfu"]) == methods
    tokens = open_clip.get_tokenizer("clipkit-tiny")(text.web_captions(64, 0))
    assert report["captions"]["tokens_max"] == int(tokens.argmax(-1).max()) + 1
    # the profile: every phase of the step took time, and the phases fit inside the profiled step
    prof = report["profile_trim"]
    phases = prof["phase_seconds_per_step"]
    assert set(phases) == {"forward", "loss", "backward", "grad_norm", "optimizer"} and all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= prof["step_seconds_profiled"] * 1.05
    assert 0 < prof["matmul_attention_conv_seconds_per_step"] < prof["step_seconds_profiled"]
    assert len(prof["top_ops_self_seconds_per_step"]) == 15
