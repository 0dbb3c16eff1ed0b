from pathlib import Path

from setuptools import find_packages, setup

# torch/torchvision are pinned to the releases this project is built and tested against; a looser
# range would let pip pull a different (multi-GB) CUDA build from the registry. Every package clipkit
# imports is declared here or in an extra; an upper bound stands where the next major version would
# break an API clipkit uses.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "webdataset==1.0.2",
    "timm>=1.0,<2",
    "transformers>=5.0,<6",  # the HF export uses the 5.x tokenizer and processor API
    "sentencepiece>=0.2,<1",  # SiglipTokenizer: the SentencePiece tokenizer of a transformers SiglipModel directory
    "fsspec>=2024.1",
    "safetensors>=0.4,<1",
    "numpy>=2.0,<3",
    "Pillow>=10.1,<14",  # Image.open(formats=...), the decompression-bomb checks
    "tensorboard>=2.15,<3",
    "tqdm>=4.60,<5",
    "pyyaml>=6.0,<7",
    "braceexpand>=0.1.7",
    "pyarrow>=14",  # parquet: make-shards input, img2dataset-style per-shard metadata, embedding metadata
    "matplotlib>=3.8,<4",  # a run's report.html plots, the loss benchmark's curve
]

# The heavy optional parts: each command that needs one names its extra in a one-line error when it is
# missing (clipkit/extras.py holds the same table).
OPTIONAL = {
    "deepspeed": ["deepspeed==0.19.8"],  # deepspeed.enabled=true (ZeRO 1-3)
    "onnx": ["onnx>=1.16,<2", "onnxruntime>=1.18,<2", "onnxscript>=0.5,<1"],  # export --format onnx, bench onnx
    "lora": ["peft>=0.13,<1"],  # finetune --method lora
    # index, search, serve: faiss builds from 1.9 on are made against numpy 2
    "retrieval": ["faiss-cpu>=1.9,<2", "fastapi>=0.110,<1", "starlette>=0.37,<2", "pydantic>=2,<3",
                  "uvicorn>=0.29,<1"],
    # clipkit curate: perceptual hashes, MetaCLIP's substring matching, caption language (models in the wheel);
    # semantic deduplication clusters with faiss
    "curate": ["imagehash>=4.3,<5", "pyahocorasick>=2.1,<3", "lingua-language-detector>=2.0,<3", "faiss-cpu>=1.9,<2"],
}
BENCH = [
    "scikit-image>=0.22",  # its sample photographs build the realistic shards of `clipkit bench data`
    "psutil>=5.9",  # bench serve: the server's RSS where there is no /proc
]
ALL = sorted({req for reqs in OPTIONAL.values() for req in reqs})
EXTRAS = {
    **OPTIONAL,
    "all": ALL,
    "bench": BENCH,
    # clip-benchmark: the independent reference for zero-shot and retrieval evaluation
    # pytest-xdist: the suite runs on two workers (launch/test.sh); scikit-learn: the linear probe's reference;
    # pytest below 9.2: from 9.2 on, pytest-xdist's --dist loadgroup no longer sees xdist_group marks (its node-id
    # suffix stopped taking effect: pytest-xdist issue 1386), and every test would go its own way
    "test": [*ALL, *BENCH, "pytest>=8,<9.2", "pytest-xdist>=3.5", "s3fs>=2024.1", "moto[server]>=5.0", "httpx>=0.27",
             "clip-benchmark==1.6.2", "scikit-learn>=1.3"],
}

setup(
    name="clipkit",
    version="0.1.0",
    description="CLIP-style contrastive image-text pretraining at scale",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["clipkit", "clipkit.*"]),
    package_data={"clipkit": ["configs/*.yaml", "models/model_configs/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["clipkit=clipkit.cli:main"]},
)
