"""The Megatron actor's training step against a plain PyTorch loop on the same transformers model, and the
embedded rollout engine against transformers' ``generate``.

    OMP_NUM_THREADS=1 python tools/benchmarks/bench_actor_vs_plain.py                 # everything (~1.5 h on 1 core)
    OMP_NUM_THREADS=1 python tools/benchmarks/bench_actor_vs_plain.py --lengths 1024 --repeats 1 --skip-memory
    OMP_NUM_THREADS=1 python tools/benchmarks/bench_actor_vs_plain.py --only engine
    python tools/benchmarks/bench_actor_vs_plain.py --device cuda --dtype bfloat16 --out figures.txt

Model: a Llama shape of 44.8M parameters (hidden 512, 4 layers, 8 heads, 4 KV heads, MLP 1440, vocab
32000, untied), random weights; every arm starts from the same weights (the HF model saved and loaded into
the actor). Both arms work under the same activation budget of ``--tokens`` tokens (default 8192) per
micro-batch, and take one optimizer step over the whole step's sequences (one mini-batch):
- ``actor``: ``MegatronActor.update`` on one gloo rank: the old-log-prob pass, then one FIPO mini-batch
  (packed THD micro-batches of at most ``--tokens`` tokens, chunked vocab-parallel log-prob, Megatron's DDP
  and Adam).
- ``plain``: transformers' forward on right-padded micro-batches of ``tokens // L`` sequences (the number
  that fits the budget at the longest length L), log-softmax gather (no-grad pass for the old log-probs,
  then with grad), the same dual-clip PPO loss (token mean over the step), backward with gradient
  accumulation, ``torch.optim.AdamW``. Each micro-batch is padded to its own longest sequence.
- ``plain_max`` (spread only): the same loop with every sequence padded to L, the layout of padded RL
  trainers, whose rollout pads each response to the configured maximum response length (verl,
  ``verl/workers/rollout/vllm_rollout/vllm_rollout_spmd.py``, ``generate_sequences``:
  ``pad_2d_list_to_length(response, ..., max_length=self.config.response_length)``, read at commit
  006cefd3262f81fcd694e36c7451fed5a8ec1e9d) when remove-padding is off.
Two length patterns:
- ``equal``: ``tokens / L`` sequences of exactly L tokens (one micro-batch, nothing to pad: the arms' cost
  per token).
- ``spread``: ``max(4, 2 * tokens / L)`` sequences with lengths uniform in [L/4, L], in the order drawn
  (as a rollout returns them): the actor packs them by first-fit decreasing, the plain loop pads.

Time: both arms in this process, alternating, one warm-up each, then ``--repeats`` timed steps each; min and
median are printed, the ratio is of the minima (the machine is shared, the minimum is the least disturbed).
Peak memory: each arm also runs one step alone in a fresh subprocess, which reports its peak RSS (VmHWM from
/proc/self/status; on CUDA ``torch.cuda.max_memory_allocated``), so the arms' peaks do not mix.

Engine: ``EmbeddedEngine.generate`` vs ``model.generate`` (``--gen-tokens`` new tokens, 4 prompts) at 64-
and 512-token prompts, same model, alternating, min of repeats: greedy with one response per prompt, and
sampled at temperature 1 with ``--gen-n`` responses per prompt (a GRPO group; ``num_return_sequences`` in
``generate``, which expands the prompts before its prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

SHAPE = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1440, vocab_size=32000)
CLIP_LOW, CLIP_HIGH, CLIP_C = 0.2, 0.28, 10.0
LR = 1e-6


def _hf_config(max_len: int):
    from fipo_megatron.testing.tiny_models import tiny_hf_config

    return tiny_hf_config("llama", max_position_embeddings=max(4096, max_len), **SHAPE)


def _hf_model(max_len: int, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(_hf_config(max_len), dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _lengths(pattern: str, length: int, tokens: int, seed: int = 0) -> list[int]:
    if pattern == "equal":
        return [length] * max(1, tokens // length)
    # Enough sequences that the step has micro-batches to pack (at least 4, two budgets' worth at short L).
    num = max(4, 2 * tokens // length)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(length // 4, length + 1, (num,), generator=g).tolist()


def _plain_micro_batches(lengths: list[int], *, length: int, tokens: int, pad_to_max: bool) -> list[tuple[list[int], int]]:
    """The plain loop's micro-batches: ``(indices, padded length)``, ``tokens // L`` sequences each, in order."""
    per = max(1, tokens // length)
    out = []
    for start in range(0, len(lengths), per):
        idx = list(range(start, min(start + per, len(lengths))))
        out.append((idx, length if pad_to_max else max(lengths[i] for i in idx)))
    return out


def _samples(lengths: list[int], vocab: int, seed: int = 0):
    from fipo_megatron.batch import Sample, TrainBatch

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(lengths):
        prompt = max(1, n // 8)
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids[:prompt], response_ids=ids[prompt:],
                              advantage=float(torch.randn(1, generator=g)), group_id=i))
    return TrainBatch(samples=samples, num_responses_per_prompt=1, temperature=1.0)


