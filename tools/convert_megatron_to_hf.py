#!/usr/bin/env python
"""Convert a Megatron dist checkpoint (saved at any layout) to a Hugging Face model directory (one CPU process).

    python tools/convert_megatron_to_hf.py --ckpt-dir /ckpt/qwen7b --hf-dir /models/Qwen2.5-7B --out /export/qwen7b [--force]

--hf-dir is the reference directory whose config.json, generation config and tokenizer files are copied.
See fipo_megatron/checkpoint/convert.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fipo_megatron.checkpoint.cli import megatron_to_hf_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
