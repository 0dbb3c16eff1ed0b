"""`clipkit finetune-report`: the LR search of each run and the plot of val acc1 over steps, read from
result.json files written in the schema `clipkit finetune` writes (clipkit/finetune/run.py, lr_search.py)."""
import json

import pytest
from PIL import Image

from clipkit.errors import UserError
from clipkit.finetune.report import main, plot_val_curves
from clipkit.finetune.run import write_result


def _metrics(acc1, loss):
    return {"acc1": acc1, "acc5": 1.0, "mean_per_class_recall": acc1, "num_samples": 20, "loss": loss}


def _result(method, history, lr_search=None):
    result = {"method": method, "model": "clipkit-nano", "checkpoint": "ck", "data": "task",
              "splits": {"train": 60, "val": 20, "test": 40, "classes": 6, "val_from_train": False}, "skipped": 0,
              "trainable_params": 100, "total_params": 1000, "trainable_fraction": 0.1,
              "val": _metrics(max((h["val"]["acc1"] for h in history), default=0.5), 1.0),
              "test": _metrics(0.45, 1.1), "zeroshot": {"val": _metrics(0.2, 1.7), "test": _metrics(0.15, 1.8)}}
    if history:
        result.update(lr=lr_search["lr"] if lr_search else 1e-3, head_lr=1e-2, best_step=history[-1]["step"],
                      best_epoch=history[-1]["epoch"], epochs_run=history[-1]["epoch"], steps=history[-1]["step"],
                      stopped_early=False, history=history)
    if lr_search:
        result["lr_search"] = lr_search
    return result


def _history(accs, every=20):
    return [{"step": every * (i + 1), "epoch": i + 1, "loss": 2.0 - 0.1 * i, "val": _metrics(a, 1.5 - 0.05 * i)}
            for i, a in enumerate(accs)]


def _search(lrs, accs, losses, chosen, at_edge):
    return {"lr": chosen, "head_lr": 10 * chosen, "at_edge": at_edge,
            "trials": [{"lr": lr, "head_lr": 10 * lr, "steps": 60, "val_acc1": a, "val_loss": v}
                       for lr, a, v in zip(lrs, accs, losses)]}


@pytest.fixture
def runs(tmp_path):
    results = {
        "full": _result("full", _history([0.3, 0.55, 0.6, 0.65]),
                        _search([1e-5, 1e-4, 1e-3], [0.2, 0.45, 0.35], [1.7, 1.2, 1.4], 1e-4, False)),
        "lora": _result("lora", _history([0.25, 0.4, 0.5], every=30),
                        _search([1e-4, 1e-3, 1e-2], [0.3, 0.4, 0.5], [1.5, 1.3, 1.1], 1e-2, True)),
        "linear_probe": _result("linear_probe", []),
    }
    for name, result in results.items():
        (tmp_path / "ft" / name).mkdir(parents=True)
        write_result(tmp_path / "ft" / name, result)
    return tmp_path, results


def test_report_shows_each_lr_search_and_plots_val_over_steps(runs, capsys):
    tmp_path, results = runs
    assert main([str(tmp_path / "ft"), "--out", str(tmp_path / "r.json")]) == 0
    table = {row["method"]: row for row in json.loads((tmp_path / "r.json").read_text())}
    # the search as each run recorded it, every figure
    assert table["full"]["lr_search"] == results["full"]["lr_search"]
    assert table["lora"]["lr_search"] == results["lora"]["lr_search"]
    assert table["linear_probe"]["lr_search"] is None and table["zero-shot"]["lr_search"] is None
    out = capsys.readouterr().out
    assert "LR search, full: chose 0.0001 (head 0.001)\n" in out
    assert "      0.0001    0.4500    1.2000  <- chosen" in out and "       1e-05    0.2000    1.7000\n" in out
    assert "LR search, lora: chose 0.01 (head 0.1)  (at the edge of the grid" in out
    assert "LR search, linear_probe" not in out
    # the plot, by default beside the runs: a PNG with one line per trained run, its val acc1 over its steps
    png = tmp_path / "ft" / "report.png"
    with Image.open(png) as image:
        assert image.format == "PNG"
        image.verify()
    fig = plot_val_curves(sorted(results.values(), key=lambda r: r["method"] != "full"), tmp_path / "again.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"full", "lora", "zero-shot"}
    for method in ("full", "lora"):
        history = results[method]["history"]
        assert list(lines[method].get_xdata()) == [h["step"] for h in history]
        assert list(lines[method].get_ydata()) == [h["val"]["acc1"] for h in history]
    assert list(lines["zero-shot"].get_ydata()) == [0.2, 0.2]


def test_report_plot_path_and_runs_without_history(runs):
    tmp_path, results = runs
    assert main([str(tmp_path / "ft"), "--plot", str(tmp_path / "plots" / "ft.png")]) == 0
    with Image.open(tmp_path / "plots" / "ft.png") as image:
        assert image.format == "PNG"
    # a linear probe alone validated nothing during training: no plot, the table still prints
    assert plot_val_curves([results["linear_probe"]], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(UserError, match="no fine-tune result"):
        main([str(tmp_path / "plots")])
