"""`clipkit config` as a user runs it: a real process printing the resolved config."""
import subprocess
import sys

import yaml

from clipkit.config import config_from_dict, load_config


def test_cli_config_prints_the_resolved_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clipkit", "config", "train.lr=0.25", "model.name=RN50"],
                          capture_output=True, text=True, check=True)
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["lr"] == 0.25 and printed["model"]["name"] == "RN50"
    assert config_from_dict(printed) == load_config(None, ["train.lr=0.25", "model.name=RN50"])
