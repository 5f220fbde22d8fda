"""vit_jax: Vision Transformers and MLP-Mixers in JAX / Flax NNX."""

import setuptools

# Ranges tested together (CPU; see README "Set-up"): Python 3.11 with jax
# 0.10.2 and flax 0.12.8 (the newest of each for 3.11); Python 3.12 with jax
# 0.11.2 + flax 0.12.10 and jax 0.12.0.1 + flax 0.12.12; Python 3.13 with jax
# 0.12.0.1 + flax 0.12.12. flax 0.12.8 does not import under jax 0.11, and
# flax >= 0.12.9 needs Python >= 3.12 and jax >= 0.11.1.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "jaxlib>=0.10.2,<0.13",
    "flax>=0.12.8,<0.12.9; python_version<'3.12'",
    "flax>=0.12.10,<0.13; python_version>='3.12'",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<2",
    "tensorflow-cpu>=2.21,<2.22",  # tf.data input pipelines only; JAX does the math
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=6.0",  # tfds imports it to build datasets defined in packages
    "tensorboard>=2.21,<2.22",
    "clu>=0.0.12,<0.0.13",  # metric writers and periodic actions of the train loop
    "numpy>=2.0,<3",
    "scipy>=1.14,<2",
    "scikit-learn>=1.6,<2",  # embedded digits dataset
    "scikit-image>=0.25,<0.27",  # sample photos for demos and analyses
    "matplotlib>=3.9,<4",
    "absl-py>=2.1,<3",
    "etils[epath]>=1.10,<2",
    "fsspec>=2024.1",
    "tqdm>=4.66,<5",
    "safetensors>=0.8,<1",  # checkpoint.save_safetensors (timm's layout)
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8.0,<10",
        "pytest-xdist>=3.5,<4",
        "nbformat>=5.10,<6",
        "nbclient>=0.10,<0.12",
        "ipykernel>=6.29,<8",
        "apache-beam>=2.77,<3",  # the Beam dataset builds are tested too
        # timm's and Hugging Face's ViTs, built by the tests, in and out (CPU). torch is the
        # CPU build of 2.13.0 where pip finds one; timm pulls torchvision, whose PyPI
        # wheels need CUDA torch: the tests do without it. Tested: torch 2.13.0, timm
        # 1.0.31, transformers 5.25.0, safetensors 0.8.0 (Python 3.11).
        "torch==2.13.0",
        "timm>=1.0.31,<2",
        "transformers>=5.25,<6",
        "wandb>=0.31,<0.32",  # the Weights & Biases writer is tested offline
    ],
    # Mirror the metrics to Weights & Biases (config.wandb.project).
    "wandb": [
        "wandb>=0.31,<0.32",
    ],
    # Dataset builds on Apache Beam (DirectRunner, Dataflow, Spark, Flink);
    # resolves with tensorflow-cpu 2.21 / tfds 4.9 on Python 3.11-3.13.
    "beam": [
        "apache-beam>=2.77,<3",
    ],
    "notebook": [
        "jupyter",
        "ipykernel>=6.29,<8",
    ],
    # The TPU compiler (libtpu) at the version each jax release was built with: runs
    # on TPU VMs, and on any machine compiles for a TPU slice (python -m vit_jax.aot).
    # Compiled with: jax 0.10.2 + libtpu 0.0.42.1 (Python 3.11), jax 0.12.0.1 +
    # libtpu 0.0.50.1 (Python 3.12).
    "tpu": [
        "jax==0.10.2; python_version<'3.12'",
        "libtpu==0.0.42.1; python_version<'3.12'",
        "jax==0.12.0.1; python_version>='3.12'",
        "libtpu==0.0.50.1; python_version>='3.12'",
    ],
    # hf://org/name checkpoints through fsspec (huggingface_hub's file system).
    "hf": [
        "huggingface_hub>=2.4,<3",
    ],
    # Benchmarks against timm (PyTorch) on CPU; not needed for the library.
    "bench": [
        "torch>=2.9,<2.15",
        "timm>=1.0,<2",
    ],
}

setuptools.setup(
    name="vit_jax",
    version="0.1.0",
    description="Vision Transformers and MLP-Mixers in JAX / Flax NNX",
    # configs/ ships too, so config specs ('configs/finetune.py:b16,cifar10') work installed.
    packages=setuptools.find_packages(include=["vit_jax", "vit_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
