"""Install tvm-smartmem: ``pip install .`` (add ``[test]`` for the test suite, ``[zoo]`` for
exporting the model zoo with PyTorch)."""

from pathlib import Path

from setuptools import find_packages, setup

TVM_PINS = [
    # 0.27 is the Relax + TIR release this plugin targets; newer ffi releases segfault in
    # tvm.ir.save_json (ConvertLayout with packed layouts, texture pipeline, tuning).
    "apache-tvm==0.27.0.post1",
    "apache-tvm-ffi==0.1.14.post1",
]

setup(
    name="tvm-smartmem",
    version="0.1.0",
    description="SmartMem / DNNFusion layout elimination, fusion and 2.5D texture memory "
    "for Apache TVM (Relax), aimed at mobile GPUs",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["tvm_smartmem", "tvm_smartmem.*"]),
    package_data={"tvm_smartmem": ["runtime/opencl/*.cc", "runtime/opencl/*.h",
                                   "runtime/opencl/shim/tvm/support/*.h",
                                   "tir/matmul_configs.json"]},
    install_requires=[
        *TVM_PINS,
        "onnx>=1.16",
        "numpy>=1.26",
        "xgboost>=2.0",
        # the reference every numerical check compares with (`tvm-smartmem report`)
        "onnxruntime>=1.18",
        # the plots of `tvm-smartmem bench` and the benchmark scripts
        "matplotlib>=3.7",
        # tvm.rpc and meta_schedule need these but the wheel does not pull them in
        "cloudpickle",
        "psutil",
        "tornado",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "hypothesis>=6.100",
            "ruff==0.17.6",  # pinned: new rules must not turn main red by themselves
            # the torch.export frontend route is tested with a CPU build of torch
            "torch==2.13.0",
            # the OpenCL runtime is tested on PoCL, a CPU OpenCL device with image support
            "pyopencl[pocl]",
            # the zoo's export machinery is tested on a small torch module
            "onnxscript",
        ],
        # an OpenCL device for machines without a GPU (PoCL); vendor drivers are preferred
        "opencl": ["pyopencl[pocl]"],
        "zoo": [
            "torch==2.13.0",
            "torchvision==0.28.0",
            "transformers==4.57.6",
            "timm",
            "diffusers",
            "onnxscript",
            "matplotlib",
        ],
    },
    entry_points={
        "console_scripts": ["tvm-smartmem = tvm_smartmem.cli:main"],
        # `import tvm` calls every entry point of this group: registers the "smartmem" pipeline
        "tvm.backends": ["smartmem = tvm_smartmem._plugin:_autoload"],
    },
)
