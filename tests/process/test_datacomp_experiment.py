"""`python -m clipkit.experiments.datacomp` end to end at a toy size with one seed, as a user runs it (its scorer
the session's trained clipkit-nano, as DataComp's comes from elsewhere): experiment.json holds every part; each
run's figures are what `clipkit zeroshot` and `clipkit retrieval-eval` report when they load its checkpoint again;
the summary is the runs' figures and their difference; the curated set's make-up adds up to the raw set's planted
kinds and to the samples in the curated shards, read with plain tarfile; the commands it lists are the ones that
made its outputs; a rerun keeps every output and other settings into the same folder are refused. Whether
curation wins is the measurement in docs/curation.md, not checked here."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import yaml

from helpers import ROOT, process_env

from clipkit import cli
from clipkit.experiments.datacomp import ARMS, METRICS, RETRIEVAL_METRICS, ZEROSHOT_METRICS

TOY = ["--seeds", "1", "--noisy-samples", "120", "--eval-samples", "30", "--samples-per-shard", "60",
       "--steps", "3", "--batch-size", "8", "--warmup-steps", "1"]


def _experiment(out, scorer, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipkit.experiments.datacomp", "--out", str(out), *TOY,
                           "--scorer", str(scorer), *extra], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=process_env())


@pytest.fixture(scope="module")
def experiment(trained_nano, tmp_path_factory):
    out = tmp_path_factory.mktemp("datacomp") / "exp"
    done = _experiment(out, trained_nano[0])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, trained_nano[0], done.stdout


def _cli_metrics(tmp_path, capsys, *argv: str) -> dict:
    """The metrics a clipkit evaluation command writes, run as `clipkit ARGV --out FILE`."""
    out = tmp_path / f"{argv[0]}_{len(list(tmp_path.iterdir()))}.json"
    assert cli.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())["metrics"]


def test_every_figure_is_what_the_evaluation_commands_report(experiment, tmp_path, capsys, one_thread):
    out, _, _ = experiment
    result = json.loads((out / "experiment.json").read_text())
    heldout = out / "data" / "heldout"
    assert set(result["runs"]) == set(ARMS) and all(set(result["runs"][arm]) == {"0"} for arm in ARMS)
    for arm in ARMS:
        run = result["runs"][arm]["0"]
        assert set(METRICS) <= set(run)
        zeroshot = _cli_metrics(tmp_path, capsys, "zeroshot", "--checkpoint", run["checkpoint"],
                                "--data", str(heldout / "eval"))
        retrieval = _cli_metrics(tmp_path, capsys, "retrieval-eval", "--checkpoint", run["checkpoint"],
                                 "--data", str(heldout / "retrieval"))
        for m in ZEROSHOT_METRICS:
            assert run[f"zeroshot_{m}"] == pytest.approx(zeroshot[m], abs=1e-9), (arm, m)
        for m in RETRIEVAL_METRICS:
            assert run[m] == pytest.approx(retrieval[m], abs=1e-9), (arm, m)
        assert zeroshot["num_samples"] == 30 and retrieval["num_images"] == 30
    for m in METRICS:
        raw, cur = result["runs"]["raw"]["0"][m], result["runs"]["curated"]["0"][m]
        stats = result["summary"][m]
        assert stats["raw"] == {"mean": raw, "std": None, "n": 1}
        assert stats["curated"] == {"mean": cur, "std": None, "n": 1}
        assert stats["difference"]["mean"] == pytest.approx(cur - raw, abs=1e-12)
        assert stats["curated_ahead"] == int(cur > raw)
    table = (out / "experiment.md").read_text()
    assert all(f"| {m} | {result['runs']['raw']['0'][m]:.3f} |" in table for m in METRICS)


def _samples(spec_root) -> list[str]:
    keys = []
    for shard in sorted(spec_root.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return keys


def test_the_runs_train_on_the_sets_the_make_up_counts(experiment):
    out, scorer, _ = experiment
    result = json.loads((out / "experiment.json").read_text())
    planted = [json.loads(line) for line in (out / "data" / "noisy" / "planted.jsonl").read_text().splitlines()]
    kind = {r["key"]: r["kind"] for r in planted}
    curated = _samples(out / "curated" / "shards")
    make_up = result["curation"]["make_up"]
    assert {k: v["raw"] for k, v in make_up.items()} == dict(Counter(kind.values()))
    assert {k: v["curated"] for k, v in make_up.items() if v["curated"]} == dict(Counter(kind[k] for k in curated))
    assert result["curation"]["kept"] == len(curated) and result["curation"]["scanned"] == 120
    assert f"curate.model={scorer}" in result["curation"]["args"]
    assert result["scorer"]["checkpoint"] == str(scorer)
    for arm, data in (("raw", out / "data" / "noisy" / "train"), ("curated", out / "curated" / "shards")):
        config = yaml.safe_load((out / "runs" / arm / "seed0" / "config.yaml").read_text())
        assert config["data"]["train"].startswith(f"{data}/") and config["model"]["name"] == "clipkit-nano"
        assert (config["train"]["steps"], config["train"]["global_batch_size"], config["run"]["seed"]) == (3, 8, 0)
        assert result["runs"][arm]["0"]["checkpoint"].endswith("step_00000003")
    trains = [c for c in result["commands"] if c[1] == "train"]
    assert [c[2] for c in trains] == [f"run.dir={out / 'runs' / arm / 'seed0'}" for arm in ARMS]
    assert [c[1] for c in result["commands"]] == ["data", "data", "zeroshot", "retrieval-eval", "curate",
                                                  "train", "train"]


def test_a_rerun_keeps_every_output_and_other_settings_are_refused(experiment):
    out, scorer, _ = experiment
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".md"
              and p.name != "experiment.json"}
    again = _experiment(out, scorer)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    first = json.loads((out / "experiment.json").read_text())
    assert len(first["commands"]) == 7  # every command is listed, run now or before
    refused = _experiment(out, scorer, "--steps", "4")
    assert refused.returncode == 2 and "other settings (steps)" in refused.stderr
