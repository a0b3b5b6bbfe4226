"""Benchmark probe.sampling.sampler against transformers `generate`, and steered against unsteered sampling.

    python bench/sampling.py [--prompts 64] [--n 16] [--new-tokens 24] [--repeats 3] [--profile]

One random tiny-but-realistic Qwen2 (~2.4M params, vocab 128), prompts of 8 tokens. Measures, in
one run and on the same device: tokens/s of `sample_branches` vs `model.generate(do_sample=True,
num_return_sequences=n)` producing the same number of samples (goal: >= 2x); the time of an
always-on steering hook (a forward hook adding a vector to one decoder layer, via `intervention`)
relative to no hook (goal: <= 1.05x); and the sampler fed every row as its own prompt (prefill per
row instead of once per prompt), which isolates what the shared prefill buys. Warm-up first, then
`--repeats` rounds with the methods interleaved; each figure is the median. Wall and process-CPU
times are both reported: on a shared CPU the CPU-time ratios are the reliable ones. The last line
is one JSON record.

    python bench/sampling.py --real [--prompts 32] [--n 8] [--new-tokens 96] [--threads 2]

The real model instead (SmolLM2-135M-Instruct, installed by `forksight fetch-real-base`): the same
word-problem prompts through its chat template, sampled by `sample_branches` with the model in
float32 and in bfloat16, interleaved, median of `--repeats` (goal: bfloat16 >= 1.8x float32 tokens/s on
a CPU with avx512_bf16). Samples end at eos, so each precision's tokens/s is over the tokens it made.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from probe.sampling.sampler import SamplerConfig, sample_branches  # noqa: E402

EOS, PAD = 1, 0


class _Specials:
    """The sampler needs only eos/pad ids when prompts are token ids."""

    eos_token_id, pad_token_id = EOS, PAD


def build_model(args):
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=128, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * args.hidden,
                      max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def hf_generate(model, prompts: torch.Tensor, args) -> int:
    """transformers' sampler on the same rows; returns the number of generated tokens (eos incl.)."""
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             num_return_sequences=args.n, max_new_tokens=args.new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             pad_token_id=PAD, eos_token_id=EOS)
    new = out[:, prompts.shape[1]:]
    before_eos = (new == EOS).long().cumsum(-1) - (new == EOS).long() == 0  # up to the first eos
    return int(before_eos.sum())


def ours(model, prompts: torch.Tensor, args, steer=None, n=None) -> int:
    cfg = SamplerConfig(n=n or args.n, max_new_tokens=args.new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size,
                        device=args.device)
    b = sample_branches(model, _Specials, prompts.tolist(), cfg, intervention=steer)
    return int(b.mask.sum())


def steering(model, layer: int):
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    vec = vec.to(model.device, model.dtype)

    @contextmanager
    def intervention(state):
        handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: out + vec)
        try:
            yield
        finally:
            handle.remove()

    return intervention


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, tokens). CPU time is robust to other jobs on the host."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0, tokens


