"""`clipkit bench serve` at a tiny count: its JSON has every run and figure, good queries see no error, and each
hostile request kind is refused with its status (413 for an oversize chunked body and a decompression bomb,
400 for EPS and garbage)."""
import json

from clipkit.cli import main as cli


def test_bench_serve_tiny(tmp_path, capsys):
    out = tmp_path / "bench_serve.json"
    assert cli(["bench", "serve", "--model", "clipkit-nano", "--samples", "40", "--clients", "1,3", "--queries", "12",
                "--bad-body-mb", "40", "--cache", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("clipkit bench serve")
    assert set(result) >= {"config", "machine", "server", "runs", "checks"}
    assert [(r["mix"], r["clients"]) for r in result["runs"]] == [(m, c) for m in ("good", "mixed", "mixed-again")
                                                                  for c in (1, 3)]
    for run in result["runs"]:
        good = run["good"]
        assert good["count"] == 12 and good["errors"] == 0, run
        assert good["text"]["count"] == good["image"]["count"] == 6
        assert 0 < good["p50_ms"] <= good["p99_ms"] and good["queries_per_s"] > 0
        assert run["server_rss_peak_mb"] > 0 and run["server_rss_end_mb"] > 0
        if run["mix"] == "good":
            assert run["bad"]["count"] == 0
            continue
        kinds = run["bad"]["by_kind"]
        assert {k: v["expected"] for k, v in kinds.items()} == {"chunked": 413, "bomb": 413, "eps": 400, "garbage": 400}
        for kind, v in kinds.items():  # every request of the kind got exactly its status
            assert v["statuses"] == {str(v["expected"]): v["count"]} and v["count"] >= 1, (kind, v)
    checks = result["checks"]
    assert checks["good_query_errors"] == 0 and checks["bad_refused_as_expected"] is True
    assert isinstance(checks["rss_flat"], bool) and checks["rss_good_peak_mb"] > 0
    assert checks["oversize_bodies_in_flight_max"] >= 1
    assert "written to" in capsys.readouterr().out
