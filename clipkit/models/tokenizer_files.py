"""A transformers tokenizer carried inside clipkit's weights files, as data.

A model trained from a transformers directory (model.pretrained, model.pretrained_text) tokenises with that
directory's tokenizer, not open_clip's BPE. Its checkpoints, fine-tuned copies and weights files carry the
tokenizer's files in the safetensors header (`tokenizer_files`: file name -> base64 content), so wherever the
weights go the same tokenizer comes back, without the source directory.

Only the file names in TOKENIZER_FILES are written or read back (any other name in a header is refused): the
contents are written into a fresh private directory of this process (mode 0700, named by their digest) and
transformers builds the tokenizer from there with remote code off. Nothing in a header is ever used as a path.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from ..checkpoint import CheckpointError

# What transformers' tokenizers read from a directory (fast tokenizer JSON, BPE, WordPiece and SentencePiece
# vocabularies, their settings and added tokens).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "sentencepiece.bpe.model", "spiece.model",
                   "tokenizer.model")
HEADER_KEY = "tokenizer_files"


def read_tokenizer_files(directory: Path) -> dict[str, bytes]:
    """The tokenizer files a directory holds (names from TOKENIZER_FILES only)."""
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


def encode(files: dict[str, bytes]) -> str:
    return json.dumps({name: base64.b64encode(data).decode("ascii") for name, data in sorted(files.items())})


def decode(text: str, source: Path) -> dict[str, bytes]:
    """The files of a header's tokenizer_files; a name outside TOKENIZER_FILES or bad content: CheckpointError."""
    try:
        entries = json.loads(text)
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
        files = {}
        for name, data in entries.items():
            if name not in TOKENIZER_FILES:
                raise ValueError(f"file name {name[:80]!r} is not a tokenizer file clipkit writes")
            files[name] = base64.b64decode(data, validate=True)
        return files
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: its header's {HEADER_KEY} is not a tokenizer clipkit wrote ({e})") from None


def materialize(files: dict[str, bytes]) -> Path:
    """A private directory holding these files (the same one for the same files within a process)."""
    from .factory import _private_config_dir

    digest = hashlib.sha256(encode(files).encode()).hexdigest()[:16]
    directory = _private_config_dir() / f"tokenizer-{digest}"
    if not directory.is_dir():
        tmp = _private_config_dir() / f"tokenizer-{digest}.tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        tmp.rename(directory)
    return directory


def write_tokenizer_files(files: dict[str, bytes], directory: Path) -> list[Path]:
    """The files into `directory` (an export's folder), by their fixed names only."""
    written = []
    for name, data in files.items():
        if name not in TOKENIZER_FILES:  # decode() already refused such a name; an export never writes one
            raise CheckpointError(f"{name[:80]!r} is not a tokenizer file clipkit writes")
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written
