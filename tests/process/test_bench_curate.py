"""`clipkit bench curate` at a tiny size: the scan, the stages asked for and `clipkit embed` each run in their own
process over every photo of the shards, and the report holds every figure it promises. Speed and memory are what
the benchmark measures, not asserted here. The stages left out of --stages (decode_filters, embedding, decontam,
write) run through the same worker path; one process each would only add start-up time."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from helpers import process_env

STAGES = ["hashing", "hash_dedup", "semantic_dedup", "clip_score", "balance"]


def _photos(tars: list[Path]) -> int:
    """Samples in the shards, counted from the tar members (not from the benchmark)."""
    count = 0
    for path in tars:
        with tarfile.open(path) as tar:
            count += sum(name.endswith(".jpg") for name in tar.getnames())
    return count


def test_bench_curate_runs_each_stage_over_every_sample_beside_clipkit_embed(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "clipkit", "bench", "curate", "--model", "clipkit-nano", "--sizes",
                           "12", "--per-shard", "6", "--stages", ",".join(STAGES), "--batch-size", "8",
                           "--eval-images", "2", "--workers", "1", "--threads", "1", "--repeats", "1",
                           "--cache", str(tmp_path / "data"), "--out", str(out)],
                          capture_output=True, text=True, env=process_env(CLIPKIT_CACHE=str(tmp_path / "cache")),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {"benchmark", "command", "config", "machine", "stages", "throughput", "memory"} <= set(report)
    assert report["config"]["stages"] == STAGES and report["config"]["sizes"] == [12]
    assert "clipkit bench curate --model clipkit-nano" in report["command"]
    spec = Path(report["config"]["shards"]["12"]).expanduser()
    tars = sorted(spec.parent.glob("*.tar"))
    assert spec.name == "{00000..00001}.tar" and [t.name for t in tars] == ["00000.tar", "00001.tar"]
    assert _photos(tars) == 12

    stages = report["stages"]
    assert list(stages) == ["scan", *STAGES, "clipkit_embed"]
    for name, stage in stages.items():
        at = stage["sizes"]["12"]
        assert at["samples"] == 12, name  # every stage, the scan and clipkit embed saw every input sample
        assert len(at["seconds"]) == 1 and at["seconds_median"] > 0
        assert at["samples_per_s_median"] == 12 / at["seconds_median"]
        assert at["samples_per_s_per_core"] == at["samples_per_s_median"] / stage["cores"]
        assert at["samples_per_cpu_second_median"] is None or at["samples_per_cpu_second_median"] > 0
    assert all(stages[s]["cores"] == 1 for s in ["scan", *STAGES])
    assert stages["clipkit_embed"]["cores"] == 2  # one loader process beside one model thread, as bench embed
    assert stages["scan"]["sizes"]["12"]["embedding_dim"] > 0
    for name in ("hash_dedup", "semantic_dedup", "clip_score", "balance"):
        at = stages[name]["sizes"]["12"]
        assert 0 <= at["dropped"] <= 12 and at["held_input_bytes"] > 0
    assert stages["semantic_dedup"]["sizes"]["12"]["clusters"] == round(12 ** 0.5)

    rates = report["throughput"]["stages"]
    embed = rates["clipkit_embed"]["samples_per_s_per_core"]
    assert rates["clipkit_embed"]["per_core_over_embed"] == 1.0
    embed_cpu = rates["clipkit_embed"]["samples_per_cpu_second_median"]
    assert rates["clipkit_embed"]["per_cpu_second_over_embed"] == 1.0 and embed_cpu > 0
    for name in STAGES:
        assert rates[name]["per_core_over_embed"] == rates[name]["samples_per_s_per_core"] / embed
        cpu = rates[name]["samples_per_cpu_second_median"]  # None where the stage took under the CPU clock's tick
        assert rates[name]["per_cpu_second_over_embed"] == (None if cpu is None else cpu / embed_cpu)
    for name in ["scan", *STAGES]:
        growth = report["memory"][name]["peak_rss_growth_bytes"]["12"]
        assert report["machine"]["peak_rss_reset"] is False or isinstance(growth, int)
        assert report["memory"][name]["growth_bytes_per_sample"] is None  # one size: no slope
    assert "per core / clipkit embed" in proc.stdout
