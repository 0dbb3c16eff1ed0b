"""clipkit: CLIP-style contrastive image-text pretraining at scale.

Sub-packages, in the order data flows: data -> models -> losses -> distributed -> training ->
evaluation / export. `clipkit.cli` is a thin command line over them; `clipkit.config` is the schema every
layer reads and imports none of them.
"""
__version__ = "0.1.0"

from .config import Config, register_check  # noqa: E402  (config imports only yaml: cheap to import here)


# The keys checked against a registry are checked by the package that owns it. They are composed here, at the
# top, so that every config load_config returns has passed them and config itself imports none of the owners;
# each owner is imported when a config is validated (models and export pull in open_clip and torch).
def _check_model(cfg: Config) -> None:
    from .models import validate_model

    validate_model(cfg.model)


def _check_loss(cfg: Config) -> None:
    from .losses import validate_loss

    validate_loss(cfg.train)


def _check_export(cfg: Config) -> None:
    from .export import validate_export

    validate_export(cfg.export)


for _check in (_check_model, _check_loss, _check_export):
    register_check(_check)
del _check
