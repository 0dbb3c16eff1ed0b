"""clipkit: CLIP-style contrastive image-text pretraining at scale.

Sub-packages, in the order data flows: data -> models -> losses -> distributed -> training ->
evaluation / export. `clipkit.cli` is a thin command line over them.
"""
__version__ = "0.1.0"
