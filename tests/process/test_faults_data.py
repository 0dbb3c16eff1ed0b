"""Reliability of the data stream under faults (issue 14, data side):

- data with no usable sample stops the training stream with one clear line (instead of looping over its
  epochs for ever), while a worker whose shards are all bad among good ones never hangs its rank;
- a tar shard cut short (inside a header, inside member data, without its end-of-archive blocks) is
  counted once, with the samples before the cut delivered; complete tars are never flagged;
- a checkpoint's data stream continues on another number of ranks x loader workers, with every sample
  of the epoch delivered exactly once.

References are independent of the loader: plain tarfile reads of the shards, and what tarfile can read
of a cut file.
"""
import gzip
import io
import itertools
import json
import logging
import signal
import subprocess
import tarfile
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from clipkit.config import DataConfig
from clipkit.data import (NoUsableSamples, ShardSpecError, ShardStream, StreamState, StreamStateError,
                          build_train_loader, expand_shards, repartition, repartition_train_states)
from clipkit.data.order import ShardPlan
from clipkit.data.sample import Tokenize
from data_shards import add, jpeg, keys_of, tar_keys, tokenizer, transforms, write_shards

SEED = 7


@pytest.fixture(scope="module")
def parts():
    train_tf, val_tf = transforms(16)
    return train_tf, val_tf, tokenizer()


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts the wait for a loader's next batch."""
    def fire(signum, frame):
        raise TimeoutError(f"no answer from the loader within {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _write(path, keys, members=("jpg", "txt", "json"), **tar_kw) -> str:
    with tarfile.open(path, "w", **tar_kw) as tar:
        for i, key in enumerate(keys):
            data = {"jpg": jpeg(((i * 41) % 256, 90, 30)), "txt": f"a photo of {key}".encode(),
                    "json": json.dumps({"key": key}).encode()}
            for ext in members:
                add(tar, f"{key}.{ext}", data[ext])
    return str(path)


def _loader(spec, parts, *, workers, world_size=1, rank=0, batch=8, resume=None, epochs=None, **data):
    cfg = DataConfig(**{"train": spec, "workers": workers, "shuffle_buffer": 10, **data})
    return build_train_loader(cfg, transform=parts[0], tokenizer=parts[2], local_batch_size=batch, rank=rank,
                              world_size=world_size, seed=SEED, resume_state=resume, epochs=epochs)


def _error_of(loader, seconds=30) -> NoUsableSamples:
    """The error the loader's first batch raises, within `seconds`. Its traceback is dropped: through the
    raising frame it holds the loader's iterator, which would then be left to the cycle collector, whose
    order of finalizers can shut the worker queues down before the workers are told to stop (seconds of
    waiting in a later test)."""
    it = iter(loader)
    try:
        with deadline(seconds):
            next(it)
    except NoUsableSamples as e:
        e.__traceback__ = None
        return e
    finally:
        del it
    pytest.fail("the loader gave a batch")


def _summed(batches) -> Counter:
    total = Counter()
    for b in batches:
        total.update(b.skipped)
    return total


# -- 1. data with no usable sample ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    sizes = (5, 7, 4)
    no_caption = [_write(root / f"nocap-{i}.tar", [f"n{i}_{j}" for j in range(n)], members=("jpg", "json"))
                  for i, n in enumerate(sizes)]
    good = [_write(root / f"good-{i}.tar", [f"g{i}_{j}" for j in range(n)]) for i, n in enumerate(sizes)]
    return {"samples": sum(sizes), "no_caption": "::".join(no_caption), "good": good}


ALL_BAD = {  # case -> (which shards, data settings, expected skips, words of the hint)
    "captions_missing": ("no_caption", {}, "missing_caption", "no sample had a 'txt' caption (data.caption_key)"),
    "wrong_caption_key": ("good", {"caption_key": "caption"}, "missing_caption",
                          "no sample had a 'caption' caption (data.caption_key)"),
    "max_image_pixels_too_small": ("good", {"max_image_pixels": 100}, "image_too_large",
                                   "every image was larger than data.max_image_pixels=100"),
}


def _spec(bad_sets, which):
    paths = bad_sets[which] if isinstance(bad_sets[which], list) else bad_sets[which].split("::")
    return list(paths)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", sorted(ALL_BAD))
def test_data_without_a_usable_sample_stops_with_one_clear_line(bad_sets, parts, case, workers):
    which, settings, reason, hint = ALL_BAD[case]
    error = _error_of(_loader(_spec(bad_sets, which), parts, workers=workers, **settings))
    message = str(error)
    assert isinstance(error, ShardSpecError)  # the command line prints it as one line and exits 2
    assert "\n" not in message and hint in message
    # one whole pass over the rank's shards, every sample counted once with its reason
    assert error.skipped == {reason: bad_sets["samples"]}
    assert f"{reason}={bad_sets['samples']}" in message and "3 shards of rank 0" in message
    if case == "captions_missing":
        assert "jpg, json members" in message


def test_the_error_reaches_the_command_line_as_one_line(bad_sets, tmp_path, capsys):
    from clipkit.cli import main

    code = main(["train", f"run.dir={tmp_path / 'run'}", "model.name=clipkit-nano",
                 f"data.train={bad_sets['no_caption']}", "data.workers=2", "train.global_batch_size=8",
                 "train.steps=4", "run.progress=false", "eval.zeroshot_at_end=false", "export.at_end=false"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("clipkit: error:")]
    assert code == 2
    assert len(lines) == 1 and "no sample had a 'txt' caption (data.caption_key)" in lines[0]
    assert "Traceback" not in err


def test_in_a_plain_dataloader_worker_the_message_survives(bad_sets, parts):
    """Raised inside a worker process, torch re-creates the error with the worker's traceback as its
    message: the one line is recovered."""
    stream = ShardStream(_spec(bad_sets, "no_caption"), parts[1], Tokenize(parts[2]), 4, seed=SEED, num_workers=1)
    message = str(_error_of(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1)))
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("no usable sample") and message.endswith("(in DataLoader worker process 0)")


@pytest.fixture(scope="module")
def half_bad(tmp_path_factory):
    """4 shards; the 2 that loader worker 0 of 2 reads in epochs 0 and 1 (the same ones, by the seed)
    hold no captions, the others are good. (In epoch 2 worker 0 reads one bad and one good shard.)"""
    root = tmp_path_factory.mktemp("half")
    plan = ShardPlan(tuple(f"s{i}" for i in range(4)), None, SEED, False, True, 0, 1, 2)
    bad = set(plan.worker_shard_indices(0, 0))
    if bad != set(plan.worker_shard_indices(1, 0)):
        pytest.fail("the seed must give worker 0 the same shards in epochs 0 and 1")
    sizes = [6, 9, 5, 7]
    paths, bad_count = [], 0
    for i, n in enumerate(sizes):
        keys = [f"h{i}_{j}" for j in range(n)]
        members = ("jpg", "json") if i in bad else ("jpg", "txt", "json")
        paths.append(_write(root / f"h-{i}.tar", keys, members=members))
        if i in bad:
            bad_count += n
    good_keys = tar_keys([p for i, p in enumerate(paths) if i not in bad])
    return paths, good_keys, bad_count


def test_a_worker_with_only_bad_shards_does_not_hang_its_rank(half_bad, parts):
    paths, good, bad_count = half_bad
    with deadline(60):
        batches = list(_loader(paths, parts, workers=2, batch=4, epochs=2))
        endless = iter(_loader(paths, parts, workers=2, batch=4))
        first = [next(endless) for _ in range(10)]  # past worker 0's two all-bad epochs
    assert Counter(keys_of(batches)) == Counter({k: 2 for k in good})  # both epochs of the good worker
    assert _summed(batches) == {"missing_caption": 2 * bad_count}  # the bad worker's skips reach the batches
    assert all(len(b.keys) == 4 for b in first)
    # the endless stream carries the bad worker's positions, so a checkpoint there resumes past them
    state = StreamState()
    for b in first:
        state.observe(b)
    assert state.state_dict()["workers"][0]["epoch"] >= 3 and _summed(first)["missing_caption"] >= 3 * bad_count


@pytest.mark.parametrize("stop", [2, 4])
def test_resume_between_empty_passes_is_batch_for_batch_exact(half_bad, parts, stop):
    """The bad worker's reports take their turns in the loader's order, and the state records them: a
    stream resumed after them (at 2 batches, worker 0 has sent only reports; in its epoch 2 it reads a
    good shard) continues exactly as the uninterrupted one (same keys, same augmented images)."""
    paths, _, _ = half_bad
    with deadline(60):
        whole = list(itertools.islice(iter(_loader(paths, parts, workers=2, batch=4)), 9))
        state = StreamState()
        it = iter(_loader(paths, parts, workers=2, batch=4))
        first = [next(it) for _ in range(stop)]
        del it
        for b in first:
            state.observe(b)
        saved = json.loads(json.dumps(state.state_dict()))
        rest = list(itertools.islice(iter(_loader(paths, parts, workers=2, batch=4, resume=saved)), 9 - stop))
    assert any(b.empty_passes for b in first)  # reports came between the batches before the checkpoint
    assert {b.position.worker for b in whole} == {0, 1}
    assert keys_of(first + rest) == keys_of(whole)
    assert all(torch.equal(x.images, y.images) for x, y in zip(first + rest, whole, strict=True))


def test_in_a_plain_dataloader_a_bad_worker_stops_and_the_good_one_goes_on(half_bad, parts, caplog):
    paths, good, _ = half_bad
    stream = ShardStream(paths, parts[1], Tokenize(parts[2]), 4, seed=SEED, shuffle_buffer=10, epochs=2,
                         num_workers=2)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    with deadline(60):
        keys = keys_of(loader)
    assert Counter(keys) == Counter({k: 2 for k in good})


# -- 2. truncated tars ---------------------------------------------------------------------------------


def _reference(data: bytes) -> tuple[list[str], Counter]:
    """What plain tarfile can read of (possibly cut) tar bytes: the keys of samples whose image and caption
    members are complete, in order, and the skips expected for samples left with only some members."""
    complete: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        while True:
            try:
                m = tar.next()
            except tarfile.ReadError:
                break
            if m is None:
                break
            if m.offset_data + m.size <= len(data):
                key, ext = m.name.split(".", 1)
                complete.setdefault(key, set()).add(ext)
    keys = [k for k, exts in complete.items() if {"jpg", "txt"} <= exts]
    partial = Counter("missing_image" if "jpg" not in exts else "missing_caption"
                      for exts in complete.values() if not {"jpg", "txt"} <= exts)
    return keys, partial


def _read(urls, parts):
    stream = ShardStream(urls, parts[1], Tokenize(parts[2]), batch_size=4, shuffle=False, epochs=1)
    batches = list(stream)
    return keys_of(batches), _summed(batches)


@pytest.fixture(scope="module")
def whole_tar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    path = _write(root / "whole.tar", [f"k{i}" for i in range(5)])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    return root, open(path, "rb").read(), members


def _cuts(members, size):
    m2, m3 = members[4], members[7]  # k1.txt, k2.txt (after its k2.jpg)
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks begin
    return {
        "inside_a_header_block": m2.offset + 100,
        "at_the_end_of_a_header_block": m3.offset + 511,
        "between_members": m3.offset,
        "inside_member_data": m3.offset_data + m3.size // 2,
        "inside_jpeg_data": members[6].offset_data + 7,
        "inside_data_padding": m2.offset_data + m2.size + 3,
        "without_end_of_archive_blocks": end,
        "one_byte_into_the_end_blocks": end + 1,
        "first_header_only": 512,
    }


def test_cut_positions_are_where_they_claim(whole_tar):
    _, data, members = whole_tar
    cuts = _cuts(members, len(data))
    assert members[7].name == "k2.txt" and members[6].name == "k2.jpg"
    assert data[cuts["without_end_of_archive_blocks"]:] == b"\0" * (len(data) - cuts["without_end_of_archive_blocks"])
    assert members[4].size % 512 != 0  # the padding exists


@pytest.mark.parametrize("cut", ["inside_a_header_block", "at_the_end_of_a_header_block", "between_members",
                                 "inside_member_data", "inside_jpeg_data", "inside_data_padding",
                                 "without_end_of_archive_blocks", "one_byte_into_the_end_blocks",
                                 "first_header_only"])
@pytest.mark.parametrize("through", ["file", "pipe"])
def test_a_cut_shard_keeps_what_was_before_the_cut_and_counts_once(whole_tar, parts, caplog, cut, through):
    root, data, members = whole_tar
    at = _cuts(members, len(data))[cut]
    path = root / f"{cut}.tar"
    path.write_bytes(data[:at])
    before = _write(root / "before.tar", ["b0", "b1"])
    after = _write(root / "after.tar", ["c0"])
    url = f"pipe:cat {path}" if through == "pipe" else str(path)
    expected, partial = _reference(data[:at])
    with caplog.at_level(logging.WARNING, logger="clipkit.data"):
        keys, skipped = _read([before, url, after], parts)
    assert keys == ["b0", "b1", *expected, "c0"]
    assert skipped == {"tar_read_error": 1, **partial}
    assert str(path) in caplog.text and "truncated" in caplog.text
    if cut == "inside_member_data":
        assert expected == ["k0", "k1"] and partial == {"missing_caption": 1}  # k2 lost its caption
    if cut == "without_end_of_archive_blocks":
        assert expected == [f"k{i}" for i in range(5)] and not partial  # every member is whole


def _strip_padding(data: bytes) -> bytes:
    """The same archive with exactly two zero blocks at its end (no padding to a 10 KiB record)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return data[:end] + b"\0" * 1024


def _valid_tars(root):
    keys = [f"v{i}" for i in range(4)]
    out = {}
    out["tarfile_pax"] = _write(root / "pax.tar", keys)
    out["tarfile_gnu"] = _write(root / "gnu.tar", keys, format=tarfile.GNU_FORMAT)
    out["tarfile_ustar"] = _write(root / "ustar.tar", keys, format=tarfile.USTAR_FORMAT)
    long = [f"{'d' * 60}/{'e' * 70}/v{i}" for i in range(3)]  # names over 100 characters: extended headers
    out["long_names_pax"] = _write(root / "longpax.tar", long)
    out["long_names_gnu"] = _write(root / "longgnu.tar", long, format=tarfile.GNU_FORMAT)
    stripped = root / "two_zero_blocks.tar"
    stripped.write_bytes(_strip_padding(open(out["tarfile_pax"], "rb").read()))
    out["two_zero_blocks_unpadded"] = str(stripped)
    with open(root / "stream.tar", "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for key in keys:
            add(tar, f"{key}.jpg", jpeg())
            add(tar, f"{key}.txt", key.encode())
    out["tarfile_stream"] = str(root / "stream.tar")
    import webdataset as wds

    for name, compress in [("webdataset", False), ("webdataset_gz", True)]:
        path = root / (f"{name}.tar.gz" if compress else f"{name}.tar")
        with wds.TarWriter(str(path), compress=compress) as sink:
            for key in keys:
                sink.write({"__key__": key, "jpg": jpeg(), "txt": f"caption {key}"})
        out[name] = str(path)
    if subprocess.run(["tar", "--version"], capture_output=True).returncode == 0:  # GNU tar, from files
        src = root / "gnu_tar_src"
        src.mkdir(exist_ok=True)
        for key in keys:
            (src / f"{key}.jpg").write_bytes(jpeg())
            (src / f"{key}.txt").write_text(key)
        subprocess.run(["tar", "-cf", str(root / "gnutar.tar"), "-C", str(src), *sorted(p.name for p in src.iterdir())],
                       check=True)
        out["gnu_tar"] = str(root / "gnutar.tar")
    return out


def test_complete_tars_are_never_flagged(tmp_path, parts, caplog):
    tars = _valid_tars(tmp_path)
    assert {"tarfile_pax", "webdataset", "webdataset_gz", "two_zero_blocks_unpadded"} <= set(tars)
    for name, path in tars.items():
        opened = gzip.open(path) if path.endswith(".gz") else open(path, "rb")
        with opened as f:
            data = f.read()
        expected, partial = _reference(data)
        assert expected and not partial
        for url in (path, f"pipe:cat {path}"):
            with caplog.at_level(logging.WARNING, logger="clipkit.data"):
                caplog.clear()
                keys, skipped = _read([url], parts)
            assert (name, keys, dict(skipped)) == (name, expected, {})
            assert "skipped" not in caplog.text


def test_a_damaged_header_after_good_members_is_counted(whole_tar, parts):
    root, data, members = whole_tar
    broken = bytearray(data)
    broken[members[6].offset + 148:members[6].offset + 156] = b"9999999\0"  # k2.jpg's header checksum
    path = root / "damaged.tar"
    path.write_bytes(bytes(broken))
    keys, skipped = _read([str(path)], parts)
    assert keys == ["k0", "k1"] and skipped == {"tar_read_error": 1}


# -- 3. elastic resume ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    uneven = [write_shards(root, f"s{n}", 1, n) for n in (9, 3, 14, 6, 11, 5, 8)]  # 56 samples
    return "::".join(uneven)


def _run(spec, parts, layout, states=None, batches=None, epochs=None, global_batch=8):
    """Every rank of a (ranks, data.workers) layout: the keys of the batches consumed (`batches` per rank,
    or all of a finite stream) and each rank's saved state, through JSON as a checkpoint stores it."""
    ranks, workers = layout
    keys, saved = [], []
    for rank in range(ranks):
        resume = states[rank] if states else None
        state = StreamState(resume)
        loader = _loader(spec, parts, workers=workers, world_size=ranks, rank=rank, batch=global_batch // ranks,
                         resume=resume, epochs=epochs)
        it = iter(loader)
        got = []
        while batches is None or len(got) < batches:
            try:
                batch = next(it)
            except StopIteration:
                break
            state.observe(batch)
            got.append(batch)
        del it
        keys.append(keys_of(got))
        saved.append(json.loads(json.dumps(state.state_dict())))
    return keys, saved


def _flat(keys) -> Counter:
    return Counter(k for rank in keys for k in rank)


LAYOUT_CHANGES = [((2, 2), (1, 0)), ((1, 0), (2, 2)), ((2, 1), (1, 2)), ((1, 2), (2, 1)), ((2, 2), (1, 3))]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # on 2 cores
@pytest.mark.parametrize("old,new", LAYOUT_CHANGES, ids=lambda x: f"{x[0]}x{max(1, x[1])}")
def test_elastic_resume_delivers_the_epoch_exactly_once(spec, parts, old, new):
    epoch = tar_keys(expand_shards(spec))
    assert sum(epoch.values()) == 56
    with deadline(90):
        before, states = _run(spec, parts, old, batches=2)
        assert all(w["epoch"] == 0 for s in states for w in s["workers"] if w)  # mid-epoch 0 everywhere
        cfg = DataConfig(train=spec, workers=new[1], shuffle_buffer=10)
        moved = repartition_train_states(cfg, states, world_size=new[0])
        assert len(moved) == new[0]
        rest, _ = _run(spec, parts, new, moved, epochs=1)
        assert _flat(before) + _flat(rest) == epoch  # no sample twice, none lost
        # equal shares (to one sample a worker): ranks stepping together end the epoch together
        assert max(map(len, rest)) - min(map(len, rest)) <= max(1, new[1])
        two, _ = _run(spec, parts, new, moved, epochs=2)
    assert _flat(before) + _flat(two) == Counter({k: 2 for k in epoch})
    # the next epoch is an ordinary one of the new layout: each rank reads the shards dealt to it
    urls = expand_shards(spec)
    for rank in range(new[0]):
        plan = ShardPlan(tuple(urls), None, SEED, False, True, rank, new[0], max(1, new[1]))
        dealt = [urls[i] for w in range(max(1, new[1])) for i in plan.worker_shard_indices(1, w)]
        assert Counter(two[rank]) - Counter(rest[rank]) == tar_keys(dealt)


def test_elastic_resume_across_an_epoch_boundary(spec, parts):
    """Workers drift apart: one has begun epoch 1 while the other is still in epoch 0. Both remainders
    are dealt out, epoch by epoch."""
    epoch = tar_keys(expand_shards(spec))
    with deadline(90):
        for n in range(6, 14):
            before, states = _run(spec, parts, (1, 2), batches=n)
            epochs = sorted(w["epoch"] for w in states[0]["workers"])
            if epochs == [0, 1]:
                break
        assert epochs == [0, 1], "no stop point with the workers in different epochs"
        moved = repartition(states, 2, 1, expand_shards(spec))
        assert [e["epoch"] for e in moved[0]["residual"]] == [0, 1]
        rest, _ = _run(spec, parts, (2, 1), moved, epochs=2)
    assert _flat(before) + _flat(rest) == Counter({k: 2 for k in epoch})


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_chained_layout_changes_and_an_exact_resume_in_between(spec, parts):
    """2x2 -> 1x3 -> (checkpoint, same layout: batch for batch the uninterrupted stream) -> 2x1."""
    epoch = tar_keys(expand_shards(spec))
    urls = expand_shards(spec)
    with deadline(120):
        first, states = _run(spec, parts, (2, 2), batches=2)
        moved = repartition(states, 1, 3, urls)
        whole, _ = _run(spec, parts, (1, 3), moved, batches=4)
        second, states = _run(spec, parts, (1, 3), moved, batches=2)
        assert repartition(states, 1, 3, urls) == states  # the same layout: handed back as it is
        third, states = _run(spec, parts, (1, 3), states, batches=2)
        assert second[0] + third[0] == whole[0]  # an exact resume inside the elastic remainder
        rest, _ = _run(spec, parts, (2, 1), repartition(states, 2, 1, urls), epochs=2)
    assert _flat(first) + _flat(second) + _flat(third) + _flat(rest) == Counter({k: 2 for k in epoch})


def test_resampled_stream_loses_no_buffered_sample(spec, parts):
    """Resampled mode has no exactly-once epoch; a layout change still delivers what was read but not
    consumed (the old workers' remainders) before drawing anew."""
    kw = {"resampled": True}
    with deadline(60):
        cfg = DataConfig(train=spec, workers=2, shuffle_buffer=10, **kw)
        loader = build_train_loader(cfg, transform=parts[0], tokenizer=parts[2], local_batch_size=8, seed=SEED,
                                    epochs=1)
        whole = Counter(keys_of(loader))  # one resampled epoch of the old layout
        state = StreamState()
        it = iter(build_train_loader(cfg, transform=parts[0], tokenizer=parts[2], local_batch_size=8, seed=SEED,
                                     epochs=1))
        before = [next(it) for _ in range(2)]
        for b in before:
            state.observe(b)
        del it
        moved = repartition([state.state_dict()], 2, 1, expand_shards(spec))
        rest = Counter()
        for rank in range(2):
            cfg1 = DataConfig(train=spec, workers=1, shuffle_buffer=10, **kw)
            rest.update(keys_of(build_train_loader(cfg1, transform=parts[0], tokenizer=parts[2], local_batch_size=4,
                                                   rank=rank, world_size=2, seed=SEED, resume_state=moved[rank],
                                                   epochs=1)))
    assert Counter(keys_of(before)) + rest == whole


def test_repartition_refuses_states_that_do_not_fit(spec, parts):
    urls = expand_shards(spec)
    _, states = _run(spec, parts, (2, 0), batches=1)
    with pytest.raises(StreamStateError, match="1 data states given for a checkpoint of 2 ranks"):
        repartition(states[:1], 1, 1, urls)
    with pytest.raises(StreamStateError, match="rank order"):
        repartition(states[::-1], 1, 1, urls)
    with pytest.raises(StreamStateError, match="number of shards"):
        repartition(states, 1, 1, urls[:-1])
    other_seed = [dict(s, fingerprint=dict(s["fingerprint"], seed=8)) for s in states]
    other_seed[0] = states[0]
    with pytest.raises(StreamStateError, match="different runs.*data seed"):
        repartition(other_seed, 1, 1, urls)
    # the loader still refuses a state of another layout, and says how to move it
    with pytest.raises(StreamStateError, match="repartition"):
        _loader(spec, parts, workers=0, resume=states[0])
