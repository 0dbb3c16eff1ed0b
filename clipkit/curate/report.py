"""OUT/curate_report.html: counts per stage and reason, each stage's score histogram, and thumbnails of a few
kept and dropped pairs per stage; one self-contained file (images embedded as base64 PNG/JPEG)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..config.schema import CurateConfig
from .result import StageResult

EXAMPLES = 4  # dropped pairs shown per stage (and as many kept ones)
THUMB = 96


def _png_histogram(values: np.ndarray, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 2.6), dpi=80)
    ax.hist(values, bins=40, color="#4c72b0")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _thumbnails(rows: list[int], cols: dict, max_pixels: int | None) -> dict[int, str]:
    """Base64 JPEG thumbnails of these samples, each source shard read once; a sample whose shard or image is gone
    since the scan gets none (a thumbnail is decoration)."""
    from ..data.decode import open_image
    from ..data.skips import SkipCounter
    from ..data.tario import read_shard

    by_shard: dict[str, dict[int, int]] = {}
    for row in rows:
        by_shard.setdefault(str(cols["shard"][row]), {})[int(cols["index"][row])] = row
    thumbs: dict[int, str] = {}
    for url, wanted in by_shard.items():  # read_shard counts an unreadable shard instead of raising
        for i, sample in read_shard(url, SkipCounter(), want=wanted.__contains__, last=max(wanted)):
            row = wanted.get(i)
            member = str(cols["image_member"][row]) if row is not None else None
            if member not in sample:
                continue
            try:
                im = open_image(sample[member], max_pixels).convert("RGB")
            except Exception:  # an image changed since the scan leaves its thumbnail blank
                continue
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            thumbs[row] = base64.b64encode(buf.getvalue()).decode()
    return thumbs


def _pairs(rows: list[int], cols: dict, thumbs: dict[int, str], res: StageResult | None) -> str:
    cells = []
    for i in rows:
        b64 = thumbs.get(i, "")
        img = f'<img src="data:image/jpeg;base64,{b64}">' if b64 else ""
        why = ""
        if res is not None and res.drop[i]:
            why = f"<br><b>{html.escape(str(res.reason[i]))}</b> {html.escape(str(res.detail[i]))}"
        cells.append(f'<div class="pair">{img}<div>{html.escape(str(cols["caption"][i])[:120])}</div>'
                     f'<small>{html.escape(str(cols["key"][i]))}{why}</small></div>')
    return "".join(cells)


def write_report(path: Path, summary: dict, cols: dict, results: list[StageResult], c: CurateConfig) -> None:
    counts = summary["counts"]
    parts = ["<!doctype html><meta charset='utf-8'><title>clipkit curate report</title><style>"
             "body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
             "padding:2px 8px} .pair{display:inline-block;width:170px;vertical-align:top;margin:4px;font-size:12px}"
             "</style><h1>clipkit curate</h1>",
             f"<p>{counts['scanned']} samples scanned in {counts['input_shards']} shards; {counts['kept']} kept in "
             f"{counts['output_shards']} output shards.</p>"]
    if counts["skipped"]:
        parts.append("<p>Skipped while reading: " + ", ".join(f"{html.escape(k)} {v}" for k, v in
                                                             counts["skipped"].items()) + "</p>")
    parts.append("<h2>Counts per stage and reason</h2><table><tr><th>stage</th><th>alive before</th>"
                 "<th>reason</th><th>dropped</th><th>alive after</th></tr>")
    for r in results:
        reasons = counts["stages"][r.stage]["reasons"] or {"": 0}
        for k, v in reasons.items():
            parts.append(f"<tr><td>{r.stage}</td><td>{r.summary.get('alive_before', '')}</td><td>{html.escape(k)}"
                         f"</td><td>{v}</td><td>{r.summary.get('alive_after', '')}</td></tr>")
    parts.append("</table>")
    rng = np.random.default_rng(c.seed)
    alive = np.ones(len(cols["key"]), dtype=bool)
    examples = []  # (dropped, kept) rows shown for each stage
    for r in results:
        dropped, kept = np.flatnonzero(r.drop), np.flatnonzero(alive & ~r.drop)
        examples.append([sorted(rng.choice(idx, min(EXAMPLES, len(idx)), replace=False).tolist()) if len(idx) else []
                         for idx in (dropped, kept)])
        alive &= ~r.drop
    thumbs = _thumbnails(sorted({row for pair in examples for rows in pair for row in rows}), cols,
                         c.max_image_pixels)
    for r, (dropped, kept) in zip(results, examples):
        parts.append(f"<h2>{r.stage}</h2>")
        scores = r.score[np.isfinite(r.score)]
        if len(scores):
            parts.append(f'<img src="data:image/png;base64,{_png_histogram(scores, r.stage + " score")}">')
        if r.stage == "balance" and "counts_before" in r.summary:  # MetaCLIP's entry counts, before and after
            from .balance import plot_entry_counts

            plot = Path(path).with_name("balance_entry_counts.png")
            plot_entry_counts(r.summary["counts_before"], r.summary["counts_after"], plot, t=r.summary.get("t"))
            parts.append(f'<img src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">')
        parts.append("<h3>dropped</h3>" + (_pairs(dropped, cols, thumbs, r) or "<p>none</p>"))
        parts.append("<h3>kept</h3>" + (_pairs(kept, cols, thumbs, None) or "<p>none</p>"))
    atomic_write_text(path, "\n".join(parts))
