"""megamem: Megatron-style pretraining of MemoryFormer language models.

The repository keeps kernels/, parallel/ and data_tools/ at the top level for
readability, but installs them under the megamem namespace: a top-level module
named `kernels` would collide with a popular PyPI package.
"""
from setuptools import setup

PACKAGES = {
    "megamem": "megamem",
    "megamem.config": "megamem/config",
    "megamem.model": "megamem/model",
    "megamem.cli": "megamem/cli",
    "megamem.checkpoint": "megamem/checkpoint",
    "megamem.training": "megamem/training",
    "megamem.inference": "megamem/inference",
    "megamem.kernels": "kernels",
    "megamem.parallel": "parallel",
    "megamem.data_tools": "data_tools",
}

setup(
    name="megamem",
    version="0.1.0",
    description="Megatron-style pretraining for MemoryFormer language models",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=["torch>=2.1", "pyyaml>=6", "numpy", "webdataset>=0.2", "tokenizers>=0.20", "zstandard",
                      "deepspeed>=0.14", "tensorboard", "safetensors", "ninja", "psutil"],
    extras_require={"eval": ["lm-eval>=0.4.13", "transformers>=5", "accelerate>=0.26"],
                    "bench": ["matplotlib>=3.7"],
                    "test": ["pytest>=7", "pytest-xdist>=3.5", "hypothesis>=6", "triton", "ruff>=0.6",
                             "lm-eval>=0.4.13", "transformers>=5", "accelerate>=0.26", "matplotlib>=3.7"]},
    package_data={"megamem.kernels": ["cpu/*.cpp", "cpu/*.h"]},
    entry_points={"console_scripts": ["megamem=megamem.cli.main:main"]},
)
