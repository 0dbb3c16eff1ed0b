"""finetune-report reads result.json files written before the LR search recorded `at_edge`."""
from clipkit.finetune.report import format_lr_search


def test_lr_search_without_at_edge_is_shown_without_an_edge_note():
    search = {"lr": 0.01, "head_lr": 0.1, "trials": [{"lr": 0.003, "val_acc1": 0.5, "val_loss": 1.0},
                                                      {"lr": 0.01, "val_acc1": 0.75, "val_loss": 0.5}]}
    text = format_lr_search([{"method": "full", "lr_search": search, "run_dir": "runs/full"}])
    lines = text.splitlines()
    assert lines[0] == "LR search, full: chose 0.01 (head 0.1)"
    assert lines[-1].split() == ["0.01", "0.7500", "0.5000", "<-", "chosen"]
