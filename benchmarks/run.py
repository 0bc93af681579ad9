"""The benchmark suite (see tvm_smartmem/bench.py); same as ``tvm-smartmem bench``.

    python benchmarks/run.py --models swin_tiny,bert_base,resnet50 --targets llvm
    python benchmarks/run.py --models builtin:bert_layer --ablation --name ablation_bert_layer

Writes benchmarks/results/<name>.{json,md,png}.  Latency on cuda/opencl needs the device on this
machine; on the GPU machine use benchmarks/gpu_machine.py (see CONTRIBUTING.md).
"""

import sys

from tvm_smartmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
