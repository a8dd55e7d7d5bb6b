"""report.md and PNG plots from a results.json dict (see bench.py for its layout).

Rates are totals over totals (all tokens / all seconds), never means of per-prompt rates, so a
short answer does not weigh as much as a long one. MAT is Token Recycling's mean accepted tokens
per decoding step (bonus token included).

The plots need matplotlib (the ``bench`` extra). Without it the report is written without them and
says how to get them; ``write`` can redraw them from results.json later.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

ALL = "all"
PLOTS_HINT = ("plots not drawn: matplotlib is not installed (pip install token-recycling[bench]; then "
              "token_recycling.tools.report.write(json.load(open('results.json')), out_dir) draws them)")


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def summarize(results: dict) -> dict[str, dict]:
    """Per category (and ``"all"``): samples, per-method tokens/seconds/tok/s, MAT, speedups, mismatches."""
    methods = list(results["config"]["methods"])
    sampled = bool((results["config"].get("sampling") or {}).get("do_sample"))
    groups: dict[str, list[dict]] = {}
    for s in results["samples"]:
        groups.setdefault(s["category"], []).append(s)
    groups = dict(sorted(groups.items()))
    groups[ALL] = list(results["samples"])
    table = {}
    for cat, samples in groups.items():
        row: dict = {"samples": len(samples), "tokens": {}, "seconds": {}, "tok_s": {}, "mismatches": {}}
        for m in methods:
            tokens = sum(s["methods"][m]["new_tokens"] for s in samples)
            seconds = sum(s["methods"][m]["seconds"] for s in samples)
            row["tokens"][m], row["seconds"][m], row["tok_s"][m] = tokens, seconds, _rate(tokens, seconds)
            if m != "greedy":
                # Under sampling outputs differ by design: nothing is compared (None), not "0 differ".
                row["mismatches"][m] = sum(s["mismatch"].get(m) is not None for s in samples) \
                    if "greedy" in methods and not sampled else None
        if "ours" in methods:
            steps = sum(s["methods"]["ours"]["steps"] for s in samples)
            row["mat"] = row["tokens"]["ours"] / steps if steps else None
        for m in ("paper", *SUFFIX):
            if m in methods:
                steps = sum(s["methods"][m]["steps"] for s in samples)
                row[f"mat_{m}"] = row["tokens"][m] / steps if steps else None
        row["speedup"] = {}
        for a, b in PAIRS:
            if a in methods and b in methods and row["tok_s"][a] and row["tok_s"][b]:
                row["speedup"][f"{a}/{b}"] = row["tok_s"][a] / row["tok_s"][b]
        table[cat] = row
    return table


SUFFIX = ("suffix", "suffix-tree")  # SuffixDecoding's drafts through our verification (tools/suffix.py)
PAIRS = (("ours", "greedy"), ("ours", "pld"), ("ours", "greedy-skinny"), ("ours", "pld-skinny"), ("ours", "paper"),
         ("ours", "torch-linear"), ("ours", "no-history"), ("ours", "suffix"), ("ours", "suffix-tree"),
         ("greedy-skinny", "greedy"), ("pld", "greedy"), ("paper", "greedy"), ("suffix", "greedy"),
         ("suffix-tree", "greedy"))
PAIR_NAMES = tuple(f"{a}/{b}" for a, b in PAIRS)


def accept_length_counts(results: dict) -> Counter:
    return Counter(n for s in results["samples"] if "ours" in s["methods"]
                   for n in s["methods"]["ours"]["accept_lengths"])


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots_available() -> bool:
    return _pyplot() is not None


def plot_speedup(table: dict, path: Path, title: str) -> None:
    plt = _pyplot()
    pairs = [p for p in PAIR_NAMES if any(p in r["speedup"] for r in table.values())]
    cats = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats) + 2), 4))
    width = 0.8 / max(1, len(pairs))
    for i, pair in enumerate(pairs):
        xs = [c + (i - (len(pairs) - 1) / 2) * width for c in range(len(cats))]
        bars = ax.bar(xs, [table[c]["speedup"].get(pair, 0.0) for c in cats], width, label=pair)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.set_ylabel("speedup (tokens/s ratio)")
    ax.set_title(title, fontsize=10)
    if pairs:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accept_lengths(counts: Counter, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = sorted(counts)
    ax.bar(lengths, [counts[n] for n in lengths], width=0.8)
    ax.set_xlabel("tokens accepted in one step (bonus token included)")
    ax.set_ylabel("steps")
    ax.set_title("Token Recycling: accepted length per step")
    if lengths:
        ax.set_xticks(range(1, max(lengths) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, table: dict, counts: Counter, plots: bool = True) -> str:
    cfg, env = results["config"], results["environment"]
    methods = list(cfg["methods"])
    lines = ["# Token Recycling benchmark", ""]
    if not results.get("complete", True):
        n = len(results["samples"])
        lines += [f"**Interrupted run**: only the {n} turn{'s' if n != 1 else ''} measured before it stopped.", ""]
    facts = [
        ("model", cfg.get("model", "?")),
        ("weights", cfg.get("model_note") or "as stored in the model folder"),
        ("dtype", cfg.get("dtype", "?")),
        ("device", env.get("device", "?")),
        ("hardware", env.get("hardware", "?")),
        ("tree (at the end of the run)", cfg.get("tree_description") or cfg.get("tree", "?")),
        ("dataset", f"{cfg.get('dataset', '?')} ({len(results['samples'])} turns"
                    f"{', multi-turn' if cfg.get('multi_turn') else ', first turns only'})"),
        ("max new tokens", cfg.get("max_new_tokens", "?")),
        ("chat template", "yes" if cfg.get("chat_template", True) else "no"),
        ("versions", f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
                     f"token-recycling {env.get('token_recycling', '?')}, python {env.get('python', '?')}"),
        ("when", env.get("timestamp", "?")),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]

    mats = [m for m in ("paper", *SUFFIX) if m in methods]
    head = ["category", "turns"] + (["MAT"] if "ours" in methods else []) + \
        [f"MAT {m}" for m in mats] + [f"{m} tok/s" for m in methods]
    pairs = [p for p in PAIR_NAMES if all(x in methods for x in p.split("/"))]
    head += [f"speedup {p}" for p in pairs]
    lines += ["Rates are total new tokens / total seconds (prompt processing included). "
              "MAT: mean tokens accepted per Token Recycling step (bonus included); \"paper\" is the "
              "paper's method (its 80-node tree, no n-gram drafts), with its own hot matrix.", ""]
    for m in (m for m in SUFFIX if m in methods):
        lines += [f"{m}: {cfg.get(f'{m}_description') or 'SuffixDecoding'}, its drafts verified by this "
                  "project's step (only the drafter differs from ours).", ""]
    for m, why in (cfg.get("skipped") or {}).items():
        lines += [f"**{m} not run** (no column): {why}", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat, row in table.items():
        cells = [f"**{cat}**" if cat == ALL else cat, str(row["samples"])]
        if "ours" in methods:
            cells.append(_fmt(row.get("mat"), ".2f"))
        cells += [_fmt(row.get(f"mat_{m}"), ".2f") for m in mats]
        cells += [_fmt(row["tok_s"][m]) for m in methods]
        cells += [_fmt(row["speedup"].get(p), ".2f") + "x" if p in row["speedup"] else "-" for p in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    total = table[ALL]
    if "greedy" in methods:
        for m, n in total["mismatches"].items():
            if n is None:
                lines.append(f"- {m} vs greedy: not compared (sampling: outputs differ by design).")
                continue
            where = [f"{s['id']}#{s['turn']}@{s['mismatch'][m]}" for s in results["samples"]
                     if s["mismatch"].get(m) is not None]
            lines.append(f"- {m} vs greedy: {n} of {total['samples']} turns differ"
                         + (f" (id#turn@first differing token: {', '.join(where[:10])})" if where else "")
                         + ".")
        lines.append("")
    sources = [s["methods"]["ours"].get("stats", {}) for s in results["samples"] if "ours" in s["methods"]]
    matrix, ngram, memory = (sum(st.get(key, 0) for st in sources)
                             for key in ("from_matrix", "from_ngram", "from_memory"))
    if matrix + ngram + memory:
        lines.append(f"Accepted draft tokens (bonus tokens not counted): {matrix} from the adjacency matrix, "
                     f"{ngram} from the context n-gram chain, {memory} from the suffix memory.")
        lines.append("")
    if counts:
        steps = sum(counts.values())
        lines.append("Accepted tokens per step: " + ", ".join(
            f"{n}: {100 * counts[n] / steps:.1f}%" for n in sorted(counts)) + f" ({steps} steps).")
        lines.append("")
    lines += limit_lines(env, total, methods) + regret_lines(table, methods) + choice_lines(results)
    if plots:
        lines += ["![speedup by category](speedup.png)", "", "![accepted lengths](accept_lengths.png)", ""]
    else:
        lines += [f"({PLOTS_HINT}.)", ""]
    return "\n".join(lines)


def limit_lines(env: dict, total: dict, methods: list[str]) -> list[str]:
    """The physical limit beside the rates: a forward reads every weight once, so no method passes
    (tokens per forward) / (the time this machine takes to read the weights' bytes)."""
    nbytes, seconds = env.get("weight_bytes"), env.get("weight_read_seconds")
    if not nbytes or not seconds:
        return []
    floor = 1.0 / seconds
    text = (f"Physical limit: a forward reads the {nbytes / 1e6:.0f} MB of weights at least once; this "
            f"machine reads that many bytes in {seconds * 1e3:.1f} ms at best ({nbytes / seconds / 1e9:.1f} GB/s, "
            f"a sum over a buffer that size at {env.get('torch_threads', '?')} threads), so one token per "
            f"forward (greedy) cannot pass {floor:.0f} tok/s")
    if "ours" in methods and total.get("mat"):
        text += f", and ours at its {total['mat']:.2f} tokens per step {floor * total['mat']:.0f} tok/s"
    return [text + ". Prompt processing and drafting are not counted in that bound.", ""]


def regret_lines(table: dict, methods: list[str]) -> list[str]:
    """The default ("ours") against the fixed-tree presets (tr:...) per category: each preset's
    tok/s as a ratio of ours, and the regret (how much faster the best preset was, 0 if none)."""
    presets = [m for m in methods if m.startswith("tr:")]
    if "ours" not in methods or not presets:
        return []
    head = ["category", "ours tok/s"] + [f"{m} / ours" for m in presets] + ["regret"]
    lines = ["Default (ours) vs fixed trees with the n-gram chain (tr:...): ratio of tokens/s, and regret = "
             "best preset / ours - 1 (0 when ours is the fastest).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cat, row in table.items():
        ours = row["tok_s"]["ours"]
        ratios = [row["tok_s"][m] / ours if ours and row["tok_s"][m] else None for m in presets]
        regret = max([0.0] + [r - 1 for r in ratios if r is not None])
        lines.append("| " + " | ".join([f"**{cat}**" if cat == ALL else cat, _fmt(ours)]
                                       + [_fmt(r, ".2f") for r in ratios] + [f"{100 * regret:.1f}%"]) + " |")
    return lines + [""]


def choice_lines(results: dict) -> list[str]:
    """What the default drafted per step, pooled over the run (from each sample's stats)."""
    stats = [s["methods"]["ours"].get("stats", {}) for s in results["samples"] if "ours" in s["methods"]]
    steps = sum(st.get("steps", 0) for st in stats)
    if not steps or not any(st.get("chain_tokens") for st in stats):
        return []
    total = lambda key: sum(sum(st.get(key) or []) for st in stats)  # noqa: E731
    matched = sum(sum(1 for m in st.get("match") or [] if m) for st in stats)
    recent = sum(sum(st.get("recent") or []) for st in stats)
    seconds = sum(st.get("seconds", 0.0) for st in stats)
    decide = sum(st.get("decision_seconds", 0.0) for st in stats)
    return [f"Per step (default, {steps} steps): {total('tree_nodes') / steps:.1f} nodes forwarded, of which "
            f"{total('matrix_nodes') / steps - 1:.1f} matrix-tree nodes and {total('chain_tokens') / steps:.1f} new "
            f"chain nodes; a candidate matched on {100 * matched / steps:.0f}% of steps (led by the suffix "
            f"memory on {100 * recent / steps:.0f}%); accepted per step {total('accept_lengths') / steps:.2f} "
            f"tokens ({total('ngram_accepted') / steps:.2f} from context n-gram chains, "
            f"{total('memory_accepted') / steps:.2f} from suffix-memory chains). Choosing the drafts took {100 * decide / seconds if seconds else 0:.2f}% of the time.", ""]


def write(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Writes report.md, speedup.png and accept_lengths.png into ``out_dir``; returns their paths.

    Without matplotlib only report.md is written (its paths then lack the two plots) and the report
    says how to get them: see :data:`PLOTS_HINT`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(results)
    counts = accept_length_counts(results)
    plots = plots_available()
    paths = {"report": out / "report.md"}
    paths["report"].write_text(markdown(results, table, counts, plots))
    if not plots:
        return paths
    paths.update(speedup=out / "speedup.png", accept_lengths=out / "accept_lengths.png")
    cfg = results["config"]
    plot_speedup(table, paths["speedup"], f"Speedup by category: {cfg.get('model', '?')}, {cfg.get('dtype', '?')}, "
                                          f"{results['environment'].get('device', '?')}")
    plot_accept_lengths(counts, paths["accept_lengths"])
    return paths
