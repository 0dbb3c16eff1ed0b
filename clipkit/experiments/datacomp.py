"""The DataComp experiment in miniature: a noisy image-text set trained on as it is ("raw") and after
`clipkit curate` ("curated"), at equal compute, evaluated zero-shot and on image-text retrieval on held-out data.

    python -m clipkit.experiments.datacomp --out OUT [--seeds 3] [--steps 300] [--batch-size 64] ...
        [curate.KEY=VALUE ...]

Every step is a clipkit command, run in this process with the arguments a user would type (all of them are
listed in OUT/experiment.json, in order, so each can be rerun by hand):

1. Data, three seeds apart (`--data-seed` S): `clipkit data synth --noisy` writes the raw set (seed S,
   OUT/data/noisy; its eval/ split, the source of the planted leaks, is not evaluated on); `clipkit data synth`
   the held-out evaluation set (seed S+1, OUT/data/heldout: its eval/ zero-shot split and retrieval/ pairs; its
   training split is one sample, unused) and a clean set for the scorer (seed S+2, OUT/data/scorer), both drawn
   in the noisy set's "photo" style.
2. The scorer: as DataComp scores its pool with a CLIP model trained elsewhere (OpenAI's), `clipkit train` trains
   one on the clean set (OUT/scorer, seed 0, `--scorer-steps`), evaluated on the held-out set too; or `--scorer
   PATH` names one (then the clean set is not written, and `clipkit zeroshot` and `clipkit retrieval-eval`
   evaluate it on the held-out set).
3. `clipkit curate` of the raw set into OUT/curated: the scorer computes the embeddings (CLIP score; semantic
   deduplication and embedding decontamination if switched on), the held-out zero-shot and retrieval sets are
   the decontamination sets, then EXPERIMENT_CURATE and the user's curate.KEY=VALUE overrides (last wins).
4. `clipkit train` on the raw shards and on the curated shards, each for every training seed 0..N-1 (`--seeds`
   N), with the same model, steps, global batch and seed: equal compute (the same number of samples seen; the
   smaller curated set is repeated more often). Each run evaluates its final checkpoint on the held-out
   sets (OUT/runs/{raw,curated}/seedK/zeroshot.json and retrieval.json, CLIP_benchmark's schema).
5. OUT/experiment.json (settings, commands, the curated set's make-up by planted kind, every run's figures, mean
   and sample standard deviation over the seeds, the paired differences) and OUT/experiment.md (a table).

A step whose output is complete is not run again, so an interrupted experiment continues where it stopped; a
rerun with other settings into the same OUT is refused (OUT/settings.json), as nothing could tell which
outputs belong to which settings.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import UserError

FORMAT = "clipkit-datacomp-experiment/1"
ARMS = ("raw", "curated")
ZEROSHOT_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{side}_retrieval_recall@{k}" for k in (1, 5, 10) for side in ("image", "text"))
METRICS = tuple(f"zeroshot_{m}" for m in ZEROSHOT_METRICS) + RETRIEVAL_METRICS
# The experiment's curation, before the user's overrides: the config's defaults, with DataComp's CLIP-score rule
# as a top fraction (a threshold belongs to one model's scale). Semantic deduplication stays off: the small
# scorer's embeddings do not separate copies from other scenes (docs/curation.md, "Measured against the planted
# truth").
EXPERIMENT_CURATE = (
    "curate.score.enabled=true",
    "curate.score.threshold=null",
    "curate.score.top_fraction=0.9",
    "curate.progress=false",
)


@dataclass(frozen=True)
class Settings:
    """What the experiment's figures depend on (OUT/settings.json)."""

    seeds: int = 3
    noisy_samples: int = 4000
    scorer_samples: int = 4000
    eval_samples: int = 600
    image_size: int = 32
    samples_per_shard: int = 500
    model: str = "clipkit-nano"
    steps: int = 300
    batch_size: int = 64
    warmup_steps: int = 20
    scorer_steps: int = 300
    data_seed: int = 1
    scorer: str | None = None  # a model trained elsewhere (any --checkpoint clipkit reads); None: train one
    curate: tuple[str, ...] = field(default_factory=tuple)  # the user's curate.KEY=VALUE overrides

    def check(self) -> None:
        if self.scorer is not None and not Path(self.scorer).exists():
            raise UserError(f"--scorer {self.scorer}: not found")
        for name in ("seeds", "noisy_samples", "scorer_samples", "eval_samples", "samples_per_shard", "steps",
                     "batch_size", "scorer_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps >= min(self.steps, self.scorer_steps):
            raise UserError(f"--warmup-steps must be in [0, steps), got {self.warmup_steps}")
        bad = [o for o in self.curate if not o.startswith("curate.") or "=" not in o]
        if bad:
            raise UserError(f"only curate.KEY=VALUE overrides are accepted after the options, got {' '.join(bad)}")


class Experiment:
    """The experiment's folders and the commands it runs (each in this process, through clipkit's command line)."""

    def __init__(self, out: str | Path, settings: Settings) -> None:
        self.out, self.s = Path(out), settings
        self.noisy, self.heldout, self.clean = (self.out / "data" / n for n in ("noisy", "heldout", "scorer"))
        self.scorer_dir, self.curated = self.out / "scorer", self.out / "curated"
        self.commands: list[list[str]] = []
        self.seconds: dict[str, float] = {}

    def clipkit(self, *argv: str, done: bool = False) -> None:
        """`clipkit ARGV`, recorded, and run unless `done` (its output is complete already); a failure stops the
        experiment with the command named."""
        from ..cli import main

        self.commands.append(["clipkit", *argv])
        if done:
            return
        status = main(list(argv))
        if status != 0:
            raise UserError(f"`clipkit {' '.join(argv)}` failed with exit status {status}")

    def timed(self, name: str, step) -> None:
        started = time.perf_counter()
        step()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 1)

    def claim(self) -> None:
        """OUT/settings.json: written by the first run, compared by every later one."""
        path, mine = self.out / "settings.json", {"format": FORMAT, **asdict(self.s), "curate": list(self.s.curate)}
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != mine:
                changed = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                raise UserError(f"{self.out} holds an experiment with other settings ({', '.join(changed)}); "
                                f"use a new --out")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(mine, indent=1))

    # 1. data
    def write_data(self) -> None:
        s = self.s
        self.clipkit("data", "synth", "--noisy", "--out", str(self.noisy), "--seed", str(s.data_seed),
                     "--train-samples", str(s.noisy_samples), "--samples-per-shard", str(s.samples_per_shard),
                     "--image-size", str(s.image_size), "--eval-samples", str(s.eval_samples),
                     done=(self.noisy / "manifest.json").is_file())
        sets = [(self.heldout, s.data_seed + 1, 1)]  # its training split: one sample, unused
        if not s.scorer:
            sets.append((self.clean, s.data_seed + 2, s.scorer_samples))
        for root, seed, train in sets:
            self.clipkit("data", "synth", "--out", str(root), "--seed", str(seed), "--train-samples", str(train),
                         "--eval-samples", str(s.eval_samples), "--samples-per-shard", str(s.samples_per_shard),
                         "--image-size", str(s.image_size), "--style", "photo", "--downstream-train-samples", "1",
                         "--downstream-test-samples", "1", "--workers", "1", done=(root / "manifest.json").is_file())

    def train_spec(self, root: Path) -> str:
        """The training shards of a dataset root (data synth's manifest) or of a curate output (its manifest)."""
        manifest = json.loads((root / "manifest.json").read_text())
        if "shards" in manifest:  # clipkit curate's
            names = [s["name"] for s in manifest["shards"]]
            if not names:
                raise UserError(f"{root}: curation kept no sample; loosen the curate settings")
            return f"{root}/shards/{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"
        return f"{root}/{manifest['train']}"

    # 2. and 4. training
    def train(self, run_dir: Path, data: Path, seed: int, steps: int) -> dict:
        """`clipkit train` of the experiment's model on DATA's shards, evaluated on the held-out sets at the end;
        its summary (a finished run in run_dir is read, not trained again; an unfinished one is started over)."""
        summary = run_dir / "summary.json"
        done = summary.is_file() and {"zeroshot", "retrieval"} <= set(json.loads(summary.read_text()))
        if not done:
            shutil.rmtree(run_dir, ignore_errors=True)
        s = self.s
        self.clipkit("train", f"run.dir={run_dir}", f"data.train={self.train_spec(data)}", f"model.name={s.model}",
                     f"run.seed={seed}", f"train.steps={steps}", f"train.global_batch_size={s.batch_size}",
                     f"train.warmup_steps={s.warmup_steps}", f"train.checkpoint_every={steps}",
                     f"data.zeroshot={self.heldout / 'eval'}", f"data.retrieval={self.heldout / 'retrieval'}",
                     "data.workers=0", "export.at_end=false", "run.report=false", "run.progress=false", done=done)
        return json.loads(summary.read_text())

    def scorer(self) -> dict:
        """The scorer's checkpoint and its figures on the held-out sets (a summary as a training run writes)."""
        if not self.s.scorer:
            return self.train(self.scorer_dir, self.clean, 0, self.s.scorer_steps)
        out = {"checkpoint": self.s.scorer}
        for task, command, data in (("zeroshot", "zeroshot", "eval"), ("retrieval", "retrieval-eval", "retrieval")):
            path = self.scorer_dir / f"{task}.json"
            self.scorer_dir.mkdir(parents=True, exist_ok=True)
            self.clipkit(command, "--checkpoint", self.s.scorer, "--data", str(self.heldout / data),
                         "--out", str(path), done=path.is_file())
            out[task] = json.loads(path.read_text())["metrics"]
        return out

    # 3. curation
    def curate_args(self, checkpoint: str) -> list[str]:
        sets = f"[{self.heldout / 'eval'},{self.heldout / 'retrieval'}]"
        return [f"curate.model={checkpoint}", f"curate.decontam.eval_sets={sets}", *EXPERIMENT_CURATE,
                *self.s.curate]

    def curate(self, checkpoint: str) -> dict:
        summary = self.curated / "curate_summary.json"
        self.clipkit("curate", "--data", self.train_spec(self.noisy), "--out", str(self.curated),
                     *self.curate_args(checkpoint), done=summary.is_file())
        return json.loads(summary.read_text())

    def make_up(self) -> dict:
        """Samples of each planted kind in the raw set and in the curated set."""
        kinds = {}
        for line in (self.noisy / "planted.jsonl").read_text().splitlines():
            record = json.loads(line)
            kinds[record["key"]] = record["kind"]
        out = {kind: {"raw": 0, "curated": 0} for kind in dict.fromkeys(kinds.values())}
        for kind in kinds.values():
            out[kind]["raw"] += 1
        for shard in json.loads((self.curated / "manifest.json").read_text())["shards"]:
            for sample in shard["samples"]:
                out[kinds[sample["key"]]]["curated"] += 1
        return out