# ---------------------------------------------------------------- the two arms
class ActorArm:
    """``MegatronActor`` on one gloo rank of this process (process group initialised here)."""

    def __init__(self, hf_dir: str, *, max_len: int, tokens: int, dtype: str, device: torch.device):
        import torch.distributed as dist

        from fipo_megatron.actor.actor import MegatronActor
        from fipo_megatron.actor.config import ActorConfig
        from fipo_megatron.algo.policy_loss import PolicyLossConfig
        from fipo_megatron.parallel.topology import ParallelConfig

        if not dist.is_initialized():
            store = tempfile.NamedTemporaryFile(prefix="bench_actor_store_", delete=False).name
            os.remove(store)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        self.config = ActorConfig(ppo_mini_batch_size=10**6, max_tokens_per_micro_batch=tokens + 64,
                                  lr=LR, lr_warmup_steps=0, params_dtype=dtype, clip_grad=1.0, seed=0)
        self.actor = MegatronActor(hf_config=_hf_config(max_len), parallel=ParallelConfig(),
                                   actor_config=self.config,
                                   loss_config=PolicyLossConfig(clip_ratio_low=CLIP_LOW, clip_ratio_high=CLIP_HIGH,
                                                                clip_ratio_c=CLIP_C))
        self.actor.load_hf_weights(hf_dir)

    def step(self, batch):
        import dataclasses

        self.actor.config = dataclasses.replace(self.config, ppo_mini_batch_size=len(batch.samples))
        return self.actor.update(batch)


