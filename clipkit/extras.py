"""The optional parts of clipkit: each is an extra of the package, imported only by the command that needs it.

A missing one is a user error with one line that names the extra to install, instead of a traceback from
deep inside a command. The table mirrors setup.py's OPTIONAL extras (tests/test_dependencies.py checks that
the two agree).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import UserError

# import name -> the extra that installs it
EXTRA_OF_MODULE = {
    "deepspeed": "deepspeed",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "peft": "lora",
    "faiss": "retrieval",
    "fastapi": "retrieval",
    "starlette": "retrieval",
    "pydantic": "retrieval",
    "uvicorn": "retrieval",
    "imagehash": "curate",
    "ahocorasick": "curate",
    "lingua": "curate",
}


class MissingExtraError(UserError):
    """An optional dependency a command needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (a package of one of clipkit's extras) for `purpose`, or fail with one line naming the extra."""
    top = module.split(".")[0]
    extra = EXTRA_OF_MODULE[top]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or top
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra ({missing} is not installed): pip install 'clipkit[{extra}]'"
        ) from None


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (deepspeed takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_config(cfg) -> None:
    """Fail before a run starts (one line) when its config asks for an extra that is not installed."""
    needs = []
    if cfg.deepspeed.enabled:
        needs.append(("deepspeed", "deepspeed.enabled=true"))
    if cfg.export.format == "onnx":
        needs += [(m, "export.format=onnx") for m in ("onnx", "onnxruntime", "onnxscript")]
    if cfg.finetune.method == "lora":
        needs.append(("peft", "finetune.method=lora"))
    for module, purpose in needs:
        if not installed(module):
            extra = EXTRA_OF_MODULE[module]
            raise MissingExtraError(
                f"{purpose} needs the '{extra}' extra ({module} is not installed): pip install 'clipkit[{extra}]'")