def run_figures(summary: dict) -> dict:
    """The figures of one training run: its checkpoint and every metric of METRICS."""
    figures = {"checkpoint": summary["checkpoint"],
               "train_seconds": round(summary["train_seconds"], 1) if "train_seconds" in summary else None}
    figures.update({f"zeroshot_{m}": summary["zeroshot"][m] for m in ZEROSHOT_METRICS})
    figures.update({m: summary["retrieval"][m] for m in RETRIEVAL_METRICS})
    return figures


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarise(runs: dict[str, dict[str, dict]]) -> dict:
    """Per metric: each arm's mean and std over the seeds, and the paired difference curated - raw (its mean and
    std, and on how many seeds curated is ahead)."""
    seeds = sorted(runs["raw"], key=int)
    out = {}
    for m in METRICS:
        raw = [runs["raw"][k][m] for k in seeds]
        cur = [runs["curated"][k][m] for k in seeds]
        diff = [c - r for c, r in zip(cur, raw)]
        out[m] = {"raw": mean_std(raw), "curated": mean_std(cur), "difference": mean_std(diff),
                  "curated_ahead": sum(d > 0 for d in diff)}
    return out


def _pm(stats: dict, sign: bool = False) -> str:
    mean = f"{stats['mean']:+.3f}" if sign else f"{stats['mean']:.3f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.3f}"


