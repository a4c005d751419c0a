"""FutureKL: this project's O(B*L) chunked scan vs the released O(B*L^2) block-matrix method, plus CP bytes.

    python tools/benchmarks/bench_future_kl.py             # B=8, L in {2048, 8192, 20480}, fp32
    python tools/benchmarks/bench_future_kl.py --quick     # seconds: B=2, L in {256, 512}
    python tools/benchmarks/bench_future_kl.py --device cuda
    python tools/benchmarks/bench_future_kl.py --threads 2   # CPU intra-op threads (default 1)

Variants, all on the same fp32 input ``x`` (B, L) (log-ratio-like values, N(0, 0.05^2) with a few
large entries):
- ``released``: the method of the released FIPO loss, re-implemented here from its description in docs/algorithm.md §3:
  for each block of 128 future positions, an (L x 128) decay matrix ``gamma^(j - i) * [j >= i]`` is
  formed and multiplied in: O(B*L^2) flops and O(L^2) ``pow`` calls;
- ``ours``: ``fipo_megatron.algo.future_kl.future_kl`` (default: the scan accumulates in float64);
- ``ours_fp32``: the same scan with ``compute_dtype=None`` (pure fp32).
Time is the best of ``--repeats`` runs after a warm-up (on CPU the released method at L=20480 is
timed once, without warm-up: it takes seconds and has no caches to warm). Error is the max abs
difference to a float64 per-token recurrence ``F_t = x_t + gamma * F_{t+1}`` (independent of both).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs; on CPU, the process's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident
set before the call, i.e. the extra memory the call needed. So that freed tensors leave the resident
set at once, the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps
every block over 64 KiB separately and unmaps it on free). An analytic figure (the largest live
temporaries) is printed next to it.

CP bytes: what one CP rank sends to complete FutureKL of one sequence of L tokens: this project's
carry exchange all-gathers 2 float64 chunk totals per sequence (16 bytes per rank, 2*CP scalars in all)
vs gathering the rank's L/CP fp32 log-ratio values so every rank can scan the whole sequence.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from fipo_megatron.algo.future_kl import future_kl, gamma_from_tau  # noqa: E402

RELEASED_BLOCK = 128


def released_future_kl(x_BL: torch.Tensor, gamma: float, block: int = RELEASED_BLOCK) -> torch.Tensor:
    """The released method: sum over blocks of ``x_block @ decay_block^T`` with an (L x block) decay matrix."""
    num_rows, seq_len = x_BL.shape
    out = torch.zeros_like(x_BL)
    pos_i = torch.arange(seq_len, device=x_BL.device)[:, None]
    gamma_t = torch.tensor(gamma, dtype=x_BL.dtype, device=x_BL.device)
    for start in range(0, seq_len, block):
        end = min(seq_len, start + block)
        dist = torch.arange(start, end, device=x_BL.device)[None, :] - pos_i  # (L, Kb)
        decay = torch.pow(gamma_t, dist.clamp(min=0)) * (dist >= 0).to(x_BL.dtype)
        out += x_BL[:, start:end] @ decay.t()
    return out


def reference_fp64(x_BL: torch.Tensor, gamma: float) -> torch.Tensor:
    x = x_BL.double().cpu()
    out = torch.empty_like(x)
    acc = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        out[:, t] = acc
    return out


def _read_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def _peak_bytes(fn, device: str) -> int:
    """Extra memory ``fn()`` needed above what was live before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return -1
    base = _read_kib("VmRSS")
    fn()
    return (_read_kib("VmHWM") - base) * 1024


