"""The model section of a run config, checked by the package that owns the architectures (clipkit/__init__.py
composes it into config validation, so config imports no model code)."""
from ..config import ConfigError, ModelConfig
from .factory import ModelNotFoundError, get_model_config
from .towers import TowerError, with_tower_files


def validate_model(model: ModelConfig) -> None:
    """The run config's model.name names an architecture this registry knows, and tower weights fit the kind of
    tower it configures (with model.pretrained the source's architecture decides, checked when it is read);
    else ConfigError naming the key."""
    try:
        model_cfg = get_model_config(model.name)
    except ModelNotFoundError as e:
        raise ConfigError(f"config key 'model.name': {e}") from None
    if model.pretrained is not None or (model.pretrained_image is None and model.pretrained_text is None):
        return
    try:
        with_tower_files(model_cfg, model.pretrained_image, model.pretrained_text)
    except TowerError as e:
        raise ConfigError(str(e)) from None