def real_precision(args) -> dict:
    """float32 vs bfloat16 tokens/s of `sample_branches` on the real base, in one run."""
    from experiments.fetch_real import REAL_BASE
    from probe.models.checkpoint import load_causal_lm
    from probe.tasks import load_task

    if not REAL_BASE.is_file():
        raise SystemExit(f"{REAL_BASE} is missing: install the real base first (make real-base)")
    models = {d: load_causal_lm(REAL_BASE, device=args.device, dtype=d) for d in ("float32", "bfloat16")}
    tok = models["float32"][1]
    task = load_task("math:experiments/real/smollm2/heldout.jsonl,chat")
    task.check_tokenizer(tok)
    prompts = task.heldout_prompts(args.prompts)
    cfg = SamplerConfig(n=args.n, max_new_tokens=args.new_tokens, seed=0, batch_size=args.batch_size or 1024,
                        device=args.device)

    def run(d):
        return lambda: int(sample_branches(models[d][0], tok, prompts, cfg).mask.sum())

    run("bfloat16")()  # warm-up
    runs: dict[str, list] = {d: [] for d in models}
    for _ in range(args.repeats):
        for d in models:
            runs[d].append(timed(run(d)))
    rate = {d: statistics.median(t / w for w, _, t in r) for d, r in runs.items()}
    rate_cpu = {d: statistics.median(t / c for _, c, t in r) for d, r in runs.items()}
    ratio, ratio_cpu = rate["bfloat16"] / rate["float32"], rate_cpu["bfloat16"] / rate_cpu["float32"]
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device {args.device} ({dev_name}), torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"SmolLM2-135M-Instruct (GGUF, dequantised); {len(prompts)} chat prompts x {args.n} samples, up to "
          f"{args.new_tokens} new tokens; median of {args.repeats}")
    for d in models:
        print(f"  {d:9s} {rate[d]:7.0f} tokens/s wall  {rate_cpu[d]:7.0f} tokens/s cpu")
    print(f"bfloat16 / float32 tokens/s: {ratio:.2f}x wall, {ratio_cpu:.2f}x cpu (goal >= 1.8x)")
    record = {"bench": "sampling-precision", "device": args.device, "threads": torch.get_num_threads(),
              "model": "SmolLM2-135M-Instruct", "rows": len(prompts) * args.n, "new_tokens": args.new_tokens,
              **{f"{d}_tokens_per_s": round(v, 1) for d, v in rate.items()},
              "bfloat16_over_float32": round(ratio, 3), "bfloat16_over_float32_cpu": round(ratio_cpu, 3)}
    print(json.dumps(record))
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=0, help="rows per forward; 0 = all rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with other jobs on a small CPU, OpenMP threads "
                         "spin-wait and timings become noise); 0 = torch's default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one sampler run")
    ap.add_argument("--real", action="store_true",
                    help="float32 vs bfloat16 on the real model (SmolLM2-135M-Instruct) instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        return real_precision(args)
    args.batch_size = args.batch_size or args.prompts * args.n
    model = build_model(args)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 128, (args.prompts, args.prompt_len), generator=gen).to(args.device)
    steer = steering(model, layer=args.layers // 2)
    expanded = prompts.repeat_interleave(args.n, dim=0)  # the alternative: prefill every row
    methods = {"ours": lambda: ours(model, prompts, args), "hf": lambda: hf_generate(model, prompts, args),
               "steered": lambda: ours(model, prompts, args, steer),
               "expanded": lambda: ours(model, expanded, args, n=1)}
    for fn in methods.values():  # warm-up
        fn()
    runs = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            runs[k].append(timed(fn))
    wall, cpu, tok = ({k: statistics.median(r[i] for r in v) for k, v in runs.items()} for i in range(3))
    rate = {k: tok[k] / wall[k] for k in runs}
    params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device {args.device} ({dev_name}), dtype {args.dtype}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}")
    print(f"model qwen2 {params / 1e6:.2f}M params, vocab 128; {args.prompts} prompts x {args.n} samples"
          f" = {args.prompts * args.n} rows, batch {args.batch_size} rows, prompt {args.prompt_len}"
          f" tokens, up to {args.new_tokens} new; median of {args.repeats}")
    labels = {"ours": "sample_branches", "hf": "hf generate", "steered": "ours + steering hook",
              "expanded": "ours, prefill per row"}
    for k in runs:
        print(f"  {labels[k]:22s} wall {wall[k]:7.3f} s  cpu {cpu[k]:7.3f} s  {tok[k]:6.0f} tokens"
              f"  {rate[k]:8.0f} tokens/s")
    speedup = rate["ours"] / rate["hf"]
    speedup_cpu = (tok["ours"] / cpu["ours"]) / (tok["hf"] / cpu["hf"])
    steer_ratio, steer_cpu = wall["steered"] / wall["ours"], cpu["steered"] / cpu["ours"]
    shared_gain, shared_cpu = wall["expanded"] / wall["ours"], cpu["expanded"] / cpu["ours"]
    print(f"ours / hf generate tokens/s: {speedup:.2f}x wall, {speedup_cpu:.2f}x cpu (goal >= 2x)")
    print(f"steered / unsteered time: {steer_ratio:.3f}x wall, {steer_cpu:.3f}x cpu (goal <= 1.05x)")
    print(f"prefill per row instead of per prompt: {shared_gain:.2f}x wall, {shared_cpu:.2f}x cpu time")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(methods["ours"])
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    record = {"bench": "sampling", "device": args.device, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "rows": args.prompts * args.n,
              "batch": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "params": params, **{f"{k}_tokens_per_s": round(v, 1) for k, v in rate.items()},
              "speedup_vs_hf": round(speedup, 3), "speedup_vs_hf_cpu": round(speedup_cpu, 3),
              "steered_time_ratio": round(steer_ratio, 3), "steered_cpu_ratio": round(steer_cpu, 3),
              "per_row_prefill_time_ratio": round(shared_gain, 3),
              "per_row_prefill_cpu_ratio": round(shared_cpu, 3)}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