def markdown(result: dict) -> str:
    """OUT/experiment.md: the sizes, the curated set's make-up and the table of figures."""
    s, n = result["settings"], result["summary"]["zeroshot_acc1"]["raw"]["n"]
    kept = result["curation"]["kept"]
    lines = [f"# DataComp in miniature: raw vs curated at equal compute ({n} seed{'s' * (n > 1)})", "",
             f"{s['model']}, {s['steps']} steps x batch {s['batch_size']} on each set; raw {s['noisy_samples']} "
             f"samples, curated {kept}; held-out: {result['heldout']['zeroshot_images']} zero-shot images "
             f"({result['heldout']['classes']} classes), {result['heldout']['retrieval_images']} retrieval images. "
             f"Scorer: zero-shot top-1 {result['scorer']['zeroshot_acc1']:.3f}.", "",
             "| metric | raw | curated | curated - raw | seeds curated ahead |", "|---|---|---|---|---|"]
    for m, st in result["summary"].items():
        lines.append(f"| {m} | {_pm(st['raw'])} | {_pm(st['curated'])} | {_pm(st['difference'], True)} | "
                     f"{st['curated_ahead']}/{n} |")
    lines += ["", "| planted kind | raw | curated |", "|---|---|---|"]
    lines += [f"| {k} | {v['raw']} | {v['curated']} |" for k, v in result["curation"]["make_up"].items()]
    return "\n".join(lines) + "\n"


