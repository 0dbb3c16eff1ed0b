from pathlib import Path

from setuptools import find_packages, setup

# torch/torchvision are pinned to the releases this project is built and tested against; a looser
# range would let pip pull a different (multi-GB) CUDA build from the registry.
INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open_clip_torch==3.3.0",
    "webdataset==1.0.2",
    "deepspeed==0.19.8",
    "timm>=1.0",
    "transformers>=5.0",  # the HF export uses the 5.x tokenizer and processor API
    "fsspec>=2024.1",
    "safetensors>=0.4",
    "tensorboard>=2.15",
    "tqdm>=4.60",
    "pyyaml>=6.0",
    "braceexpand>=0.1.7",
    "pyarrow>=14",  # parquet: make-shards input, img2dataset-style per-shard metadata, embedding metadata
    # using what was trained: indexes, the retrieval service, ONNX export
    "faiss-cpu>=1.8",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "onnx>=1.16",
    "onnxruntime>=1.18",
    "onnxscript>=0.5",  # torch.onnx's (dynamo) exporter
    "peft>=0.13",  # LoRA fine-tuning (clipkit finetune --method lora)
    "matplotlib>=3.8",  # a run's report.html plots, the loss benchmark's curve
]

BENCH = ["scikit-image>=0.22"]  # its sample photographs build the realistic shards of `clipkit bench data`
EXTRAS = {
    "bench": BENCH,
    # clip-benchmark: the independent reference for zero-shot and retrieval evaluation
    "test": ["pytest>=8", "s3fs>=2024.1", "moto[server]>=5.0", "httpx>=0.27", "clip-benchmark==1.6.2",
             "scikit-learn>=1.3",  # the reference the linear probe is tested against
             *BENCH],
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
