"""Packaging: ``mbt_fast`` plus ``kernels/`` (Triton) as ``mbt_fast.kernels`` and ``csrc/`` (CUDA
sources and their build recipe) as ``mbt_fast.csrc``, so an installed package can JIT-build them.

The CUDA extension is built on first use (JIT, cached) or ahead of time here with
``MBT_FAST_BUILD_CUDA=1 pip install --no-build-isolation .`` (needs torch in the build environment).
"""
import importlib.util
import os

from setuptools import setup

kwargs = {}
if os.environ.get("MBT_FAST_BUILD_CUDA", "0") == "1":
    spec = importlib.util.spec_from_file_location("_mbt_build", os.path.join(os.path.dirname(__file__), "csrc", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    kwargs = build.setup_kwargs()

setup(
    packages=["mbt_fast", "mbt_fast.commands", "mbt_fast.ops", "mbt_fast.data", "mbt_fast.train", "mbt_fast.kernels", "mbt_fast.csrc"],
    package_dir={"mbt_fast.kernels": "kernels", "mbt_fast.csrc": "csrc"},
    package_data={"mbt_fast": ["backend_evidence.json"], "mbt_fast.data": ["labels/*.csv", "labels/*.md"], "mbt_fast.csrc": ["**/*.cu", "**/*.cuh", "**/*.cpp", "**/*.h"]},
    **kwargs,
)
