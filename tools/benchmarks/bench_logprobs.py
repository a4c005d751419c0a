"""Peak memory and time of chunked vocab-parallel log-prob + entropy (forward + backward) vs naive full logits.

    python tools/benchmarks/bench_logprobs.py            # 20480 tokens x 151936 vocab, hidden 256
    python tools/benchmarks/bench_logprobs.py --quick    # small smoke test (seconds)
    python tools/benchmarks/bench_logprobs.py --device cuda   # on a GPU (torch.cuda.max_memory_allocated)

Each variant runs in its own subprocess. On CPU the peak is measured as the process's resident-set high
water mark (``VmHWM`` from /proc, reset through ``/proc/self/clear_refs`` after the inputs exist) minus
the resident set at that moment, so it is the extra memory the computation needed, allocator and
temporaries included. On CUDA it is ``max_memory_allocated`` minus the allocation after the inputs.

The naive variant (fp32 logits [T, V], ``log_softmax``, autograd) needs ~3 x T x V x 4 bytes: 37 GB at
20480 x 151936, more than a 24 GiB CPU box. On CPU it is therefore measured at ``--naive-tokens`` (same
vocabulary) next to the chunked variant at the same length (the like-for-like ratio), and its peak at
the full length is extrapolated linearly in T (the logits dominate) and labelled as such. Pass
``--naive-tokens`` equal to ``--tokens`` on a machine with the memory to measure it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1))


def _run_variant(args) -> dict:
    import torch

    from fipo_megatron.actor.logprobs import naive_log_probs, vocab_parallel_log_probs

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, generator=g)).to(device).requires_grad_(True)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(device).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    upstream = torch.randn(args.tokens, generator=g).to(device)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark to the current RSS
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if args.variant == "naive":
        logp, ent = naive_log_probs(hidden_TH=hidden, weight_VH=weight, labels_T=labels)
    else:
        logp, ent = vocab_parallel_log_probs(hidden_TH=hidden, weight_VH=weight, labels_T=labels,
                                             chunk_size=args.chunk_size)
    (logp * upstream).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
    out = {"variant": args.variant, "tokens": args.tokens, "seconds": elapsed, "peak_bytes": peak,
           "grad_bytes": hidden.numel() * 4 + weight.numel() * 4}
    if args.dump:
        torch.save({"logp": logp.detach().cpu(), "ent": ent.cpu(), "gh": hidden.grad.cpu(), "gw": weight.grad.cpu()}, args.dump)
    return out


def _child(variant: str, tokens: int, opts, dump: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(opts.vocab),
           "--hidden", str(opts.hidden), "--chunk-size", str(opts.chunk_size), "--device", opts.device,
           "--threads", str(opts.threads)] + (["--dump", dump] if dump else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_REPO, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"{variant} at {tokens} tokens failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _float64_reference(opts, tokens: int, *, rows: int) -> dict:
    """Log-prob and entropy of the first ``rows`` tokens in float64, from the same seeded inputs."""
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, opts.hidden, generator=g)
    weight = torch.randn(opts.vocab, opts.hidden, generator=g) / opts.hidden ** 0.5
    labels = torch.randint(0, opts.vocab, (tokens,), generator=g)
    logits = hidden[:rows].double() @ weight.double().t()
    logprobs = logits.log_softmax(-1)
    return {"logp": logprobs.gather(1, labels[:rows].unsqueeze(1)).squeeze(1),
            "ent": -(logprobs.exp() * logprobs).sum(-1)}


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20480)
    p.add_argument("--naive-tokens", type=int, default=None, help="length for the naive run (CPU default 2048)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--child", choices=["naive", "chunked"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        opts.variant = opts.child
        print(json.dumps(_run_variant(opts)))
        return
    if opts.quick:
        opts.tokens, opts.vocab, opts.hidden, opts.chunk_size = 2048, 8192, 64, 256
    naive_tokens = opts.naive_tokens or (opts.tokens if opts.device == "cuda" or opts.quick else min(opts.tokens, 2048))

    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        dn, dc = os.path.join(tmp, "naive.pt"), os.path.join(tmp, "chunked.pt")
        naive = _child("naive", naive_tokens, opts, dump=dn)
        chunked_same = _child("chunked", naive_tokens, opts, dump=dc)
        a, b = torch.load(dn), torch.load(dc)
        errs = {k: _max_err(a[k], b[k]) for k in ("logp", "ent", "gh", "gw")}
        # relative error for the weight gradient, whose entries are sums over all tokens
        errs["gw_rel"] = errs["gw"] / max(float(a["gw"].abs().max()), 1e-30)
        ref = _float64_reference(opts, naive_tokens, rows=256)
        errs64 = {name: (_max_err(a[k][:256], ref[k]), _max_err(b[k][:256], ref[k])) for name, k in
                  (("logp", "logp"), ("entropy", "ent"))}
    full = chunked_same if opts.tokens == naive_tokens else _child("chunked", opts.tokens, opts)

    mib = 1 / 2 ** 20
    where = "torch.cuda.max_memory_allocated" if opts.device == "cuda" else "VmHWM - VmRSS (own subprocess)"
    print(f"# vocab {opts.vocab}, hidden {opts.hidden}, chunk {opts.chunk_size}, device {opts.device}, "
          f"fp32, threads {opts.threads}; peak = {where}")
    print(f"at {naive_tokens} tokens: naive peak {naive['peak_bytes'] * mib:9.1f} MiB  {naive['seconds']:7.2f} s | "
          f"chunked peak {chunked_same['peak_bytes'] * mib:9.1f} MiB  {chunked_same['seconds']:7.2f} s | "
          f"peak ratio {chunked_same['peak_bytes'] / naive['peak_bytes']:.3f}, "
          f"time ratio {chunked_same['seconds'] / naive['seconds']:.2f}")
    print(f"max abs error chunked vs naive: logp {errs['logp']:.2e}, entropy {errs['ent']:.2e}, "
          f"grad hidden {errs['gh']:.2e}, grad weight {errs['gw']:.2e} (rel {errs['gw_rel']:.2e})")
    print("max abs error vs float64 (first 256 tokens), naive | chunked: " + ", ".join(
        f"{name} {n:.2e} | {c:.2e}" for name, (n, c) in errs64.items()))
    if opts.tokens != naive_tokens:
        est = naive["peak_bytes"] * opts.tokens / naive_tokens
        print(f"at {opts.tokens} tokens: chunked peak {full['peak_bytes'] * mib:9.1f} MiB  {full['seconds']:7.2f} s "
              f"(of which grads of hidden+weight {full['grad_bytes'] * mib:.1f} MiB) | naive peak EXTRAPOLATED "
              f"{est * mib:9.1f} MiB (linear in T) | peak ratio {full['peak_bytes'] / est:.3f}")


if __name__ == "__main__":
    main()
