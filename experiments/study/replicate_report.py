"""What `forksight replicate` writes besides results.json: report.md, the depth figure, and the
"Does it replicate?" section that `forksight run`'s report includes when replicate results exist.

Pure rendering of the dict `experiments.study.replicate.run_replicate` returns (or reads back from
`results.json`); no numbers are computed here except means over seeds for the figure, which use the
same Student-t interval as the pooled table (`probe.stats.mean_ci`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from probe.atomic import write_text_atomic
from probe.environment import describe
from probe.stats import format_interval, format_number, mean_ci

CLAIM_ORDER = ("C1", "C2", "C3", "C3b", "C4", "C5", "C6")


def _cell(c: dict) -> str:
    e = c["effect"]
    v = f"more than {e['cap']:g}" if e["value"] is None and e.get("cap") else format_number(e["value"], 2)
    return f"{c['status']} ({v})"


def replication_section(results: dict, figure: str | None, heading: str = "## Does it replicate?") -> list[str]:
    """Markdown lines: the claim x pair table, the pooled table, the depth figure and the closing note."""
    pairs = results["pairs"]
    L = [heading, "",
         "Every claim recomputed on each base / RL pair of `forksight replicate` "
         f"({len(pairs)} pairs: " + ", ".join(f"{p['name']} = depth {p['depth']}, RL seed {p['train_seed']}"
                                             for p in pairs) + "), by the same rules as above. Pooled: "
         + results["pooled_rule"] + ".", "",
         "| claim | " + " | ".join(p["name"] for p in pairs) + " |", "|---|" + "---|" * len(pairs)]
    for cid in CLAIM_ORDER:
        cells = [next((c for c in p["claims"] if c["id"] == cid), None) for p in pairs]
        if all(c is None for c in cells):
            continue
        L.append(f"| {cid} | " + " | ".join("-" if c is None else _cell(c) for c in cells) + " |")
    L += ["", "| group | claim | holds on | pooled effect | 95% interval | interval over | pooled status |",
          "|---|---|---|---|---|---|---|"]
    for r in results["pooled"]:
        cens = f" ({r['censored']} censored at the cap)" if r.get("censored") else ""
        L.append(f"| {r['group']} | {r['claim']} | {r['holds_on']}/{r['n_pairs']} | {format_number(r['mean'], 3)}{cens} | "
                 f"{format_interval(r['ci'], open_bound='more')} | {r['interval']} | **{r['status']}** |")
    if figure:
        L += ["", f"![fork share, law R^2, distinct drop, patching curve and best RL-alone restoration against depth]({figure})"]
    L += ["", "**Closing note.** " + closing_note(results)]
    return L


def closing_note(results: dict) -> str:
    """Per claim: on how many pairs it holds (all pairs), and the largest group's pooled effect with its
    interval over training seeds."""
    groups: dict[str, int] = {}
    for p in results["pairs"]:
        groups[p["group"]] = groups.get(p["group"], 0) + 1
    main = max(groups, key=groups.get)
    parts = []
    for cid in CLAIM_ORDER:
        cs = [c for p in results["pairs"] for c in p["claims"] if c["id"] == cid]
        if not cs:
            continue
        held = sum(c["status"] == "holds" for c in cs)
        r = next((x for x in results["pooled"] if x["group"] == main and x["claim"] == cid), None)
        eff = "" if r is None or r["mean"] is None else (
            f"; pooled over {main}'s {r['n_seeds']} training seed(s): {format_number(r['mean'], 3)} {format_interval(r['ci'], open_bound='more')} "
            f"({r['status']})")
        parts.append(f"{cid} holds on {held} of {len(cs)} pairs{eff}")
    return "; ".join(parts) + "."


def plot_depth(results: dict, path: str | Path) -> Path:
    """Five panels against depth: fork share (C2), law R^2 (C1), distinct-correct change RL - base
    (C4), the patching curve (restoration by relative block), the best RL-alone restoration. Pairs
    as dots; the mean over a depth's training seeds with its Student-t interval (the pooled table's)
    as error bars, or a single pair's bootstrap interval."""
    from probe.figures import new_figure, save_figure_atomic

    pairs = results["pairs"]
    by_depth: dict[int, list[dict]] = {}
    for p in pairs:
        by_depth.setdefault(p["depth"], []).append(p)
    depths = sorted(by_depth)

    def claim_value(p: dict, cid: str) -> float | None:
        c = next((c for c in p["claims"] if c["id"] == cid), None)
        return None if c is None else c["effect"]["value"]

    pooled = {(r.get("depth"), r["claim"]): r for r in results["pooled"]}
    series = {"fork share of |dH| (C2)": "C2", "law R^2 (C1)": "C1", "distinct-correct, RL - base (C4)": "C4",
              "best RL-alone restoration of distinct-correct": None}
    fig = new_figure(16, 3.6)
    for i, (title, cid) in enumerate(series.items()):
        ax = fig.add_subplot(1, 5, i + 1 if i < 3 else 5)
        for d in depths:
            if cid:
                vals = [v for v in (claim_value(p, cid) for p in by_depth[d]) if v is not None]
                r = pooled.get((d, cid)) or {}
                m, ci = r.get("mean"), r.get("ci")
            else:
                bests = [p.get("best_rl_alone") or {} for p in by_depth[d]]
                vals = [b["restoration_distinct"] for b in bests if b.get("restoration_distinct") is not None]
                m, h = mean_ci(vals) if vals else (None, 0.0)
                ci = [m - h, m + h] if len(vals) > 1 else (bests[0].get("restoration_distinct_ci") if vals else None)
            if not vals or m is None:
                continue
            ax.scatter([d] * len(vals), vals, s=12, color="gray", alpha=0.7, zorder=2)
            lo, hi = (ci if ci and None not in ci else [m, m])
            ax.errorbar([d], [m], yerr=[[m - lo], [hi - m]], fmt="o", color="C0", capsize=3, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("depth (layers)")
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 5, 4)
    for j, d in enumerate(depths):
        curves = [p["patching_curve"] for p in by_depth[d] if p.get("patching_curve")]
        if not curves:
            continue
        layers = sorted({c["layer"] for cur in curves for c in cur})
        xs, ms, hs = [], [], []
        for L in layers:
            vals = [c["restoration_distinct"] for cur in curves for c in cur
                    if c["layer"] == L and c["restoration_distinct"] is not None]
            if vals:
                m, h = mean_ci(vals)
                xs.append((L + 1) / d)
                ms.append(m)
                hs.append(h)
        ax.errorbar(xs, ms, yerr=hs, marker="o", ms=3, capsize=2, color=f"C{j}", label=f"depth {d}")
    ax.set_xlabel("patched block (fraction of depth)")
    ax.set_title("patching curve: restoration of distinct-correct", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("gray: each pair; blue: mean over training seeds with its 95% t-interval (one pair: its bootstrap "
                 "interval)", fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path)


def write_replicate_report(results: dict, path: str | Path) -> Path:
    """report.md of `forksight replicate`."""
    path = Path(path)
    L = ["# forksight replicate: report", "",
         "The claims of `forksight run` on every base / RL pair below, and pooled over training seeds.", "",
         "## Pairs", "", "| pair | group | depth | RL seed | RL | variants | stage seconds |", "|---|---|---|---|---|---|---|"]
    for p in results["pairs"]:
        secs = ", ".join(f"{k} {format_number(v, 0)}" for k, v in p["seconds"].items())
        L.append(f"| {p['name']} | {p['group']} | {p['depth']} | {p['train_seed']} | `{Path(p['rl']).name}` | "
                 + (", ".join(f"`{Path(v).name}`" for v in p["variants"]) or "-") + f" | {secs} |")
    L += ["", "## RL checkpoints (the trainer's held-out evaluation: 256 problems, 64 samples, T=1)", "",
          "| model | pair | depth | intervention | seed | pass@1 | pass@64 | distinct-correct | planning entropy | "
          "train seconds (wall) | train CPU seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["organisms"]:
        L.append(f"| `{r['model']}` | {r['pair']} | {r['depth']} | {r['intervention']} | {r['train_seed']} | "
                 f"{format_number(r['pass_at_1'])} | {format_number(r['pass_at_64'])} | {format_number(r['distinct_correct_mean'], 2)} | "
                 f"{format_number(r['planning_entropy_mean'])} | {format_number(r['train_seconds'], 0)} | {format_number(r.get('train_cpu_seconds'), 0)} |")
    b = results["best_variant"]
    L += ["", "## The best entropy-preserving regime", "", f"Rule: {b['rule']}. Floor: pass@1 >= {format_number(b['pass_at_1_floor'])}.",
          "", "| regime | pass@1 | distinct-correct | eligible |", "|---|---|---|---|"]
    L += [f"| `{k}` | {format_number(v['pass_at_1'])} | {format_number(v['distinct_correct_mean'], 2)} | {v['eligible']} |"
          for k, v in b["regimes"].items()]
    L += ["", f"Chosen: `{b['best']}`."]
    for p in results["pairs"]:
        if len(p.get("models") or {}) > 2:
            L += ["", f"## Every model of {p['name']} on the sweep's test half (pooled over its test seeds)", "",
                  "| model | pass@1 | pass@8 | pass@64 | distinct-correct | planning entropy |", "|---|---|---|---|---|---|"]
            for name, m in p["models"].items():
                pk = m.get("pass_at_k") or {}
                L.append(f"| `{name}` | {format_number(m['pass_at_1'])} | {format_number(pk.get('8'))} | {format_number(m.get('pass_at_64'))} | "
                         f"{format_number(m['distinct_correct_mean'], 2)} | {format_number(m.get('planning_entropy_mean'))} |")
            if p.get("compute_match_figure"):
                L += ["", f"![{p['name']}: pass@k of every model and the samples rl needs to match]({p['compute_match_figure']})"]
    L += [""] + replication_section(results, results["figures"][0] if results.get("figures") else None,
                                    heading="## Claims per pair and pooled")
    L += ["", f"Total seconds this invocation: {format_number(results['seconds'], 0)}. Numbers: `results.json`; per pair, "
          "`pairs/NAME/` holds its probe, learn and steer stages.", "",
          f"Environment: {describe(results.get('environment'))}."]
    write_text_atomic(path, "\n".join(L) + "\n")
    return path


def copy_for_run(results: dict, src_dir: Path, out: Path) -> str | None:
    """Copy the replicate depth figure into a `forksight run` directory (figures there are relative
    paths that exist); returns its relative path or None."""
    import shutil

    figs = results.get("figures") or []
    if not figs or not (src_dir / figs[0]).is_file():
        return None
    dst = out / "figures" / "replicate_depth.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_dir / figs[0], dst)
    return "figures/replicate_depth.png"


def summary_for_results(results: dict) -> dict[str, Any]:
    """The replication as `forksight run`'s results.json carries it (enough for `replication_section`):
    each pair's claims (id, status, effect), the pooled table and rule, the closing note."""
    return {"pairs": [{**{k: p[k] for k in ("name", "group", "depth", "train_seed")},
                       "claims": [{k: c[k] for k in ("id", "status", "effect")} for c in p["claims"]]}
                      for p in results["pairs"]],
            "pooled": results["pooled"], "pooled_rule": results["pooled_rule"], "closing_note": closing_note(results)}
