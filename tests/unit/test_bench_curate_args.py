"""`clipkit bench curate`'s arguments: sizes are whole multiples of the shard size, stages are known names (kept
in the pipeline's order), each refused in one line before anything is measured."""
import pytest

from clipkit.bench.curate import STAGES, parse_args


def test_sizes_and_stages_are_parsed_in_order():
    args = parse_args(["--sizes", "400, 200,400", "--per-shard", "100", "--stages", "balance,hashing"])
    assert args.sizes == [200, 400] and args.stages == ["hashing", "balance"]
    assert parse_args(["--threads", "1"]).stages == list(STAGES)


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "150", "--per-shard", "100"], "--sizes must name at least one size, each a multiple of --per-shard"),
    (["--sizes", "1k"], "--sizes takes whole numbers joined by commas"),
    (["--stages", "hashing,dedup"], "--stages takes names of decode_filters"),
    (["--eval-images", "0"], "--eval-images must be at least 1"),
])
def test_bad_arguments_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
