"""Experiments that compose clipkit's commands into one measurement (each a module run with `python -m`).

- `clipkit.experiments.datacomp`: the DataComp experiment in miniature, a noisy image-text set trained on as it
  is and after `clipkit curate`, at equal compute (docs/curation.md).
"""
