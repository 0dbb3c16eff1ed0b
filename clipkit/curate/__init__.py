"""Curation: from raw image-text pairs to a training set (`clipkit curate`).

Stages run in a fixed order, each optional: basic filters, exact and near duplicates, semantic deduplication,
decontamination against evaluation sets, CLIP-score filtering, MetaCLIP balancing; then the kept samples are
written. Every stage records a decision per sample (kept or dropped, the reason, the score). docs/curation.md
describes each stage, its defaults and how a billion-sample run is laid out.

The stages are functions over per-sample arrays (clipkit.curate.result.StageResult); reading shards, computing
the features they need, and writing decisions and shards are the run's business (clipkit.curate.run).
"""
