"""The memory plan against a real actor on CPU: static bytes (exact) and one micro-batch's saved activations.

    OMP_NUM_THREADS=1 .venv/bin/python tools/benchmarks/plan_vs_measured_cpu.py [--out plan_cpu.json]

For each case a one-process (gloo) ``MegatronActor`` of a small Llama/Qwen shape is built and stepped once;
its parameter, DDP gradient-buffer and optimizer-state bytes are compared with ``plan.memory.estimate`` of
the same config, and the bytes autograd saves over one forward step (``plan.measure``: distinct storages,
parameters excluded) at 2 and 4 layers give the measured per-layer activation and the rest (final norm,
log-prob, loss), compared with ``plan.memory.layer_activation_bytes`` (local spec, recompute none: the
only recompute CPU supports). Prints a table; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CASES = [  # (family, dtype, tokens, hidden, heads, kv heads, ffn, vocab)
    ("llama", "float32", 512, 128, 8, 2, 352, 1024),
    ("qwen2", "float32", 1024, 128, 8, 2, 352, 1024),
    ("qwen3", "float32", 2048, 128, 8, 4, 256, 2048),
]
# bf16 parameters need Megatron's Float16 optimizer, which accepts CUDA tensors only: its exactness is
# checked by tools/benchmarks/plan_vs_measured_gpu.py.


def run_all(cases=CASES) -> list[dict]:
    from fipo_megatron.plan.measure import measure_case, plan_case
    from fipo_megatron.testing.distributed import run_distributed

    rows = []
    for case in cases:
        m2, _, _ = run_distributed(measure_case, world_size=1, args=(case, 2))[0]
        m4, cfg, hf = run_distributed(measure_case, world_size=1, args=(case, 4))[0]
        static, layer_est, rest_est = plan_case(cfg, hf, case[2])
        layer_meas = (m4["saved"] - m2["saved"]) // 2
        rest_meas = m4["saved"] - 4 * layer_meas
        rows.append(dict(case=f"{case[0]} {case[1]} {case[2]} tokens h{case[3]} a{case[4]}/{case[5]} f{case[6]}",
                         static_plan=static, static_measured=m4["static"],
                         layer_plan=layer_est, layer_measured=layer_meas, rest_plan=rest_est, rest_measured=rest_meas,
                         total_plan=4 * layer_est + rest_est, total_measured=m4["saved"]))
    return rows


def format_rows(rows: list[dict]) -> str:
    """The markdown table of ``run_all``'s rows."""
    mib = 2**20
    out = ["| case | static bytes: plan = measured | per-layer plan / measured | ratio "
           "| rest of the step plan / measured | ratio | 4-layer step plan / measured | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["static_plan"] == r["static_measured"] else f"NO {r['static_plan']} vs {r['static_measured']}"
        out.append(f"| {r['case']} | {same} | {r['layer_plan'] / mib:.2f} / {r['layer_measured'] / mib:.2f} MiB "
                   f"| {r['layer_plan'] / r['layer_measured']:.3f} | {r['rest_plan'] / mib:.2f} / "
                   f"{r['rest_measured'] / mib:.2f} MiB | {r['rest_plan'] / r['rest_measured']:.3f} "
                   f"| {r['total_plan'] / mib:.2f} / {r['total_measured'] / mib:.2f} MiB "
                   f"| {r['total_plan'] / r['total_measured']:.3f} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    rows = run_all()
    print(format_rows(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