class PlainArm:
    """The same HF model, right-padded micro-batches with gradient accumulation, dual-clip PPO loss, AdamW.

    ``length``: the longest sequence length L of the benchmark row (micro-batches hold ``tokens // L``
    sequences); ``pad_to_max``: pad every sequence to L instead of to its micro-batch's longest."""

    def __init__(self, model, device: torch.device, *, tokens: int, length: int, pad_to_max: bool = False):
        self.model = model.to(device).train()
        self.device = device
        self.tokens, self.length, self.pad_to_max = tokens, length, pad_to_max
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
        self.padded_tokens = 0  # of the last step

    def _logp(self, ids_BL, mask_BL):
        logits = self.model(input_ids=ids_BL, attention_mask=mask_BL).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, ids_BL[:, 1:, None])[..., 0]

    def _pad(self, samples, width: int):
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        loss_mask = torch.zeros(len(samples), width - 1)
        for b, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            loss_mask[b, len(s.prompt_ids) - 1:len(seq) - 1] = 1  # positions predicting response tokens
        adv = torch.tensor([s.advantage for s in samples])[:, None]
        return [x.to(self.device) for x in (ids, mask, loss_mask, adv)]

    def step(self, batch):
        samples = batch.samples
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        plan = _plain_micro_batches(lengths, length=max(self.length, max(lengths)), tokens=self.tokens,
                                    pad_to_max=self.pad_to_max)
        total_response = sum(len(s.response_ids) for s in samples)  # token mean over the whole step
        self.padded_tokens, loss_sum = 0, 0.0
        for idx, width in plan:
            ids, mask, loss_mask, adv = self._pad([samples[i] for i in idx], width)
            self.padded_tokens += ids.numel()
            with torch.no_grad():
                old = self._logp(ids, mask)
            logp = self._logp(ids, mask)
            ratio = torch.exp(logp - old)
            pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
            pg = torch.where(adv < 0, torch.minimum(pg, -adv * CLIP_C), pg)
            loss = (pg * loss_mask).sum() / total_response
            loss.backward()
            loss_sum += float(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum


# ---------------------------------------------------------------- measurement
def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def _build(arm: str, args, hf_dir: str, device, *, length: int):
    dtype = getattr(torch, args.dtype)
    if arm == "actor":
        return ActorArm(hf_dir, max_len=args.max_len, tokens=args.tokens, dtype=args.dtype, device=device)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    return PlainArm(model, device, tokens=args.tokens, length=length, pad_to_max=arm == "plain_max")


def _child(args) -> None:
    """One arm, one step, alone in this process: print its peak memory as JSON."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    arm = _build(args.child, args, args.hf_dir, device, length=args.length)
    batch = _samples(_lengths(args.pattern, args.length, args.tokens), SHAPE["vocab_size"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    arm.step(batch)
    _sync(device)
    print(json.dumps({"peak_bytes": _peak_bytes(device)}))


def _child_peak(arm: str, pattern: str, length: int, args, hf_dir: str) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", arm, "--pattern", pattern, "--length", str(length),
           "--hf-dir", hf_dir, "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype,
           "--threads", str(args.threads), "--max-len", str(args.max_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)["peak_bytes"] / 2**20


def _time_arms(arms: dict, batch, warmup, repeats: int, device) -> dict[str, list[float]]:
    """Alternate the arms; round 0 runs ``warmup`` (a smaller batch: Adam state, allocator, kernels)."""
    times = {name: [] for name in arms}
    for i in range(repeats + 1):
        for name, arm in arms.items():
            _sync(device)
            t0 = time.perf_counter()
            arm.step(warmup if i == 0 else batch)
            _sync(device)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return times


def bench_training(args, emit) -> None:
    import transformers

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = _hf_model(args.max_len, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    hf_dir = tempfile.mkdtemp(prefix="bench_actor_hf_")
    model.save_pretrained(hf_dir)
    del model
    emit(f"# model: llama {SHAPE}, {num_params / 1e6:.1f}M parameters, {args.dtype}, device {args.device}, "
         f"threads {torch.get_num_threads()}, {args.tokens} tokens per micro-batch, repeats {args.repeats}")
    actor = _build("actor", args, hf_dir, device, length=args.max_len)
    mem_note = "peak RSS (VmHWM) of a fresh subprocess per arm" if device.type == "cpu" else \
        "torch.cuda.max_memory_allocated of a fresh subprocess per arm"
    emit(f"# memory: {mem_note}; times: min / median of the timed steps; x = plain arm time / actor time")
    emit("| pattern | L | seqs | real tokens | padded: plain / plain_max | actor s | plain s | plain_max s | "
         "plain / actor | plain_max / actor | MiB actor / plain / plain_max |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|")
    for pattern in args.patterns:
        for length in args.lengths:
            lengths = _lengths(pattern, length, args.tokens)
            batch = _samples(lengths, SHAPE["vocab_size"])
            warmup = _samples(lengths[:max(1, args.tokens // length)], SHAPE["vocab_size"])
            names = ["actor", "plain"] + (["plain_max"] if pattern == "spread" else [])
            arms = {"actor": actor}
            for name in names[1:]:
                hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
                arms[name] = PlainArm(hf, device, tokens=args.tokens, length=length, pad_to_max=name == "plain_max")
            times = _time_arms(arms, batch, warmup, args.repeats, device)
            best = {name: min(t) for name, t in times.items()}
            cell = {name: f"{best[name]:.2f} / {statistics.median(times[name]):.2f}" for name in names}
            padded = {name: arms[name].padded_tokens for name in names[1:]}
            mem = {name: "-" for name in names}
            if not args.skip_memory:
                mem = {name: f"{_child_peak(name, pattern, length, args, hf_dir):.0f}" for name in names}
            emit(f"| {pattern} | {length} | {len(lengths)} | {sum(lengths)} | {padded['plain']} / "
                 f"{padded.get('plain_max', '-')} | {cell['actor']} | {cell['plain']} | {cell.get('plain_max', '-')} | "
                 f"{best['plain'] / best['actor']:.2f}x | "
                 + (f"{best['plain_max'] / best['actor']:.2f}x" if "plain_max" in best else "-")
                 + f" | {' / '.join(mem[n] for n in names)} |")
            del arms


def bench_engine(args, emit) -> None:
    from fipo_megatron.rollout.base import SamplingParams
    from fipo_megatron.rollout.embedded import EmbeddedEngine

    device = torch.device(args.device)
    model = _hf_model(args.max_len, getattr(torch, args.dtype)).to(device).eval()
    engine = EmbeddedEngine(model=model, eos_token_ids=[], device=device)
    emit(f"# engine: EmbeddedEngine.generate vs model.generate, {args.gen_tokens} new tokens, 4 prompts, "
         f"min of {args.repeats} after a warm-up")
    emit("| prompt tokens | samples per prompt | engine s | generate s | engine/generate |")
    emit("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for prompt_len, n in ((64, 1), (512, 1), (64, args.gen_n), (512, args.gen_n)):
        prompts = torch.randint(0, SHAPE["vocab_size"], (4, prompt_len), generator=g)
        greedy = n == 1
        # n > 1: plain sampling at temperature 1 in both (generate's default top_k=50 switched off).
        sampling = SamplingParams(temperature=0.0 if greedy else 1.0, max_new_tokens=args.gen_tokens, n=n, seed=0)
        extra = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                      "top_p": 1.0, "num_return_sequences": n}

        def run_engine():
            return engine.generate(prompts.tolist(), sampling)

        def run_generate():
            with torch.no_grad():
                ids = prompts.to(device)
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_tokens,
                                      min_new_tokens=args.gen_tokens, eos_token_id=None, pad_token_id=0, **extra)

        times = {"engine": [], "generate": []}
        for i in range(args.repeats + 1):
            for name, fn in (("engine", run_engine), ("generate", run_generate)):
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                if i > 0:
                    times[name].append(time.perf_counter() - t0)
                if name == "engine":
                    ours = [o.token_ids for o in out]
                else:
                    theirs = out[:, prompt_len:].tolist()
        e, h = min(times["engine"]), min(times["generate"])
        if greedy:
            note = f"greedy tokens identical for {sum(a == b for a, b in zip(ours, theirs))}/4 prompts"
        else:
            note = (f"sampled; both return {len(ours)} x {len(ours[0])} and {len(theirs)} x {len(theirs[0])} tokens; "
                    f"distinct samples: engine {len(set(map(tuple, ours)))}, generate {len(set(map(tuple, theirs)))}")
        emit(f"| {prompt_len} | {n} | {e:.3f} | {h:.3f} | {e / h:.3f} |  ({note})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["training", "engine"], default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--patterns", nargs="+", default=["equal", "spread"], choices=["equal", "spread"])
    parser.add_argument("--tokens", type=int, default=8192,
                        help="tokens per micro-batch, both arms (equal: the step is one micro-batch of tokens / L sequences)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--gen-n", type=int, default=8, help="samples per prompt in the engine's sampled rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default=None, help="also append the figures to this file")
    # internal: one arm in a fresh process (peak memory)
    parser.add_argument("--child", choices=["actor", "plain", "plain_max"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pattern", default="equal", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-len", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_len = args.max_len or max(args.lengths + [args.length])
    torch.set_num_threads(args.threads)
    if args.child:
        _child(args)
        return

    def emit(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if args.only in (None, "engine"):
        bench_engine(args, emit)
    if args.only in (None, "training"):
        bench_training(args, emit)


if __name__ == "__main__":
    main()