def _time(fn, repeats: int, device: str, *, warmup: bool = True) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls (the least-disturbed run: the CPU box is shared) and the last output."""
    if warmup:
        fn()  # decay-matrix caches, allocator
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(*, batch: int, lengths: list[int], repeats: int, device: str, tau: float = 32.0) -> list[dict]:
    gamma = gamma_from_tau(tau)
    rows = []
    for seq_len in lengths:
        gen = torch.Generator().manual_seed(seq_len)
        x = torch.randn(batch, seq_len, generator=gen) * 0.05
        x[:, ::97] += 0.5  # a few large log-ratios
        x = x.to(device)
        ref = reference_fp64(x, gamma)
        variants = {"released": lambda: released_future_kl(x, gamma),
                    "ours": lambda: future_kl(x, gamma),
                    "ours_fp32": lambda: future_kl(x, gamma, compute_dtype=None)}
        res = {"L": seq_len}
        for name, fn in variants.items():
            slow = name == "released" and seq_len > 8192 and device == "cpu"  # seconds per call: run it twice
            res[f"{name}_s"], out = _time(fn, 1 if slow else repeats, device, warmup=not slow)
            res[f"{name}_err"] = (out.double().cpu() - ref).abs().max().item()
            res[f"{name}_peak"] = _peak_bytes(fn, device)
        # Analytic temporaries: released = out + one (L x 128) decay block, its fp32 mask and int64 distance;
        # ours = the chunk-aligned fp64 copy, the local scan and the result (~4 x B*L*8 bytes).
        res["released_analytic"] = batch * seq_len * 4 + seq_len * RELEASED_BLOCK * (4 + 4 + 8)
        res["ours_analytic"] = 4 * batch * seq_len * 8
        rows.append(res)
    return rows


def cp_bytes(seq_len: int, cp_sizes: list[int]) -> list[dict]:
    return [{"cp": cp, "carry_bytes": 2 * 8, "gather_bytes": seq_len // cp * 4} for cp in cp_sizes]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (1: robust timings on a shared box; both methods get the same)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _report(args)
    finally:
        torch.set_num_threads(prev_threads)  # main() may be called in-process (the smoke test)


def _report(args) -> list[dict]:
    batch, lengths, repeats = (2, [256, 512], 2) if args.quick else (args.batch, [2048, 8192, 20480], args.repeats)
    rows = run(batch=batch, lengths=lengths, repeats=repeats, device=args.device)
    mib = lambda b: f"{b / 2**20:8.2f}" if b >= 0 else "     n/a"  # noqa: E731
    print(f"FutureKL, B={batch}, fp32 input, tau=32, device={args.device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}")
    print(f"{'L':>6} | {'released ms':>11} {'ours ms':>8} {'fp32 ms':>8} | {'speed-up':>8} {'fp32 x':>7} | "
          f"{'max|err| rel.':>13} {'ours':>9} {'ours_fp32':>9} | peak MiB rel. / ours (analytic rel. / ours)")
    for r in rows:
        print(f"{r['L']:>6} | {r['released_s'] * 1e3:>11.2f} {r['ours_s'] * 1e3:>8.3f} "
              f"{r['ours_fp32_s'] * 1e3:>8.3f} | "
              f"{r['released_s'] / r['ours_s']:>7.0f}x {r['released_s'] / r['ours_fp32_s']:>6.0f}x | "
              f"{r['released_err']:>13.2e} {r['ours_err']:>9.2e} {r['ours_fp32_err']:>9.2e} | "
              f"{mib(r['released_peak'])} / {mib(r['ours_peak'])} "
              f"({mib(r['released_analytic'])} / {mib(r['ours_analytic'])})")
    seq_len = lengths[-1]
    print(f"\nBytes one CP rank sends to complete FutureKL, per sequence of L={seq_len} (x B={batch} for the batch):")
    for c in cp_bytes(seq_len, [2, 4, 8]):
        print(f"  CP={c['cp']}: carries {c['carry_bytes']} B vs all-gather of the sequence {c['gather_bytes']} B "
              f"({c['gather_bytes'] / c['carry_bytes']:.0f}x less); batch: {c['carry_bytes'] * batch} B vs "
              f"{c['gather_bytes'] * batch} B")
    return rows


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # see "Peak memory" above
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    main()
