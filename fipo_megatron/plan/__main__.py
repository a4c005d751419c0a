"""``python -m fipo_megatron.plan``: see ``fipo_megatron.plan.cli``."""

import sys

from fipo_megatron.plan.cli import main

sys.exit(main())
