"""Counting what the loader skips, by reason, so bad data never stops a run nor vanishes silently.

Reasons (the keys of Batch.skipped, summed by the trainer into metrics.jsonl and summary.json):

    shard_open_error    a shard that could not be opened (unreachable URL, missing object, failed pipe)
    tar_read_error      a tar cut short (inside a member, inside a header, or without its end-of-archive
                        blocks) or damaged: the samples before the damage are kept, the shard counts once
    empty_shard         a shard with no samples
    missing_image       a sample without any of the image keys
    missing_caption     a sample without the caption (or label) key
    caption_not_utf8    a caption that is not valid UTF-8
    empty_caption       a caption that is empty or only whitespace
    image_decode_error  corrupt or truncated image data
    image_too_large     an image above the pixel limit (decompression-bomb guard)
    bad_label           a classification label that is not an integer
"""
from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("clipkit.data")

# Every skip is logged with its key or URL; after this many of one reason in one worker, further
# ones go to DEBUG so that a bad source cannot flood the log of a long run.
LOUD_SKIPS_PER_REASON = 20


class SkipCounter:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.logged: Counter[str] = Counter()
        # While a resumed stream re-reads data it had already passed, nothing is counted twice.
        self.muted = False

    def skip(self, reason: str, where: str, detail: object = "") -> None:
        if self.muted:
            return
        self.counts[reason] += 1
        self.logged[reason] += 1
        if self.logged[reason] <= LOUD_SKIPS_PER_REASON:
            tail = " (further ones of this reason are logged at DEBUG)" \
                if self.logged[reason] == LOUD_SKIPS_PER_REASON else ""
            log.warning("skipped %s (%s): %s%s", where, reason, detail, tail)
        else:
            log.debug("skipped %s (%s): %s", where, reason, detail)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out
