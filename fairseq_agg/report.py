"""Markdown reports from the results of ``fairseq-agg-eval``: one run (``run_report``) or
several side by side in the layout of the paper's tables (``compare_report``).

Table names for ``fairseq-agg-eval compare --tables`` (paper table numbers are accepted too):

==================  ==========  ==========================================================
name                paper       columns
==================  ==========  ==========================================================
groups              3, 4        PPL and Uniq per frequency group and total, I(W); Human row
perplexity          -           PPL per frequency group, of the other positions (end of line,
                                <unk>) and in total, with each part's share of the tokens
isotropy            -           I(W) and IsoScore (Rudman et al. 2022) per group and in total
study               1, 2        PPL and I(W) per frequency group and total
isotropy_groups     10, 11      I(W) of the frequent, medium and rare rows
wordsim             6           Spearman rho x 100 on MEN, WS353, RG65, RW
ablation            8, 9        total PPL, Uniq, I(W) (also the alpha sweep of Figure 5)
generation          5, 15       greedy continuations: Uniq per text, seq-rep-n, distinct tokens
repetition          -           next-token rep/l, wrep/l, accuracy (Welleck et al. 2020)
geometry            -           mean cosine, mean-embedding norm, norm-frequency correlation,
                                singular-value entropy, hidden-state mean cosine
post_hoc            -           I(W), mean cosine, word similarity before and after mean
                                removal / all-but-the-top (``--post-hoc``)
neighbours          13          top-k nearest neighbours of the query tokens
bleu                7           tokenized BLEU (compound split) and sacreBLEU
cross_lingual       14          nearest neighbours of source tokens in the shared embedding
==================  ==========  ==========================================================
"""

import math
from typing import Dict, List, Mapping, Optional, Sequence

from fairseq_agg.metrics import Stat

LM_TABLES = ("groups", "perplexity", "study", "isotropy_groups", "isotropy", "wordsim", "ablation", "generation", "repetition",
             "geometry", "post_hoc", "neighbours")
MT_TABLES = ("bleu", "isotropy_groups", "isotropy", "geometry", "post_hoc", "cross_lingual")
TABLE_ALIASES = {"1": "study", "2": "study", "3": "groups", "4": "groups", "10": "isotropy_groups", "11": "isotropy_groups", "6": "wordsim",
                 "8": "ablation", "9": "ablation", "5": "generation", "15": "generation", "13": "neighbours",
                 "7": "bleu", "14": "cross_lingual"}
