"""Coverage: forksight's hook sites, steering and sampler on every decoder-only text model type.

    python bench/coverage.py [--out bench/coverage.md] [--json bench/coverage.json] [--only a,b] [--against TABLE]

Every type of the installed transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is classified by
`bench.hf_zoo` (excluded types are listed with the rule that excludes them), built tiny and random
on the CPU (types that cannot be built or run tiny offline are listed with the error), then
checked against oracles that need no forksight code:
1. `hidden`: `blocks.{L}.hook_resid_pre` / `hook_resid_post` at every layer resolve, and the nnsight
   `HookedModel` reads `hook_resid_post` equal to HF `output_hidden_states` (the last block through
   the final norm HF applies), with logits equal to the HF forward; `ln_final.hook_normalized`,
   where the model has a final norm, equals the last residual RMS- or layer-normalised by hand
   (TransformerLens's definition: before the norm's gain and bias).
2. `steer`: a `SteeringVector` on `hook_resid_post` of every layer: coefficient 0 gives exactly the
   unhooked logits, a non-zero one changes them, and no hook is left on any module afterwards; as
   the sampler's intervention, coefficient 0 gives exactly the unsteered samples.
3. `sampler`: `sample_branches` at temperature 0 (n=2, prompts of 3, 5 and 7 tokens in one
   left-padded batch, an eos that ends rows at different steps, so rows are dropped from the cache)
   equals HF greedy `generate` run on each prompt alone, token for token. Where the sampler refuses
   left padding for the family (`PaddingError`), its fix is applied (one prompt per batch, still n
   rows expanded from one prefill) and the reason column says so.
A type passes when all three hold; "refused" is a named forksight error (a piece of structure or a
cache it cannot handle, with the reason); "failed" is anything else. Informational columns: which
optional sites resolve (attn_out, mlp_out, ln_final), whether resid_pre + attn_out + mlp_out equals
resid_post (false under residual scalings, parallel mixers the sites leave out, post-LN), the
final norm's convention and the cache layers.

The table (`bench/coverage.json`, rendered as `bench/coverage.md`) records the transformers and torch
versions and the environment it was made with, and is what `tests/test_hf_coverage.py` holds every
type to (`bench.coverage_table.held_to`): each sweep is compared with it (`compare`; default
`--against bench/coverage.json`) and prints the types the installed transformers has and the table lacks ("new": listed, never
failed: regenerate the table to record them), the types the table has and transformers no longer
has ("gone"), and the types whose outcome changed. The last stdout line is one JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.coverage_table import REGENERATE, TABLE, Row, compare, load_table  # noqa: E402
from bench.hf_zoo import EOS, PAD, VOCAB, build, zoo  # noqa: E402
from probe.environment import environment  # noqa: E402
from probe.models.hooks import HookSiteError, resolve_hook  # noqa: E402
from probe.models.kv_cache import CacheError, new_cache  # noqa: E402
from probe.models.norms import NORM_CONVENTIONS  # noqa: E402
from probe.models.pair import wrap  # noqa: E402
from probe.models.structure import StructureError, structure_of  # noqa: E402
from probe.sampling.sampler import PaddingError, SamplerConfig, sample_branches  # noqa: E402

REFUSALS = (HookSiteError, StructureError, CacheError, PaddingError)
PROMPTS = [[5, 17, 42], [9, 3, 88, 61, 30], [70, 11, 23, 99, 4, 56, 12]]
NEW_TOKENS = 8


class CheckFailed(AssertionError):
    """An oracle did not hold."""


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": 1, "<eos>": EOS} | {f"w{i}": i for i in range(3, VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _is_moe(hf) -> bool:
    """A mixture-of-experts model: some module is an expert block (by class name)."""
    return any(re.search(r"MoE|Moe|Experts", type(m).__name__) for m in hf.modules())


def _hooks(model) -> list:
    return [(id(m), k, tuple(getattr(m, k))) for m in model.modules()
            for k in ("_forward_hooks", "_forward_pre_hooks") if getattr(m, k)]


def _close(a, b, what: str, tol: float = 1e-4) -> None:
    if a.shape != b.shape or not torch.allclose(a.float(), b.float(), atol=tol, rtol=tol):
        err = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
        raise CheckFailed(f"{what} (max |diff| {err})")


def _check_hidden(hf, tok, struct, notes: dict) -> None:
    n = struct.n_layers
    names = [f"blocks.{L}.hook_resid_{k}" for L in range(n) for k in ("pre", "post")]
    for L in range(n):
        for site in ("resid_pre", "resid_post"):
            resolve_hook(f"blocks.{L}.hook_{site}", hf)  # refuses with the structure's reason
    optional = {}
    for site in ("attn_out", "mlp_out"):
        got = []
        for L in range(n):
            try:
                got.append(resolve_hook(f"blocks.{L}.hook_{site}", hf).name)
            except HookSiteError:
                pass
        optional[site] = got
    try:
        optional["ln_final"] = [resolve_hook("ln_final.hook_normalized", hf).name]
    except HookSiteError:
        optional["ln_final"] = []
    notes["sites"] = " ".join(f"{k}:{len(v)}/{n if k != 'ln_final' else 1}" for k, v in optional.items())
    model = wrap(hf, tok, backend="nnsight", device="cpu")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, acts = model.run_with_sites(ids, names + [x for v in optional.values() for x in v])
        ref = hf(ids, output_hidden_states=True, use_cache=False)
    _close(logits, ref.logits, "nnsight logits differ from the HF forward")
    hs = ref.hidden_states
    if hs is None or len(hs) != n + 1:
        raise CheckFailed(f"HF returned {None if hs is None else len(hs)} hidden states for {n} layers")
    # HF's convention is (embeddings, block 0, ..., final); some families (Mamba) omit the embeddings
    shift = 1
    if not torch.allclose(hs[0], acts["blocks.0.hook_resid_pre"], atol=1e-4) and \
            torch.allclose(hs[0], acts["blocks.0.hook_resid_post"], atol=1e-4):
        shift, notes["hidden"] = 0, "HF's hidden_states start at block 0's output (no embeddings)"
    for L in range(n - 1 + (1 - shift)):
        _close(acts[f"blocks.{L}.hook_resid_post"], hs[L + shift],
               f"blocks.{L}.hook_resid_post != hidden_states[{L + shift}]")
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    with torch.inference_mode():
        if struct.final_norm.path is not None:
            norm = hf.get_submodule(struct.final_norm.path)
            _close(norm(last), hs[n], "final norm(last hook_resid_post) != hidden_states[-1]")
            if optional["ln_final"]:  # TL's definition, computed from the last residual by hand
                kind = NORM_CONVENTIONS[struct.norm_convention][0]
                where = [(norm, k) for k in ("eps", "variance_epsilon", "epsilon")]
                where += [(hf.config, k) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")]
                eps = next((float(getattr(o, k)) for o, k in where if isinstance(getattr(o, k, None), float)), 1e-5)
                x = last.float() - (last.float().mean(-1, keepdim=True) if kind == "layer" else 0)
                want = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                _close(acts["ln_final.hook_normalized"], want, f"ln_final.hook_normalized is not the {kind}-normalised "
                       "last residual (TransformerLens's definition)", tol=1e-3)
        elif shift and not torch.allclose(last, hs[n], atol=1e-4):
            notes["hidden"] = "HF's last hidden state is transformed after the last block (checked via logits)"
    ok = []
    for L in range(n):
        a, m = acts.get(f"blocks.{L}.hook_attn_out"), acts.get(f"blocks.{L}.hook_mlp_out")
        if a is not None and m is not None:
            pre, post = acts[f"blocks.{L}.hook_resid_pre"], acts[f"blocks.{L}.hook_resid_post"]
            ok.append(bool(torch.allclose(pre + a + m, post, atol=1e-4, rtol=1e-4)))
    notes["decomposes"] = "n/a" if not ok else ("yes" if all(ok) else "no")


def _check_steer(hf, specials) -> None:
    from steering import SteeringVector

    struct = structure_of(hf)
    d = int(hf.get_input_embeddings().embedding_dim)
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector({L: torch.randn(d, generator=g) * 10 for L in range(struct.n_layers)})
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    before = _hooks(hf)
    with torch.inference_mode():
        clean = hf(ids, use_cache=False).logits
        with vec.apply(hf, coef=0.0):
            zero = hf(ids, use_cache=False).logits
        with vec.apply(hf, coef=1.0):
            steered = hf(ids, use_cache=False).logits
    if not torch.equal(zero, clean):
        raise CheckFailed("steering with coefficient 0 changed the logits")
    if torch.allclose(steered, clean):
        raise CheckFailed("a non-zero steering vector left the logits unchanged")
    cfg = SamplerConfig(n=2, max_new_tokens=NEW_TOKENS, temperature=0, device="cpu", batch_size=specials.batch_size)
    plain = sample_branches(hf, specials, PROMPTS, cfg)
    zero = sample_branches(hf, specials, PROMPTS, cfg, intervention=vec.apply(hf, coef=0.0))
    if not torch.equal(plain.tokens, zero.tokens):
        raise CheckFailed("sampling with a coefficient-0 intervention changed the samples")
    if _hooks(hf) != before:
        raise CheckFailed("a hook was left on the model after steering")


def _greedy_reference(hf, prompt: list[int], eos: int | None) -> list[int]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=0 if eos is not None else NEW_TOKENS,
                           do_sample=False, eos_token_id=eos if eos is not None else EOS, pad_token_id=PAD,
                           use_cache=True)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, len(prompt):].tolist()


def _check_sampler(hf, notes: dict) -> SimpleNamespace:
    free = [_greedy_reference(hf, p, None) for p in PROMPTS]
    eos = free[0][2] if free[0][2] not in free[0][:2] else EOS  # row 0 ends at step 3; others later or never
    specials = SimpleNamespace(eos_token_id=eos, pad_token_id=PAD, batch_size=512)
    want = [_greedy_reference(hf, p, eos) for p in PROMPTS]
    cfg = SamplerConfig(n=2, max_new_tokens=NEW_TOKENS, temperature=0, device="cpu")
    try:
        got = sample_branches(hf, specials, PROMPTS, cfg)
    except PaddingError as e:  # the refusal's own fix: one prompt (its n rows) per forward batch
        notes["padding"] = f"one prompt per batch (unequal prompts refused: {_short(e, 160)})"
        specials.batch_size = cfg.n
        got = sample_branches(hf, specials, PROMPTS, SamplerConfig(**{**cfg.__dict__, "batch_size": cfg.n}))
    for r in range(len(PROMPTS) * 2):
        row = got.tokens[r][got.mask[r]].tolist()
        w = want[r // 2]
        w = w[: w.index(eos) + 1] if eos in w else w
        if row != w:
            raise CheckFailed(f"sampler row {r} (prompt {r // 2}) {row} != HF greedy generate {w}")
    return specials


def check_type(model_type: str, class_name: str = "") -> Row:
    """Build one type tiny and run the three checks (module docstring); never raises."""
    t0 = time.perf_counter()
    row = Row(model_type, class_name, "passed")
    try:
        hf = build(model_type)
        with torch.inference_mode():
            hf(torch.tensor([[3, 4, 5, 6]]))
    except Exception as e:  # noqa: BLE001 - the reason is the message
        return _done(row, "not built", f"{type(e).__name__}: {_short(e)}", t0)
    row.moe = _is_moe(hf)
    tok = _tokenizer()
    notes: dict = {}
    stage = "structure"
    try:
        struct = structure_of(hf)
        row.norm = struct.norm_convention or f"none ({_short(struct.final_norm.reason, 80)})"
        cache = new_cache(hf)
        row.cache = ("model's own" if cache is None else
                     "+".join(sorted({type(x).__name__ for x in getattr(cache, "layers", [])})) or type(cache).__name__)
        stage = "hidden"
        _check_hidden(hf, tok, struct, notes)
        stage = "sampler"
        specials = _check_sampler(hf, notes)
        stage = "steer"
        _check_steer(hf, specials)
    except REFUSALS as e:
        row.status, row.reason = "refused", f"{stage}: {type(e).__name__}: {_short(e)}"
    except CheckFailed as e:
        row.status, row.reason = "failed", f"{stage}: {_short(e)}"
    except Exception as e:  # noqa: BLE001 - an unexpected error is a failure, with its message
        row.status, row.reason = "failed", f"{stage}: {type(e).__name__}: {_short(e)}"
    row.sites, row.decomposes = notes.get("sites", ""), notes.get("decomposes", "")
    if row.status == "passed":
        row.reason = "; ".join(notes[k] for k in ("hidden", "padding") if k in notes)
    return _done(row, row.status, row.reason, t0)


def _short(e, n: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _done(row: Row, status: str, reason: str, t0: float) -> Row:
    row.status, row.reason, row.seconds = status, reason, round(time.perf_counter() - t0, 2)
    return row


def run(only: list[str] | None = None, log=print) -> list[Row]:
    """Every type of the mapping (or `only`), in name order."""
    rows = []
    for entry in zoo():
        if only and entry.model_type not in only:
            continue
        if entry.excluded:
            rows.append(Row(entry.model_type, entry.class_name, "excluded", entry.excluded))
        else:
            rows.append(check_type(entry.model_type, entry.class_name))
        r = rows[-1]
        log(f"{r.status:9s} {r.model_type:28s} {r.seconds:5.1f}s {r.reason[:150]}")
    return rows


def summary(rows: list[Row]) -> dict:
    count = lambda s: sum(r.status == s for r in rows)  # noqa: E731
    built = [r for r in rows if r.status in ("passed", "failed", "refused")]
    passed = [r for r in built if r.status == "passed"]
    return {
        "types": len(rows), "excluded": count("excluded"), "attempted": len(rows) - count("excluded"),
        "not_built": count("not built"), "built": len(built), "passed": len(passed), "refused": count("refused"),
        "failed": count("failed"), "pass_rate_of_built": round(len(passed) / max(len(built), 1), 4),
        "moe_passed": sorted(r.model_type for r in passed if r.moe),
        "offset_norm_passed": sorted(r.model_type for r in passed if r.norm.endswith("_offset")),
    }


def markdown(rows: list[Row], meta: dict) -> str:
    s = meta["summary"]
    lines = [
        "# Coverage over transformers' causal-LM types",
        "",
        f"Generated by `{REGENERATE}` ({meta['seconds']:.0f} s; transformers {meta['transformers']}, "
        f"torch {meta['torch']}, {meta['device']}). Checks and rules: the docstrings of `bench/coverage.py` and "
        "`bench/hf_zoo.py`. `tests/test_hf_coverage.py` holds every type below to its status here; a type a "
        "newer transformers adds is listed by the sweep as new until this table is regenerated.",
        "",
        f"- types in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`: {s['types']}; excluded by rule: {s['excluded']}; "
        f"attempted (decoder-only text): {s['attempted']}",
        f"- not built tiny offline: {s['not_built']}; built: {s['built']}",
        f"- **passed every check: {s['passed']} of {s['built']} built ({100 * s['pass_rate_of_built']:.1f}%)**; "
        f"refused with a named reason: {s['refused']}; failed: {s['failed']}",
        f"- mixture-of-experts types passing ({len(s['moe_passed'])}): {', '.join(s['moe_passed'])}",
        f"- `1 + weight` final-norm types passing ({len(s['offset_norm_passed'])}): {', '.join(s['offset_norm_passed'])}",
        "",
        "| type | class | status | reason | MoE | final norm | optional sites | sub-blocks add up | cache layers | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join(esc(x) for x in (
            r.model_type, r.class_name, r.status, r.reason, "yes" if r.moe else "", r.norm, r.sites,
            r.decomposes, r.cache, r.seconds if r.status != "excluded" else "")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="markdown table to write (e.g. bench/coverage.md)")
    ap.add_argument("--json", default=None, help="JSON rows + summary to write")
    ap.add_argument("--only", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--against", default=str(TABLE), help="recorded table to compare with ('' for none)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = run([t for t in args.only.split(",") if t] or None)
    meta = {"summary": summary(rows), "seconds": round(time.perf_counter() - t0, 1),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "device": f"cpu ({platform.processor() or platform.machine()}, 1 thread), float32",
            "environment": environment()}
    drift = None
    if args.against and Path(args.against).is_file():  # read before --json may overwrite it
        table = load_table(args.against)
        drift = compare(table, rows)
        print(f"against {args.against} (transformers {table.transformers}): new {drift.new or 'none'}; "
              f"gone {drift.gone or 'none'}; changed {len(drift.changed)}")
        for why in drift.changed.values():
            print(f"changed   {why}")
    if args.out:
        Path(args.out).write_text(markdown(rows, meta))
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    record = {"coverage": meta["summary"], "seconds": meta["seconds"]}
    if drift is not None:
        record["against"] = {"new": drift.new, "gone": drift.gone, "changed": sorted(drift.changed)}
    print(json.dumps(record))
    return meta


if __name__ == "__main__":
    main()
