"""Data: shard specs, the streaming webdataset pipeline, and the built-in synthetic dataset."""
from .pipeline import Batch, ShardStream, SkipCounter, build_labelled_loader, build_train_loader
from .shards import ShardSpecError, expand_shards, open_shard
from .synth import SynthDataset, ensure_synth_dataset, write_synth_dataset

__all__ = [
    "Batch",
    "ShardSpecError",
    "ShardStream",
    "SkipCounter",
    "SynthDataset",
    "build_labelled_loader",
    "build_train_loader",
    "ensure_synth_dataset",
    "expand_shards",
    "open_shard",
    "write_synth_dataset",
]
