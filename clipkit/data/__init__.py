"""Data: shard specs, the streaming webdataset pipeline with exact resume, the built-in synthetic
dataset."""
from .decode import DEFAULT_MAX_IMAGE_PIXELS
from .eval_loaders import build_labelled_loader
from .loader import build_train_loader, repartition_train_states
from .sample import Batch
from .shards import ShardSpecError, expand_shards, expand_sources, open_shard
from .skips import SkipCounter
from .state import StreamPosition, StreamState, StreamStateError, repartition
from .stream import NoUsableSamples, ShardStream
from .synth import SynthDataset, downstream_class_names, ensure_synth_dataset, write_synth_dataset

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "Batch",
    "NoUsableSamples",
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
    "repartition",
    "repartition_train_states",
    "write_synth_dataset",
]