GROUPS = ("frequent", "medium", "rare")
GROUP_HEAD = ("Freq", "Med", "Rare")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, Stat):  # several runs of one method: mean ± sample std
        return value.format(digits)
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN
        return "n/a"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join((":---" if i == 0 and align_first_left else "---:") for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _groups_table(runs: Mapping[str, Dict]) -> str:
    header = ["Method", *(f"PPL {g}" for g in GROUP_HEAD), "PPL Total", *(f"Uniq {g}" for g in GROUP_HEAD),
              "Uniq Total", "I(W)"]
    rows = []
    for name, r in runs.items():
        rows.append([name, *(_fmt(r["ppl"][g]["ppl"]) for g in GROUPS), _fmt(r["ppl"]["total"]["ppl"]),
                     *(str(r["uniq"][g]) for g in GROUPS), str(r["uniq"]["total"]), _fmt(r["isotropy"]["total"], 3)])
    human = next(iter(runs.values()))["human"]
    rows.append(["Human", "-", "-", "-", "-", *(str(human[g]) for g in GROUPS), str(human["total"]), "-"])
    notes = []
    for name, r in runs.items():
        other = r["ppl"].get("other")
        if other and other["tokens"]:
            share = float(other["tokens"]) / float(r["ppl"]["total"]["tokens"])
            notes.append(f"{name} {_fmt(other['ppl'])} ({100 * share:.0f}% of the tokens)")
    text = _table(header, rows)
    if notes:
        text += ("\n\nPPL Total covers every scored position, the groups only the positions whose target is a "
                 "regular token; the others (end of line, `<unk>`) have PPL " + "; ".join(notes)
                 + " (the perplexity table shows them).")
    return text


PPL_PARTS = (("frequent", "Freq"), ("medium", "Med"), ("rare", "Rare"), ("other", "Other"), ("total", "Total"))


def _perplexity_table(runs) -> str:
    header = ["Method", *(f"PPL {h}" for _, h in PPL_PARTS), *(f"tokens {h}" for _, h in PPL_PARTS[:-1])]
    rows = []
    for name, r in runs.items():
        total = float(r["ppl"]["total"]["tokens"]) or math.nan
        cells = [name]
        for part, _ in PPL_PARTS:
            entry = r["ppl"].get(part)
            cells.append(_fmt(entry["ppl"]) if entry else "-")
        for part, _ in PPL_PARTS[:-1]:
            entry = r["ppl"].get(part)
            cells.append(f"{100 * float(entry['tokens']) / total:.1f}%" if entry else "-")
        rows.append(cells)
    return _table(header, rows) + ("\n\nOther: positions whose target is in no frequency group (end of line `</s>`, "
                                   "`<unk>`); tokens: each part's share of the scored positions.")


def _isotropy_isoscore_table(runs) -> str:
    def cells(r, key, g):
        return _fmt((r.get(key) or {}).get(g), 3)

    header = ["Method", *(f"I(W) {h}" for h in GROUP_HEAD), "I(W) Total", *(f"IsoScore {h}" for h in GROUP_HEAD),
              "IsoScore Total"]
    rows = [[n, *(cells(r, "isotropy", g) for g in GROUPS), cells(r, "isotropy", "total"),
             *(cells(r, "isoscore", g) for g in GROUPS), cells(r, "isoscore", "total")] for n, r in runs.items()]
    signs = {str(r.get("isotropy_signs", "both")) for r in runs.values()}
    how = ("over both signs of every eigenvector of W^T W" if signs == {"both"} else
           "over the eigenvectors with the signs LAPACK returned (--isotropy-signs as_returned)" if signs == {"as_returned"}
           else "MIXED definitions across the runs (" + ", ".join(sorted(signs)) + "): not comparable")
    return _table(header, rows) + (f"\n\nI(W): min Z / max Z {how}; IsoScore: Rudman et al. (2022), from the "
                                   "covariance of the rows ('-': not in this results.json).")


def _study_table(runs) -> str:
    return _table(["Method", *(f"PPL {g}" for g in GROUP_HEAD), "PPL Total", *(f"I(W) {g}" for g in GROUP_HEAD), "I(W) Total"],
                  [[n, *(_fmt(r["ppl"][g]["ppl"]) for g in GROUPS), _fmt(r["ppl"]["total"]["ppl"]),
                    *(_fmt(r["isotropy"][g], 3) for g in GROUPS), _fmt(r["isotropy"]["total"], 3)] for n, r in runs.items()])


def _isotropy_table(runs) -> str:
    return _table(["Method", "I(W) Freq", "I(W) Med", "I(W) Rare", "I(W) total"],
                  [[n, *(_fmt(r["isotropy"][g], 3) for g in GROUPS), _fmt(r["isotropy"]["total"], 3)] for n, r in runs.items()])


def _wordsim_table(runs) -> str:
    names = list(runs)
    datasets: List[str] = []
    for r in runs.values():
        for d in r.get("word_similarity", {}):
            if d not in datasets:
                datasets.append(d)
    rows = []
    for d in datasets:
        cells = [d]
        for n in names:
            e = runs[n].get("word_similarity", {}).get(d)
            cells.append("-" if e is None else f"{_fmt(e['spearman'])} ({e['covered']}/{e['pairs']})")
        rows.append(cells)
    return _table(["Dataset", *names], rows) + (
        "\n\nSpearman rho x 100 (pairs covered / pairs); n/a where fewer than "
        f"{_min_pairs(runs)} pairs are covered.")


def _min_pairs(runs) -> int:
    from fairseq_agg.metrics import MIN_WORDSIM_PAIRS

    return MIN_WORDSIM_PAIRS


def _ablation_table(runs) -> str:
    return _table(["Method", "PPL", "Uniq", "I(W)"],
                  [[n, _fmt(r["ppl"]["total"]["ppl"]), str(r["uniq"]["total"]), _fmt(r["isotropy"]["total"], 3)]
                   for n, r in runs.items()])


def _generation_table(runs) -> Optional[str]:
    have = {n: r["generation"] for n, r in runs.items() if r.get("generation")}
    if not have:
        return None
    ns = sorted(int(k.split("-")[-1]) for k in next(iter(have.values()))["model"] if k.startswith("seq-rep-"))
    header = ["Method", "Uniq per text", *(f"seq-rep-{n}" for n in ns), "distinct tokens", "texts"]
    rows = []
    for n, g in have.items():
        m = g["model"]
        rows.append([n, _fmt(m["uniq_per_text"], 1), *(_fmt(m[f"seq-rep-{k}"], 3) for k in ns), str(m["distinct_tokens"]), str(m["texts"])])
    h = next(iter(have.values()))["human"]
    rows.append(["Human", _fmt(h["uniq_per_text"], 1), *(_fmt(h[f"seq-rep-{k}"], 3) for k in ns), str(h["distinct_tokens"]), str(h["texts"])])
    first = next(iter(have.values()))
    return _table(header, rows) + (f"\n\nGreedy continuations of {first['gen_len']} tokens after "
                                   f"{first['prefix_len']}-token prefixes of the test split.")


def _repetition_table(runs) -> str:
    keys = [k for k in next(iter(runs.values()))["next_token"] if k != "acc"]
    return _table(["Method", "acc", *keys],
                  [[n, _fmt(r["next_token"]["acc"], 3), *(_fmt(r["next_token"][k], 3) for k in keys)] for n, r in runs.items()])


def _geometry_table(runs) -> str:
    keys = [("mean_cosine", "mean cos", 3), ("mean_embedding_norm", "norm of mean", 3),
            ("mean_embedding_norm_ratio", "norm of mean / mean norm", 3), ("norm_logfreq_pearson", "corr(norm, log p)", 3),
            ("singular_entropy_normalized", "SV entropy / log d", 3), ("hidden_mean_cosine", "hidden mean cos", 3)]
    keys = [k for k in keys if any(k[0] in r.get("geometry", {}) for r in runs.values())]
    return _table(["Method", *(k[1] for k in keys)],
                  [[n, *(_fmt(r["geometry"].get(k[0]), k[2]) for k in keys)] for n, r in runs.items()])


def _post_hoc_table(runs) -> Optional[str]:
    if not any(r.get("post_hoc") for r in runs.values()):
        return None
    datasets = [d for d in next(iter(runs.values())).get("word_similarity", {})]
    header = ["Method", "embedding", "I(W)", "I(W) Freq", "I(W) Med", "I(W) Rare", "mean cos", *datasets]
    rows = []
    for name, r in runs.items():
        variants = [("as trained", r)] + [(v["label"], v) for v in (r.get("post_hoc") or {}).values()]
        for label, v in variants:
            sims = [_fmt(v.get("word_similarity", {}).get(d, {}).get("spearman")) for d in datasets]
            rows.append([name, label, _fmt(v["isotropy"]["total"], 3), *(_fmt(v["isotropy"][g], 3) for g in GROUPS),
                         _fmt(v["geometry"]["mean_cosine"], 3), *sims])
    return _table(header, rows) + ("\n\nPost-hoc remedies change the embedding only: perplexity and Uniq are "
                                   "those of the model as trained.")


def _neighbours_table(runs, key: str) -> Optional[str]:
    have = {n: r[key] for n, r in runs.items() if r.get(key)}
    if not have:
        return None
    queries: List[str] = []
    for rows in have.values():
        for row in rows:
            if row["query"] not in queries:
                queries.append(row["query"])
    k = max(len(row["neighbours"]) for rows in have.values() for row in rows)
    header, body = [], []
    for q in queries:
        header += [f"{q}: {n}" for n in have]
    for i in range(k):
        cells = []
        for q in queries:
            for n, rows in have.items():
                row = next((x for x in rows if x["query"] == q), None)
                cells.append(row["neighbours"][i] if row and i < len(row["neighbours"]) else "-")
        body.append(cells)
    return _table(header, body, align_first_left=False) + "\n\n[rare]: the neighbour is in the rare 20% of the dictionary."


MODEL_SIZES = ("base", "big")


def _bleu_table(runs) -> str:
    flat = _table(["Method", "BLEU (tokenized, compound split)", "sacreBLEU", "sentences"],
                  [[n, _fmt(r["bleu"]["tokenized_compound_split"]), _fmt(r["bleu"]["sacrebleu"]), str(r["bleu"]["sentences"])]
                   for n, r in runs.items()])
    by_method = _runs_by_method_and_size(runs)
    if by_method is None:
        return flat
    sizes = [s for s in MODEL_SIZES if any(s in cells for cells in by_method.values())]

    def cell(method, size, key):
        run = by_method[method].get(size)
        return "-" if run is None else _fmt(run["bleu"][key])

    pivot = _table(["Method", *(f"BLEU {s}" for s in sizes), *(f"sacreBLEU {s}" for s in sizes)],
                   [[m, *(cell(m, s, "tokenized_compound_split") for s in sizes), *(cell(m, s, "sacrebleu") for s in sizes)]
                    for m in by_method])
    return pivot + "\n\nBLEU: tokenized, compound split (the paper's Table 7); sacreBLEU: detokenized.\n\n" + flat


def _runs_by_method_and_size(runs) -> Optional[Dict[str, Dict[str, Dict]]]:
    """{"MLE": {"base": run, "big": run}, ...} when every run is named "<method> <base|big>"
    (Table 7's layout: a row per method, a column per model size); else None."""
    out: Dict[str, Dict[str, Dict]] = {}
    for name, run in runs.items():
        method, _, size = name.rpartition(" ")
        if not method or size not in MODEL_SIZES or size in out.get(method, {}):
            return None
        out.setdefault(method, {})[size] = run
    return out


TITLES = {
    "groups": "Perplexity and Uniq per frequency group (paper Tables 3-4)",
    "perplexity": "Perplexity of every part of the test positions",
    "isotropy": "I(W) and IsoScore",
    "isotropy_groups": "I(W) per frequency group (paper Tables 10-11)",
    "study": "PPL and I(W) per frequency group (paper Tables 1-2)",
    "wordsim": "Word similarity (paper Table 6)",
    "ablation": "PPL, Uniq, I(W) (paper Tables 8-9, Figure 5)",
    "generation": "Greedy generation (paper Tables 5 and 15)",
    "repetition": "Next-token repetition (Welleck et al. 2020)",
    "geometry": "Embedding geometry",
    "neighbours": "Nearest neighbours (paper Table 13)",
    "post_hoc": "Post-hoc remedies: mean removal, all-but-the-top",
    "bleu": "BLEU (paper Table 7)",
    "cross_lingual": "Cross-lingual nearest neighbours (paper Table 14)",
}


def _render(name: str, runs) -> Optional[str]:
    return {
        "groups": lambda: _groups_table(runs),
        "perplexity": lambda: _perplexity_table(runs),
        "isotropy": lambda: _isotropy_isoscore_table(runs),
        "isotropy_groups": lambda: _isotropy_table(runs),
        "study": lambda: _study_table(runs),
        "wordsim": lambda: _wordsim_table(runs),
        "ablation": lambda: _ablation_table(runs),
        "generation": lambda: _generation_table(runs),
        "repetition": lambda: _repetition_table(runs),
        "geometry": lambda: _geometry_table(runs),
        "neighbours": lambda: _neighbours_table(runs, "neighbours"),
        "post_hoc": lambda: _post_hoc_table(runs),
        "bleu": lambda: _bleu_table(runs),
        "cross_lingual": lambda: _neighbours_table(runs, "cross_lingual_neighbours"),
    }[name]()


def resolve_tables(tables: Optional[Sequence[str]], kind: str) -> List[str]:
    available = LM_TABLES if kind == "lm" else MT_TABLES
    if not tables:
        return list(available)
    out = []
    for t in tables:
        name = TABLE_ALIASES.get(t, t)
        if name not in available:
            raise SystemExit(f"fairseq-agg-eval: table {t!r} is not available for {kind} runs "
                             f"(choose from {', '.join(available)} or paper table numbers)")
        if name not in out:
            out.append(name)
    return out


def compare_report(runs: Mapping[str, Dict], tables: Optional[Sequence[str]] = None,
                   figures: Optional[Mapping[str, str]] = None, run_counts: Optional[Mapping[str, int]] = None) -> str:
    """``runs``: name -> one run's results, or several runs' results aggregated by
    :func:`fairseq_agg.metrics.aggregate_runs` (``run_counts``: name -> how many)."""
    kind = next(iter(runs.values()))["kind"]
    parts = [f"# Comparison: {', '.join(runs)}", ""]
    if run_counts and any(n > 1 for n in run_counts.values()):
        parts += ["Methods with several runs (seeds) show mean ± sample standard deviation (ddof=1) over the runs: "
                  + ", ".join(f"{name} {n} run{'s' if n > 1 else ''}" for name, n in run_counts.items())
                  + ". Perplexities are means of the runs' perplexities. Per-run values: compare.json.", ""]
    for name in resolve_tables(tables, kind):
        body = _render(name, runs)
        if body:
            parts += [f"## {TITLES[name]}", "", body, ""]
    for key, file in (figures or {}).items():
        parts += [f"![{key}]({file})", ""]
    return "\n".join(parts)


def run_report(result: Dict) -> str:
    runs = {result["name"]: result}
    parts = [f"# Evaluation of {result['name']}", "",
             f"Checkpoint `{result['checkpoint']}`, data `{result['data']}`."]
    if result["kind"] == "lm":
        s = result["scoring"]
        parts += [f"Split `{s['subset']}` scored in blocks of {s['tokens_per_sample']} tokens with a context window "
                  f"of {s['context_window']} (as fairseq-eval-lm); dictionary of {result['vocab_size']} entries, "
                  f"groups {result['group_sizes']}.", ""]
    else:
        parts += [f"Dictionary of {result['vocab_size']} entries, groups {result['group_sizes']}; "
                  f"sacreBLEU against {result['bleu']['sacrebleu_reference']}.", ""]
    for name in (LM_TABLES if result["kind"] == "lm" else MT_TABLES):
        body = _render(name, runs)
        if body:
            parts += [f"## {TITLES[name]}", "", body, ""]
    if result.get("padding_symbols_excluded"):
        parts += [f"fairseq's {result['padding_symbols_excluded']} padding symbols (`madeupword0000`, ...) are in no "
                  "frequency group and are never neighbour queries or neighbours.", ""]
    warning = (result.get("bleu") or {}).get("warning")
    if warning:
        parts += [f"**Warning:** {warning}.", ""]
    for note in (result.get("training") or {}).get("notes", []):
        parts += [f"Note: {note}.", ""]
    if result.get("cross_lingual_note"):
        parts += [f"Cross-lingual neighbours: {result['cross_lingual_note']}.", ""]
    for example in (result.get("generation") or {}).get("examples", []):
        parts += [f"> **Prefix:** {example['prefix']}", ">", f"> **Continuation** (Uniq {example['uniq']}): "
                  f"{example['continuation']}", ""]
    for key, file in result.get("figures", {}).items():
        parts += [f"![{key}]({file})", ""]
    return "\n".join(parts)


def summary_line(result: Dict) -> str:
    if result["kind"] == "lm":
        p = result["ppl"]
        iso = result.get("isoscore", {}).get("total")
        return (f"{result['name']}: PPL {p['total']['ppl']:.2f} (rare {p['rare']['ppl']:.2f}), "
                f"Uniq {result['uniq']['total']}, I(W) {result['isotropy']['total']:.3f}"
                + (f", IsoScore {iso:.3f}" if iso is not None else ""))
    return (f"{result['name']}: BLEU {result['bleu']['tokenized_compound_split']:.2f} (tokenized, compound split), "
            f"sacreBLEU {result['bleu']['sacrebleu']:.2f}, I(W) {result['isotropy']['total']:.3f}")
