"""What a curation stage returns: one decision per sample, over the arrays of every sample in the set."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StageResult:
    """A stage's decisions over N samples (the set's samples in one fixed order).

    A stage only drops samples that were alive when it ran (`drop & ~alive` is all False). `reason` holds a short
    token for each dropped sample ("" where kept), `detail` what the reason refers to (the key of the sample kept
    in its place, the evaluation set matched, the metadata entry; "" where nothing), `score` the stage's number
    for each sample it scored (NaN where it scored none). `summary` holds JSON-able facts for the report
    (counts per reason, thresholds used, per-evaluation-set counts, entry counts).
    """

    stage: str
    drop: np.ndarray  # bool [N]
    reason: np.ndarray  # object (str) [N]
    detail: np.ndarray  # object (str) [N]
    score: np.ndarray  # float32 [N]
    summary: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, stage: str, n: int) -> "StageResult":
        return cls(stage, np.zeros(n, dtype=bool), np.full(n, "", dtype=object), np.full(n, "", dtype=object),
                   np.full(n, np.nan, dtype=np.float32))

    def check(self, alive: np.ndarray) -> "StageResult":
        """Raise if the arrays disagree in length or a sample not alive on entry was dropped."""
        n = len(alive)
        for name in ("drop", "reason", "detail", "score"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"stage {self.stage}: {name} has {len(getattr(self, name))} rows for {n} samples")
        if np.any(self.drop & ~alive):
            raise ValueError(f"stage {self.stage} dropped samples an earlier stage had already dropped")
        return self
