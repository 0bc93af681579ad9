"""Export the model zoo to ONNX (see tvm_smartmem/zoo.py); same as ``tvm-smartmem zoo``.

    python benchmarks/zoo.py                       # the 21 default models
    python benchmarks/zoo.py --models swin_tiny,bert_base --out /path/to/cache
"""

import sys

from tvm_smartmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["zoo", *sys.argv[1:]]))
