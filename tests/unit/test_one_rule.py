"""One device rule and one image-key default: every command that picks cpu/cuda asks resolve_device, and the
webdataset image members are spelled once, in the config schema."""
import re
from pathlib import Path

import torch

import clipkit
from clipkit.config import DEFAULT_IMAGE_KEY, DataConfig
from clipkit.distributed import DistEnv, resolve_device

ROOT = Path(clipkit.__file__).parent


def _sources():
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in ROOT.rglob("*.py")}


def test_resolve_device_takes_the_request_else_the_ranks_gpu_else_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu"), local_rank=3) == torch.device("cpu")
    gpu = torch.cuda.is_available()
    assert resolve_device() == (torch.device("cuda", 0) if gpu else torch.device("cpu"))
    assert resolve_device(None, local_rank=1) == (torch.device("cuda", 1) if gpu else torch.device("cpu"))


def test_each_rank_gets_its_device_by_the_same_rule():
    assert DistEnv(backend="gloo", local_rank=1).device == torch.device("cpu")
    assert DistEnv(backend="nccl", local_rank=1).device == torch.device("cuda", 1)
    assert DistEnv(local_rank=0).device == resolve_device(None, 0)


def test_no_command_decides_the_device_on_its_own():
    # `"cuda" ... if torch.cuda.is_available() else ...` choosing a device: only resolve_device may say it
    choice = re.compile(r"""["']cuda["'][^\n]*?\bif\s+torch\.cuda\.is_available\(\)""")
    found = [name for name, text in _sources().items() if choice.search(text)]
    assert found == ["distributed/env.py"]


def test_the_image_key_default_is_spelled_once():
    assert DataConfig().image_key == DEFAULT_IMAGE_KEY
    spelled = re.compile(r"""["']jpg;png;webp;jpeg["']""")
    assert [name for name, text in _sources().items() if spelled.search(text)] == ["config/schema.py"]
