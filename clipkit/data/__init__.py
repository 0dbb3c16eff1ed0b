"""Data: shard specs, the streaming webdataset pipeline with exact resume, the built-in synthetic
dataset."""
from .decode import DEFAULT_MAX_IMAGE_PIXELS
from .pipeline import Batch, ShardStream, SkipCounter, build_labelled_loader, build_train_loader
from .shards import ShardSpecError, expand_shards, expand_sources, open_shard
from .state import StreamPosition, StreamState, StreamStateError
from .synth import SynthDataset, downstream_class_names, ensure_synth_dataset, write_synth_dataset

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "Batch",
    "ShardSpecError",
    "ShardStream",
    "SkipCounter",
    "StreamPosition",
    "StreamState",
    "StreamStateError",
    "SynthDataset",
    "build_labelled_loader",
    "build_train_loader",
    "downstream_class_names",
    "ensure_synth_dataset",
    "expand_shards",
    "expand_sources",
    "open_shard",
    "write_synth_dataset",
]
