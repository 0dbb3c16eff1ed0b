"""Shards on S3, for real: an S3-compatible server (moto's server mode) on loopback, shards uploaded with
boto3, read through fsspec/s3fs by the same loader as local shards. Only the standard AWS variables
point clipkit at the server, as users' own S3 settings would."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipkit.config import DataConfig
from clipkit.data import build_train_loader, expand_shards
from data_shards import keys_of, tar_keys, tokenizer, transforms, write_shards
from helpers import free_port

BUCKET = "clipkit-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(endpoint, local shard dir): a moto S3 server holding the shards under s3://clipkit-test/shards/."""
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    port = free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        import boto3

        local = tmp_path_factory.mktemp("s3src")
        write_shards(local, "s", 4, 9)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for path in sorted(local.glob("*.tar")):
            client.upload_file(str(path), BUCKET, f"shards/{path.name}")
        yield endpoint, local
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loader(spec, **kw):
    train_tf, _ = transforms(16)
    return build_train_loader(DataConfig(train=spec, shuffle_buffer=10, **kw), transform=train_tf,
                              tokenizer=tokenizer(), local_batch_size=5, epochs=1, seed=1)


def test_s3_shards_stream_every_sample_once(s3):
    _, local = s3
    spec = f"s3://{BUCKET}/shards/s-{{00..03}}.tar"
    assert expand_shards(spec) == [f"s3://{BUCKET}/shards/s-{i:02d}.tar" for i in range(4)]
    batches = list(_loader(spec, workers=2))
    assert sorted(keys_of(batches)) == sorted(tar_keys(sorted(local.glob("*.tar"))).elements())
    assert not any(b.skipped for b in batches)


def test_missing_s3_object_is_skipped_and_counted(s3):
    _, local = s3
    spec = f"s3://{BUCKET}/shards/s-{{00..01}}.tar::s3://{BUCKET}/shards/missing.tar"
    batches = list(_loader(spec, workers=0))
    skipped = {}
    for b in batches:
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == {"shard_open_error": 1}
    want = tar_keys([local / "s-00.tar", local / "s-01.tar"])
    assert sorted(keys_of(batches)) == sorted(want.elements())