def run_experiment(out: str | Path, settings: Settings) -> dict:
    """The whole experiment (module docstring); returns what OUT/experiment.json holds."""
    settings.check()
    exp = Experiment(out, settings)
    exp.claim()
    exp.timed("data", exp.write_data)
    scorer: dict = {}
    exp.timed("scorer", lambda: scorer.update(exp.scorer()))
    curation: dict = {}
    exp.timed("curate", lambda: curation.update(exp.curate(scorer["checkpoint"])))
    runs: dict[str, dict[str, dict]] = {arm: {} for arm in ARMS}
    for seed in range(settings.seeds):
        for arm, data in (("raw", exp.noisy), ("curated", exp.curated)):
            exp.timed(f"train_{arm}", lambda: runs[arm].update(
                {str(seed): run_figures(exp.train(exp.out / "runs" / arm / f"seed{seed}", data, seed,
                                                  settings.steps))}))
    heldout = json.loads((exp.heldout / "manifest.json").read_text())["params"]
    result = {"format": FORMAT, "settings": {**asdict(settings), "curate": list(settings.curate)},
              "data": {"raw": exp.train_spec(exp.noisy), "curated": exp.train_spec(exp.curated),
                       "scorer": None if settings.scorer else exp.train_spec(exp.clean),
                       "zeroshot": str(exp.heldout / "eval"),
                       "retrieval": str(exp.heldout / "retrieval")},
              "heldout": {"zeroshot_images": heldout["eval_samples"], "retrieval_images": heldout["retrieval_samples"],
                          "classes": len((exp.heldout / "eval" / "classnames.txt").read_text().strip().splitlines())},
              "scorer": run_figures(scorer),
              "curation": {"args": exp.curate_args(scorer["checkpoint"]), "scanned": curation["counts"]["scanned"],
                           "kept": curation["counts"]["kept"],
                           "dropped": {k: v["dropped"] for k, v in curation["counts"]["stages"].items()},
                           "make_up": exp.make_up()},
              "runs": runs, "summary": summarise(runs), "commands": exp.commands, "seconds": exp.seconds}
    atomic_write_text(exp.out / "experiment.json", json.dumps(result, indent=1))
    atomic_write_text(exp.out / "experiment.md", markdown(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(prog="python -m clipkit.experiments.datacomp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, metavar="DIR", help="where everything goes (see the module docstring)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="training seeds 0..N-1, each trained on both sets")
    p.add_argument("--noisy-samples", type=int, default=d.noisy_samples, help="samples of the raw noisy set")
    p.add_argument("--scorer-samples", type=int, default=d.scorer_samples, help="samples of the scorer's clean set")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help="held-out zero-shot images, and as many retrieval images (at most 900)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--model", default=d.model, help="the architecture trained on both sets and as the scorer")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps on each set")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch of every training run")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--scorer-steps", type=int, default=d.scorer_steps)
    p.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seed S of the raw set; the held-out set takes S+1, the scorer's clean set S+2")
    p.add_argument("--scorer", default=None, metavar="CKPT",
                   help="the CLIP-score model, trained elsewhere (any path `clipkit zeroshot --checkpoint` reads); "
                        "default: train one on a clean set of seed S+2")
    p.add_argument("curate", nargs="*", metavar="curate.KEY=VALUE", help="overrides of the experiment's curation")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings(**{k: v for k, v in vars(args).items() if k not in ("out", "curate")},
                        curate=tuple(args.curate))
    try:
        result = run_experiment(args.out, settings)
    except UserError as e:
        print(f"clipkit: error: {e}", file=sys.stderr)
        return 2
    print(markdown(result), end="")
    print(f"written to {Path(args.out) / 'experiment.json'} and {Path(args.out) / 'experiment.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
