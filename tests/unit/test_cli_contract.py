"""The command line against its contract, docs/cli.md: every command and flag of the page's table exists in
`build_parser()` and the reverse, the shared flags keep their one meaning, each old spelling parses as its new
one with exactly one notice, and cli.py's docstring and the usage lines of README and docs/ agree with the
parser."""
import argparse
import os
import re
import shlex
from pathlib import Path

import pytest

from clipkit import cli
from clipkit.cliargs import THREADS_HELP
from helpers import ROOT

INPUT_FLAGS = ("--checkpoint", "--data", "--embeddings", "--index")
OVERRIDE_COMMANDS = {"train", "config", "finetune", "curate", "bench train"}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {" ".join(path): sp for path, sp in cli.commands(cli.build_parser())}


def _table(heading: str) -> list[list[list[str]]]:
    """The rows of the first table under `heading` in docs/cli.md, each cell as its `quoted` words."""
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[re.findall(r"`([^`]+)`", cell) for cell in row.strip("|").split("|")] for row in rows]


def _visible(sp: argparse.ArgumentParser):
    return [a for a in sp._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _row_of(sp: argparse.ArgumentParser) -> tuple[list[str], list[str], list[str]]:
    """(inputs, --out kind, other options) of a command as the parser has them."""
    inputs, out, options = [], [], []
    for a in _visible(sp):
        if not a.option_strings:
            inputs.append(a.metavar)
        elif a.option_strings[0] in INPUT_FLAGS:
            inputs.append(a.option_strings[0])
        elif a.option_strings[0] == "--out":
            out.append(a.metavar)
        else:
            options.append(a.option_strings[0])
    return inputs, out, options


def test_every_command_and_flag_of_the_table_is_the_parsers(parsers):
    table = {cmd[0].removeprefix("clipkit "): (ins, out, opts) for cmd, ins, out, opts in _table("Commands")}
    assert sorted(table) == sorted(parsers)
    for name, sp in parsers.items():
        inputs, out, options = _row_of(sp)
        assert sorted(inputs) == sorted(table[name][0]), name
        assert out == table[name][1], name
        assert sorted(options) == sorted(table[name][2]), name


def test_the_shared_flags_mean_one_thing_everywhere(parsers):
    for name, sp in parsers.items():
        for a in _visible(sp):
            flag = a.option_strings[0] if a.option_strings else None
            if flag == "--checkpoint":
                assert a.metavar == "CKPT", name
            if flag == "--data":
                assert a.metavar == "DATA", name
            if flag == "--out":
                assert a.metavar in ("DIR", "FILE.json"), name
                assert a.default is None or (a.metavar == "FILE.json" and a.default.endswith(".json")), name
            if flag == "--threads":  # one default on every benchmark, decided in clipkit.cliargs
                assert a.default is None and a.help == THREADS_HELP, name
            assert flag not in ("--batch", "--set", "--shards", "--folder", "--input"), (name, flag)
        takes_overrides = any(not a.option_strings and a.metavar == "key=value" for a in sp._actions)
        assert takes_overrides == (name in OVERRIDE_COMMANDS), name
    # --json only ever means "print JSON instead of text", never a file to write
    assert all(a.nargs == 0 for sp in parsers.values() for a in _visible(sp) if "--json" in a.option_strings)


def test_every_old_spelling_is_in_the_table_and_the_reverse(parsers):
    table = _table("Old spellings")
    commands = {old: new for (old,), (new,), _ in table if not old.startswith("-")}
    assert commands == cli.DEPRECATED_COMMANDS
    flags = sorted((cmd.removeprefix("clipkit "), old, new) for (old,), (new,), (cmd,) in table if old.startswith("-"))
    found = []
    for name, sp in parsers.items():
        for a in sp._actions:
            found += [(name, old, a.option_strings[0]) for old in getattr(a, "old_spellings", ())]
            if hasattr(a, "replaced_by"):
                found.append((name, a.option_strings[0], a.replaced_by.removeprefix("a positional ")))
    assert sorted(found) == flags


# (command, old words, the same in the new spelling)
OLD_AND_NEW = [
    ("data make-shards", ["--input", "photos", "--out", "shards"], ["--data", "photos", "--out", "shards"]),
    ("serve", ["--index", "idx", "--shards", "s/{0..1}.tar"], ["--index", "idx", "--data", "s/{0..1}.tar"]),
    ("finetune-report", ["ft", "--json", "r.json"], ["ft", "--out", "r.json"]),
    ("bench data", ["--shards", "c"], ["--cache", "c"]),
    ("bench embed", ["--shards", "c", "--threads", "1"], ["--cache", "c", "--threads", "1"]),
    ("bench train", ["--shards", "c"], ["--cache", "c"]),
    ("bench serve", ["--folder", "c"], ["--cache", "c"]),
    ("bench text", ["--batch", "8"], ["--batch-size", "8"]),
]


@pytest.mark.parametrize("command,old,new", OLD_AND_NEW, ids=[c for c, _, _ in OLD_AND_NEW])
def test_an_old_spelling_parses_as_the_new_one_with_one_notice(parsers, capsys, command, old, new):
    sp = parsers[command]
    from_new = vars(sp.parse_args(new))
    assert capsys.readouterr().err == ""
    from_old = vars(sp.parse_args(old))
    notice = capsys.readouterr().err.splitlines()
    assert from_old == from_new
    i = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    assert notice == [f"clipkit: {old[i]} is deprecated and goes away in the next release; use {new[i]}"]


def test_bench_train_set_folds_into_the_positional_overrides(capsys):
    from clipkit.bench.train import parse_args

    new = parse_args(["model.trim_text=false", "train.lr=1e-3"])
    assert capsys.readouterr().err == ""
    old = parse_args(["--set", "model.trim_text=false", "train.lr=1e-3"])
    assert capsys.readouterr().err.splitlines() == [
        "clipkit: --set is deprecated and goes away in the next release; use a positional key=value"]
    assert vars(old) == vars(new) and new.overrides == ["model.trim_text=false", "train.lr=1e-3"]


def test_the_old_command_name_runs_the_new_command_with_one_notice(capsys):
    assert cli._current_spelling(["retrieval", "--checkpoint", "c", "--data", "d"]) == [
        "retrieval-eval", "--checkpoint", "c", "--data", "d"]
    assert capsys.readouterr().err.splitlines() == [
        "clipkit: clipkit retrieval is deprecated and goes away in the next release; use clipkit retrieval-eval"]
    assert cli._current_spelling(["retrieval-eval", "--data", "d"]) == ["retrieval-eval", "--data", "d"]
    assert capsys.readouterr().err == ""


def test_the_docstring_usage_is_the_parsers():
    assert cli.usage_block() in cli.__doc__


def _synopsis_lines(path: Path) -> list[str]:
    """The indented `clipkit ...` lines of a page written as a synopsis ([optional] parts, ..., a|b)."""
    text = path.read_text().replace("\\\n", " ")
    text = re.sub(r"\n {8,}(?=[\[(-])", " ", text)  # a synopsis wrapped onto indented lines is one line
    lines = [line.strip() for line in text.splitlines() if line.startswith("    clipkit ")]
    return [line for line in lines if re.search(r"\[-|\.\.\.| \| |\|[a-z]", line.split("#")[0])]


def _usage_lines(path: Path) -> list[str]:
    """The indented `clipkit ...` example lines of a page, without their comments; synopsis lines (with
    [optional] parts, ... or a|b) are left out: they are not meant to run as written."""
    text = path.read_text().replace("\\\n", " ")  # a command continued on the next line is one line
    lines = [line.strip() for line in text.splitlines() if line.startswith("    clipkit ")]
    words = [shlex.split(line, comments=True) for line in lines]
    return [w for w, line in zip(words, lines) if not re.search(r"\[-|\.\.\.| \| |\|[a-z]", line.split("#")[0])]


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_the_examples_of_readme_and_docs_parse_without_a_notice(capsys, page):
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    parser = cli.build_parser()
    for words in _usage_lines(path):
        try:
            parser.parse_args(cli._current_spelling(words[1:]))
        except SystemExit:
            pytest.fail(f"{page}: {shlex.join(words)}: {capsys.readouterr().err.strip()}")
        assert capsys.readouterr().err == "", f"{page}: {shlex.join(words)} uses an old spelling"


@pytest.mark.parametrize("page", ["README.md"] + sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_the_synopses_of_readme_and_docs_name_only_current_flags(parsers, page):
    path = ROOT / page if page == "README.md" else ROOT / "docs" / page
    for line in _synopsis_lines(path):
        words = line.split("#")[0].split()
        name = next(n for n in sorted(parsers, key=len, reverse=True) if words[1:1 + len(n.split())] == n.split())
        flags = {f for a in _visible(parsers[name]) for f in a.option_strings}
        used = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", " ".join(words[1 + len(name.split()):])))
        assert used <= flags, f"{page}: {line}: {sorted(used - flags)} not options of clipkit {name}"


def test_old_spellings_reach_the_real_commands_through_main(capsys, tmp_path):
    """Through `clipkit.cli.main`, as a user types them: the notice once, then the command's own answer."""
    assert cli.main(["retrieval", "--checkpoint", str(tmp_path / "ck"), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("use clipkit retrieval-eval") and len(err) == 2
    assert "clipkit: error:" in err[1] and "missing" in err[1]  # retrieval-eval's own one-line error
    assert cli.main(["data", "make-shards", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "deprecated" in line] == [
        "clipkit: --input is deprecated and goes away in the next release; use --data"]
    assert err[-1].endswith(f"input not found: {tmp_path / 'missing'}")


def test_every_benchmark_defaults_threads_to_the_same_rule():
    from clipkit.bench import embed, loss, onnx, text, train
    from clipkit.bench.loss_jobs import threads_per_rank
    from clipkit.cliargs import default_threads

    cores = len(os.sched_getaffinity(0))
    assert default_threads() == cores and default_threads(2) == max(1, cores // 2)  # the rule, by hand
    assert default_threads(workers=1) == max(1, cores - 1) and default_threads(workers=cores) == 1
    assert text.parse_args([]).threads == default_threads()
    for module in (embed, train):  # their loader workers run beside the measured process
        assert module.parse_args(["--workers", "1"]).threads == default_threads(workers=1), module.__name__
    assert onnx.parse_args(["--checkpoint", "c", "--data", "d"]).threads == default_threads()
    args = loss.parse_args(["--world", "2"])
    assert threads_per_rank(args) == default_threads(2)
    assert [module.parse_args(["--threads", "3"]).threads for module in (embed, text, train)] == [3, 3, 3]
