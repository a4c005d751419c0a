"""``python -m fipo_megatron --config CONFIG.yaml [dotted.key=value ...]`` (see ``fipo_megatron.cli``)."""

import sys

from fipo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main())
