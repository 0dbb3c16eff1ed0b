"""Typed run configuration: the schema (dataclasses and their defaults), loading (YAML and dotted overrides) and
validation, in that order of dependence. Config imports nothing else of clipkit: the packages that own a registry
(models, losses, export) check their own keys, registered at the top of clipkit (clipkit/__init__.py).

    cfg = load_config("my.yaml", ["train.global_batch_size=64", "model.name=ViT-B-32"])
"""
from .load import config_from_dict, config_to_dict, load_config, save_config
from .schema import (DEFAULT_IMAGE_KEY, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_TILE_SIZE, FINETUNE_METHODS, OPTIMIZER_IMPLS,
                     PRECISIONS, RENAMED, WISE_METHODS, Config, ConfigError, DataConfig, DeepSpeedConfig, DistConfig,
                     EvalConfig, ExportConfig, FinetuneConfig, FSDPConfig, LinearProbeConfig, LoraConfig, LrSearchConfig,
                     ModelConfig, RunConfig, SynthConfig, TrainConfig, WiseConfig)
from .validate import lora_targets, parse_alphas, parse_lrs, register_check, validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "DistConfig", "EvalConfig", "ExportConfig",
    "FinetuneConfig", "FSDPConfig", "LinearProbeConfig", "LoraConfig", "LrSearchConfig", "ModelConfig", "RunConfig", "SynthConfig",
    "TrainConfig", "WiseConfig",
    "DEFAULT_IMAGE_KEY", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_TILE_SIZE", "FINETUNE_METHODS", "OPTIMIZER_IMPLS",
    "PRECISIONS", "RENAMED", "WISE_METHODS",
    "config_from_dict", "config_to_dict", "load_config", "lora_targets", "parse_alphas", "parse_lrs",
    "register_check", "save_config", "validate",
]
