"""``python -m tvm_smartmem`` is the ``tvm-smartmem`` command."""

import sys

from .cli import main

sys.exit(main())
