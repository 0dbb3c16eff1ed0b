"""Dual-encoder models: open_clip architectures by name, plus clipkit's own configs (same JSON schema)."""
from .factory import (
    MODEL_CONFIG_DIR,
    ModelNameError,
    ModelNotFoundError,
    create_model,
    create_transforms,
    eval_mode,
    get_model_config,
    get_tokenizer,
    list_models,
    plain_model_name,
    register_model_config,
)
from .trim import TrimmedTextCLIP, set_text_trimming, text_trimming, trim_unsupported
from .validate import validate_model
from .weights import WEIGHTS_FILE, LoadedModel, load_model, save_weights

__all__ = [
    "WEIGHTS_FILE",
    "LoadedModel",
    "MODEL_CONFIG_DIR",
    "ModelNameError",
    "ModelNotFoundError",
    "TrimmedTextCLIP",
    "create_model",
    "create_transforms",
    "eval_mode",
    "get_model_config",
    "get_tokenizer",
    "list_models",
    "load_model",
    "plain_model_name",
    "register_model_config",
    "save_weights",
    "set_text_trimming",
    "text_trimming",
    "trim_unsupported",
    "validate_model",
]
