"""Builds gallop_kernels._C with CMake (pybind11's CMake pattern).

Knobs (environment): GALLOP_WITH_CUDA=AUTO|ON|OFF, GALLOP_BUILD_JOBS=N.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("building gallop_kernels._C needs pybind11: pip install pybind11") from e
        extdir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGALLOP_WITH_CUDA={os.environ.get('GALLOP_WITH_CUDA', 'AUTO')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("GALLOP_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    name="gallop_kernels",
    version="0.1.0",
    description="GaLLoP sparse fine-tuning with Triton selection and CUDA sparse AdamW kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gallop_kernels", "gallop_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # named parameters in torch.optim param groups
        "triton>=3.2",  # tl.math.div_rn, triton.compiler.ASTSource with GPUTarget
        "numpy",  # Triton's interpreter (TRITON_INTERPRET=1: the Triton kernels on the CPU) imports it; neither triton nor torch declares it
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pybind11>=2.12",
            "transformers>=4.46",
            "datasets>=3",
            "accelerate>=1.0",  # transformers.Trainer needs it
            "trl>=1.16",  # tests of gallop_trainer(trl.SFTTrainer) (1.16.0 tested; the library does not need it)
        ],
        # gallop finetune / compare / apply (see README, "Fine-tuning and evaluating")
        "finetune": [
            "transformers>=4.46",
            "datasets>=3",  # load_from_disk of the task folders
            "accelerate>=1.0",  # transformers needs it to load the GGUF file
            "gguf>=0.10",  # transformers reads the built-in model's GGUF file with it
            "peft>=0.13",  # the LoRA baseline
            "safetensors>=0.4",  # sparse delta files
            "tqdm>=4.60",  # progress bars
            "matplotlib>=3.7",  # the Pareto plot of gallop compare
        ],
    },
    entry_points={"console_scripts": ["gallop=gallop_kernels.finetune.cli:entry"]},
    ext_modules=[CMakeExtension("gallop_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
