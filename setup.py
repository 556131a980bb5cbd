"""hfdist: hyperfitting of causal language models, from one CPU to 70B across nodes.

The Triton kernels live in the top-level ``kernels/`` folder but install as ``hfdist.kernels``: a
top-level package named ``kernels`` would shadow the PyPI distribution of that name, which
transformers looks for.
"""

from setuptools import setup

# Known-good versions (CPU build checked on Python 3.11; the GPU machine runs torch 2.11 / triton 3.6 /
# transformers 5.17, so the floors stay there).
INSTALL_REQUIRES = [
    "torch>=2.11,<=2.13.0",
    "transformers>=5.17,<=5.24.0",
    "datasets>=5.0,<=5.2.0",
    "accelerate>=1.10,<=1.15.0",
    "safetensors>=0.5",
    "tensorboard>=2.18,<=2.21.0",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "gguf==0.19.0",
    "numpy>=1.26",
    "xxhash>=3.0",  # checkpoint checksums (XXH3-128); also a dependency of datasets
    "peft==0.22.0",  # LoRA adapters (adapter.type: lora)
]

EXTRAS = {
    "triton": ["triton>=3.6,<=3.9.0"],
    "gpu": ["flash-attn>=2.6"],
    "deepspeed": ["deepspeed==0.19.8"],
    "mpi": ["mpi4py==4.1.2"],
    "bench": ["liger-kernel==0.8.5", "psutil>=5.9"],
    "dev": ["pytest>=8", "sacrebleu>=2.4", "triton>=3.6,<=3.9.0", "psutil>=5.9", "ruff==0.17.6"],
    # Images (data.modality: image): the embedded 8x8 digits ship inside scikit-learn's wheel; Pillow decodes image
    # files (matplotlib already needs it).
    "images": ["scikit-learn>=1.5,<=1.9.1", "pillow>=10"],
}

setup(
    name="hfdist",
    version="0.1.0",
    description="Hyperfitting of causal LMs: FSDP2/ZeRO-3 engine, Triton kernels, long-sequence evaluation",
    python_requires=">=3.10",
    packages=["hfdist", "hfdist.commands", "hfdist.distributed", "hfdist.kernels"],
    package_dir={"hfdist": "hfdist", "hfdist.kernels": "kernels"},
    package_data={"hfdist": ["model_configs/*.json", "data_files/*", "demo.yaml"]},
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["hfdist=hfdist.cli:main"]},
)
