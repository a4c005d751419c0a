#!/usr/bin/env python
"""Convert a Hugging Face model directory to a Megatron dist checkpoint (one CPU process).

    python tools/convert_hf_to_megatron.py --hf-dir /models/Qwen2.5-7B --out /ckpt/qwen7b --tp 4 --pp 1 [--force]

The checkpoint is layout-free: the actor loads it at any tp/pp; --tp/--pp are validated against the
model and recorded. See fipo_megatron/checkpoint/convert.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fipo_megatron.checkpoint.cli import hf_to_megatron_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
