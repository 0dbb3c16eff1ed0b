"""The keys checked against a registry (model.name, train.loss, export.format) are checked by the package that owns
the registry, and every config load_config returns has passed them, even in an interpreter that imported nothing
but clipkit.config."""
import json
import subprocess
import sys

import pytest

from clipkit.config import ConfigError, load_config
from clipkit.export import EXPORT_FORMATS
from clipkit.losses import LOSS_NAMES

_FRESH = """
import json, sys
from clipkit.config import ConfigError, load_config
out = {}
for item in sys.argv[1:]:
    try:
        load_config(None, [item])
        out[item] = None
    except ConfigError as e:
        out[item] = str(e)
print(json.dumps(out))
"""


def test_a_fresh_interpreter_importing_only_config_refuses_each_registry_key():
    items = ["model.name=ViT-Q-99", "train.loss=triplet", "export.format=tflite", "model.name=ViT-B-32"]
    run = subprocess.run([sys.executable, "-c", _FRESH, *items], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["model.name=ViT-Q-99"].startswith("config key 'model.name': unknown model 'ViT-Q-99'")
    assert out["train.loss=triplet"] == f"config key 'train.loss' must be one of {', '.join(LOSS_NAMES)} (got 'triplet')"
    assert out["export.format=tflite"] == ("config key 'export.format' must be one of "
                                           f"{', '.join(EXPORT_FORMATS)} (got 'tflite')")
    assert out["model.name=ViT-B-32"] is None  # an open_clip architecture passes


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_registered_loss_passes(name):
    assert load_config(None, [f"train.loss={name}"]).train.loss == name


@pytest.mark.parametrize("name", sorted(EXPORT_FORMATS))
def test_every_registered_export_format_passes(name):
    assert load_config(None, [f"export.format={name}"]).export.format == name

