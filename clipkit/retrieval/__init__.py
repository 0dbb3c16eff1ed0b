"""Retrieval: image and text embeddings of shards in clip-retrieval's layout, and what is built on them.

Submodules are imported on use (`from clipkit.retrieval.embed import embed_shards`): this package imports
nothing heavy by itself.
"""
