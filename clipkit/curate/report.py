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


def _thumbnail(url: str, index: int, image_member: str, max_pixels: int | None) -> str:
    from ..data.decode import open_image
    from ..data.skips import SkipCounter
    from ..data.tario import read_shard

    for i, sample in read_shard(url, SkipCounter(), want=lambda j: j == index, last=index):
        if i == index and image_member in sample:
            im = open_image(sample[image_member], max_pixels).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            return base64.b64encode(buf.getvalue()).decode()
    return ""


def _pairs(rows: list[int], cols: dict, c: CurateConfig, res: StageResult | None) -> str:
    cells = []
    for i in rows:
        try:
            b64 = _thumbnail(str(cols["shard"][i]), int(cols["index"][i]), str(cols["image_member"][i]),
                             c.max_image_pixels)
        except Exception:  # a thumbnail is decoration: a source gone since the scan leaves it blank
            b64 = ""
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
    n = len(cols["key"])
    alive = np.ones(n, dtype=bool)
    for r in results:
        parts.append(f"<h2>{r.stage}</h2>")
        scores = r.score[np.isfinite(r.score)]
        if len(scores):
            parts.append(f'<img src="data:image/png;base64,{_png_histogram(scores, r.stage + " score")}">')
        if r.stage == "balance" and "counts_before" in r.summary:  # MetaCLIP's entry counts, before and after
            from .balance import plot_entry_counts

            plot = Path(path).with_name("balance_entry_counts.png")
            plot_entry_counts(r.summary["counts_before"], r.summary["counts_after"], plot, t=r.summary.get("t"))
            parts.append(f'<img src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">')
        dropped = np.flatnonzero(r.drop)
        kept = np.flatnonzero(alive & ~r.drop)
        pick = lambda idx: sorted(rng.choice(idx, min(EXAMPLES, len(idx)), replace=False).tolist()) if len(idx) else []
        parts.append("<h3>dropped</h3>" + (_pairs(pick(dropped), cols, c, r) or "<p>none</p>"))
        parts.append("<h3>kept</h3>" + (_pairs(pick(kept), cols, c, None) or "<p>none</p>"))
        alive &= ~r.drop
    atomic_write_text(path, "\n".join(parts))
