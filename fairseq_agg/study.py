"""The equal-perplexity question at CPU scale: MLE against AGG at several alphas (the paper's
Figure 5 in miniature), at two training lengths, over several seeds.

    python -m fairseq_agg.study                    # the full study (35-60 minutes on 2 cores)
    python -m fairseq_agg.study --smoke            # the same steps on a tiny slice (tests; seconds)

Every method is trained once per seed, as long as the longest ``--lengths``; the shorter
lengths are the checkpoints saved on the way (inverse_sqrt does not depend on the run's length,
so the checkpoint at update 600 of a 1800-update run is the model a 600-update run ends with).
Each checkpoint's test split is scored as ``fairseq-agg-eval lm`` scores it (same blocks and
context window): perplexity in total, of the frequent, medium and rare 30/50/20% groups and of
the other positions; and the output embedding's I(W) (both signs of every eigenvector) and
IsoScore. The report gives each number as mean ± sample standard deviation (ddof=1) over the
seeds and a verdict computed from them:

* "within seed noise": |mean PPL(AGG) - mean PPL(MLE)| <= 2 SE, SE = sqrt(s_AGG^2 / n_AGG +
  s_MLE^2 / n_MLE), the standard error of the difference of the two means (s: the sample stds);
* the question: does some alpha reach total perplexity within seed noise of MLE with a rare-group
  perplexity at least 2x lower (mean PPL rare of MLE / mean of AGG >= 2)? Answered per length;
* how the total-perplexity gap (AGG - MLE, in per cent of MLE) moves from the shortest to the
  longest length, per alpha.

Outputs in ``--workdir``: ``study.json`` (settings, every seed's numbers, means, stds, verdict),
``study.md`` (the table and the verdict), and the runs' folders (checkpoints, train.log). The
workdir must be new, empty or an earlier study's: the study stamps each folder it creates
(``.fairseq-agg-owner``), replaces only stamped folders, and refuses any other in one line before
any work starts.
"""

import argparse
import json
import logging
import math
import os
import sys
import time
from functools import reduce
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_agg import demo, metrics
from fairseq_agg.errors import AggConfigError
from fairseq_agg.workdir import Owner

# The full study: the demo's model and data (the shipped WikiText-2 slice, 5,389-word
# dictionary, 1024 tokens per update, about 228 updates per epoch), trained 600 updates (the
# demo's length) and 3000 (about 13 epochs). Alphas: at this batch and window, a word is rare
# below alpha x 228 occurrences per epoch: 0.025 makes about 840 words rare, 0.03 (the demo's)
# about 1,470, 0.05 about 3,100 (of 5,386).
FULL = {"alphas": (0.025, 0.03, 0.05), "seeds": (1, 2, 3), "lengths": (600, 3000)}
# --smoke: the same steps in seconds (numbers mean nothing): a slice of the slice, a tiny model.
SMOKE = {"alphas": (0.05, 0.1), "seeds": (1, 2), "lengths": (4, 8), "train_lines": 400, "eval_lines": 40,
         "embed_dim": 16, "layers": 1, "tokens_per_sample": 32, "max_tokens": 256, "threshold": 2}

# Seconds per update of one run, two runs side by side on 2 cores, with the demo's model and
# data: 0.10 measured for this study's runs (200 updates, beside other work), 0.17 from the
# demo's 102 s for its two 600-update runs with their validations. A machine busy with other
# work is slower still (the demo once took 297 s, 0.5 s per update).
SECONDS_PER_UPDATE = (0.10, 0.17)

METRIC_KEYS = (
    "ppl total", "ppl frequent", "ppl medium", "ppl rare", "ppl other",
    "I(W)", "I(W) frequent", "I(W) medium", "I(W) rare",
    "IsoScore", "IsoScore frequent", "IsoScore medium", "IsoScore rare",
    "rare_group_size",
)
NOISE_SE = 2.0  # "within seed noise": within this many standard errors of the difference
RARE_FACTOR = 2.0  # "rare perplexity at least 2x lower"
OWNER = Owner("fairseq_agg.study", "--workdir")  # the study clears only folders it made


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_agg.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/study"),
                   help="a new or empty folder, or an earlier study's (default: %(default)s)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with wiki.{train,valid,test}.tokens (default: the repository's data/wikitext-2)")
    p.add_argument("--alphas", type=float, nargs="+", default=None,
                   help=f"AGG alphas (default: {' '.join(map(str, FULL['alphas']))})")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"seeds, at least 2 (default: {' '.join(map(str, FULL['seeds']))})")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"training lengths in updates (default: {' '.join(map(str, FULL['lengths']))})")
    p.add_argument("--threshold", type=int, default=demo.DEFAULT_THRESHOLD,
                   help="dictionary: words seen at least this often in train (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="the same steps on a 400-line slice with a tiny model and 4/8 updates (seconds; for tests)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, train nothing")
    p.add_argument("--verbose", action="store_true", help="show every fairseq log line")
    return p


# -- plan -----------------------------------------------------------------------------------------

def method_name(alpha: Optional[float]) -> str:
    return "MLE" if alpha is None else f"AGG alpha={alpha:g}"


def plan_runs(alphas: Sequence[float], seeds: Sequence[int]) -> List[Tuple[str, Optional[float], int]]:
    """(run folder, alpha or None for MLE, seed) of every training run."""
    methods = [None, *alphas]
    return [(("mle" if a is None else f"agg{a:g}") + f"-seed{s}", a, s) for s in seeds for a in methods]


def estimate_seconds(n_runs: int, max_length: int, jobs: int) -> Tuple[float, float]:
    """Training time range: ``n_runs`` runs of ``max_length`` updates, ``jobs`` at a time."""
    rounds = math.ceil(n_runs / max(1, jobs))
    return tuple(rounds * max_length * s for s in SECONDS_PER_UPDATE)


# -- data ------------------------------------------------------------------------------------------

def smoke_data(folder: Path) -> Path:
    """The first lines of the shipped WikiText-2 slice, as a tiny corpus."""
    OWNER.claim(folder)
    for split in demo.SPLITS:
        lines = SMOKE["train_lines"] if split == "train" else SMOKE["eval_lines"]
        with open(demo.REPO_DATA / f"wiki.{split}.tokens", encoding="utf-8") as src:
            text = "".join(line for _, line in zip(range(lines), src))
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return folder


# -- training --------------------------------------------------------------------------------------

def demo_args(opts, data: Path) -> argparse.Namespace:
    """The demo's settings (its parser's defaults), shrunk for --smoke."""
    argv = ["--workdir", str(opts.workdir), "--data", str(data), "--threshold", str(opts.threshold),
            "--max-update", str(max(opts.lengths)), "--jobs", str(opts.jobs)]
    if opts.smoke:
        argv += ["--embed-dim", str(SMOKE["embed_dim"]), "--layers", str(SMOKE["layers"]),
                 "--tokens-per-sample", str(SMOKE["tokens_per_sample"]), "--max-tokens", str(SMOKE["max_tokens"]),
                 "--warmup-updates", "2"]
    args = demo.build_parser().parse_args(argv)
    args.workdir = opts.workdir
    save_every = reduce(math.gcd, opts.lengths)
    # a checkpoint (and a validation, on 'valid' only) at every length, none in between
    args.extra = f"--save-interval-updates {save_every} --valid-subset valid"
    return args


def train(opts, args, data_bin: Path, plan) -> Dict[str, float]:
    """Train the planned runs, ``opts.jobs`` at a time; run folder -> seconds."""
    show = (lambda _line: True) if opts.verbose else (lambda line: "Traceback" in line or "Error" in line)

    def start(item, threads):
        key, alpha, seed = item
        save_dir = OWNER.replace(opts.workdir / key)  # never resume an earlier study's run
        args.alpha = alpha if alpha is not None else demo.DEFAULT_ALPHA
        cmd = demo.train_command(args, data_bin, save_dir, "mle" if alpha is None else "agg", seed)
        print(f"[study] training {key} ({method_name(alpha)}, seed {seed}, {args.max_update} updates)", flush=True)
        return key, demo.LoggedProcess(cmd, save_dir / "train.log", show, key, threads)

    return {key: round(seconds, 1) for key, (_, seconds, _) in demo.run_in_batches(plan, opts.jobs, start).items()}


# -- evaluation ------------------------------------------------------------------------------------

def checkpoint_at(save_dir: Path, update: int) -> Path:
    """The checkpoint a run saved at ``update`` (``checkpoint_<epoch>_<update>.pt``, or
    ``checkpoint_last.pt`` when that is the run's end)."""
    found = sorted(save_dir.glob(f"checkpoint_*_{update}.pt"))
    if found:
        return found[-1]
    last = save_dir / "checkpoint_last.pt"
    state = demo.load_checkpoint(last)
    if int(state["optimizer_history"][-1]["num_updates"]) == update:
        return last
    raise SystemExit(f"study: {save_dir} has no checkpoint at update {update}")


def evaluate(data_bin: Path, checkpoint: Path, groups, alpha: Optional[float]) -> Dict[str, float]:
    """Test-split perplexities (total, per group, other) as ``fairseq-agg-eval lm`` computes them,
    I(W) and IsoScore of the output embedding, and AGG's rare-group size."""
    import torch

    from fairseq_agg import eval as agg_eval

    ns = argparse.Namespace(data=data_bin, path=checkpoint, tokens_per_sample=None, context_window=None,
                            subset="test", sample_break_mode="none", max_tokens=4096, cpu=True, fp16=False)
    logging.disable(logging.INFO)  # fairseq's and hydra's start-up lines, once per checkpoint
    try:
        model, task, itr, device, _, _ = agg_eval.setup_lm(ns)
        scored = agg_eval.score_lm(model, task, itr, device, max_hidden=1, show_progress=False)
    finally:
        logging.disable(logging.NOTSET)
    vocab = len(task.target_dictionary)
    ppl = metrics.group_perplexity(scored["nll"], scored["targets"], groups, vocab)
    weight = agg_eval.output_embedding(model)
    out = {f"ppl {part}": ppl[part]["ppl"] for part in ("total", "frequent", "medium", "rare", "other")}
    out["tokens"] = ppl["total"]["tokens"]
    out.update(demo.embedding_isotropy(weight, {n: torch.as_tensor(ids) for n, ids in groups.items()}))
    if alpha is not None:
        out["rare_group_size"] = demo.rare_group_size(demo.load_checkpoint(checkpoint), alpha)
    return out


# -- statistics and verdict ----------------------------------------------------------------------

def summarize(per_seed: Dict[str, Dict[str, float]]) -> Dict[str, Dict]:
    """metric -> {"mean", "std" (sample, ddof=1), "values" (in seed order), "n"}."""
    out = {}
    for key in METRIC_KEYS:
        values = [run[key] for run in per_seed.values() if run.get(key) is not None]
        if len(values) == len(per_seed) and values:
            stat = metrics.Stat(values)
            out[key] = {"mean": float(stat), "std": stat.std, "values": stat.values, "n": stat.n}
    return out


def compare_to_mle(mle: Dict, agg: Dict) -> Dict[str, float]:
    """The total-perplexity gap of AGG over MLE (absolute, in per cent of MLE, and in standard
    errors of the difference of the means) and the rare-perplexity ratio MLE / AGG."""
    m, a = mle["ppl total"], agg["ppl total"]
    diff = a["mean"] - m["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + m["std"] ** 2 / m["n"]) if a["n"] > 1 and m["n"] > 1 else float("nan")
    within = abs(diff) <= NOISE_SE * se if math.isfinite(se) else diff == 0
    rare_ratio = mle["ppl rare"]["mean"] / agg["ppl rare"]["mean"]
    return {"ppl_diff": diff, "ppl_gap_percent": 100.0 * diff / m["mean"], "se": se,
            "gap_in_se": diff / se if se and math.isfinite(se) else float("nan"),
            "within_noise": bool(within), "rare_ratio": rare_ratio,
            "rare_2x_lower": bool(rare_ratio >= RARE_FACTOR),
            "answers_yes": bool(within and rare_ratio >= RARE_FACTOR)}


def verdict(stats: Dict[str, Dict[int, Dict]], alphas: Sequence[float], lengths: Sequence[int]) -> Dict:
    """The plain-language answer, computed from ``stats[method][length]`` (summaries)."""
    lengths = sorted(lengths)
    comparisons = {method_name(a): {L: compare_to_mle(stats["MLE"][L], stats[method_name(a)][L]) for L in lengths}
                   for a in alphas}
    lines = []
    answers = {}
    for L in lengths:
        yes = [(a, comparisons[method_name(a)][L]) for a in alphas if comparisons[method_name(a)][L]["answers_yes"]]
        answers[L] = bool(yes)
        mle = stats["MLE"][L]
        if yes:
            a, c = max(yes, key=lambda item: item[1]["rare_ratio"])
            agg = stats[method_name(a)][L]
            lines.append(
                f"At {L} updates: YES. AGG with alpha {a:g} reaches total perplexity {_ms(agg['ppl total'])} against "
                f"MLE's {_ms(mle['ppl total'])} ({c['ppl_gap_percent']:+.1f}%, {_se(c)}: within seed noise) with a "
                f"rare-group perplexity {c['rare_ratio']:.2f}x lower ({_ms(agg['ppl rare'], 0)} against "
                f"{_ms(mle['ppl rare'], 0)})."
                + (f" Also: {', '.join(f'alpha {b:g}' for b, _ in yes if b != a)}." if len(yes) > 1 else ""))
        else:
            parts = []
            for a in alphas:
                c = comparisons[method_name(a)][L]
                why = []
                if not c["within_noise"]:
                    why.append(f"total PPL {c['ppl_gap_percent']:+.1f}% ({_se(c)}: beyond seed noise)")
                else:
                    why.append(f"total PPL {c['ppl_gap_percent']:+.1f}% ({_se(c)}: within seed noise)")
                why.append(f"rare PPL {c['rare_ratio']:.2f}x lower" + ("" if c["rare_2x_lower"] else " (less than 2x)"))
                parts.append(f"alpha {a:g}: " + ", ".join(why))
            lines.append(f"At {L} updates: NO alpha reaches total perplexity within seed noise of MLE "
                         f"({_ms(mle['ppl total'])}) with rare perplexity at least 2x lower: " + "; ".join(parts) + ".")
    trend = []
    if len(lengths) >= 2:
        first, last = lengths[0], lengths[-1]
        for a in alphas:
            c0, c1 = comparisons[method_name(a)][first], comparisons[method_name(a)][last]
            move = ("narrows" if abs(c1["ppl_gap_percent"]) < abs(c0["ppl_gap_percent"]) else
                    "widens" if abs(c1["ppl_gap_percent"]) > abs(c0["ppl_gap_percent"]) else "stays")
            trend.append(f"alpha {a:g} {move}: {c0['ppl_gap_percent']:+.1f}% at {first} updates -> "
                         f"{c1['ppl_gap_percent']:+.1f}% at {last} ({_se(c0)} -> {_se(c1)}); rare PPL ratio "
                         f"{c0['rare_ratio']:.2f}x -> {c1['rare_ratio']:.2f}x")
        lines.append("Total-perplexity gap of AGG over MLE with training length: " + "; ".join(trend) + ".")
    return {"lines": lines, "answer_by_length": answers, "comparisons": comparisons,
            "rule": f"within seed noise: |mean AGG - mean MLE| <= {NOISE_SE:g} x sqrt(s_AGG^2/n + s_MLE^2/n) "
                    f"(sample stds, ddof=1); rare: mean PPL rare of MLE / of AGG >= {RARE_FACTOR:g}"}


def _ms(entry: Dict, digits: int = 2) -> str:
    return metrics.Stat(entry["values"]).format(digits)


def _se(c: Dict) -> str:
    return f"{c['gap_in_se']:+.1f} SE" if math.isfinite(c["gap_in_se"]) else "SE n/a"


# -- report ----------------------------------------------------------------------------------------

TABLE_COLUMNS = (("PPL total", "ppl total", 2), ("PPL frequent", "ppl frequent", 2), ("PPL medium", "ppl medium", 1),
                 ("PPL rare", "ppl rare", 0), ("I(W)", "I(W)", 3), ("I(W) rare", "I(W) rare", 3),
                 ("IsoScore", "IsoScore", 3), ("IsoScore rare", "IsoScore rare", 3),
                 ("rare group", "rare_group_size", 0))


def markdown(stats, alphas, lengths, seeds, result_verdict) -> str:
    header = ["method", "updates", *(c[0] for c in TABLE_COLUMNS), "total vs MLE", "rare: MLE / AGG"]
    rows = []
    for L in sorted(lengths):
        for alpha in (None, *alphas):
            name = method_name(alpha)
            entry = stats[name][L]
            cells = [name, str(L)]
            for _, key, digits in TABLE_COLUMNS:
                cells.append(_ms(entry[key], digits) if key in entry else "-")
            if alpha is None:
                cells += ["-", "-"]
            else:
                c = result_verdict["comparisons"][name][L]
                cells += [f"{c['ppl_gap_percent']:+.1f}% ({_se(c)})", f"{c['rare_ratio']:.2f}x"]
            rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(
        ["# MLE vs AGG: the equal-perplexity study", "",
         f"Mean ± sample standard deviation (ddof=1) over seeds {' '.join(map(str, seeds))}; test split, perplexity "
         "in total and of the frequent / medium / rare 30/50/20% groups of the dictionary; I(W) over both signs of "
         "every eigenvector; IsoScore (Rudman et al. 2022). SE: standard error of the difference of the two means.",
         "", *lines, "", "**Verdict.**", "", *(f"- {line}" for line in result_verdict["lines"]), "",
         f"Rule: {result_verdict['rule']}.", ""])


# -- main ------------------------------------------------------------------------------------------

def run_study(argv: Optional[Sequence[str]] = None) -> Dict:
    opts = build_parser().parse_args(argv)
    preset = SMOKE if opts.smoke else FULL
    opts.alphas = list(dict.fromkeys(opts.alphas or preset["alphas"]))
    opts.seeds = list(dict.fromkeys(opts.seeds or preset["seeds"]))
    opts.lengths = sorted(set(opts.lengths or preset["lengths"]))
    if opts.smoke and opts.threshold == demo.DEFAULT_THRESHOLD:
        opts.threshold = SMOKE["threshold"]
    if len(opts.seeds) < 2:
        raise SystemExit("study: give at least two --seeds (the noise is measured across seeds)")
    if not opts.alphas or any(not 0 < a <= 1 for a in opts.alphas):
        raise SystemExit("study: --alphas must lie in (0, 1]")
    if opts.lengths[0] < 1 or opts.jobs < 1:
        raise SystemExit("study: --lengths and --jobs must be positive")
    opts.workdir = opts.workdir.resolve()
    plan = plan_runs(opts.alphas, opts.seeds)
    low, high = estimate_seconds(len(plan), opts.lengths[-1], opts.jobs)
    print(f"[study] {len(plan)} runs ({len(opts.alphas) + 1} methods x {len(opts.seeds)} seeds) of "
          f"{opts.lengths[-1]} updates, evaluated at {', '.join(map(str, opts.lengths))} updates, {opts.jobs} at a time"
          + ("" if opts.smoke else f"; training alone about {low / 60:.0f}-{high / 60:.0f} minutes on 2 cores "
             "(more on a machine busy with other work), plus about 6 s of scoring per run and length"), flush=True)
    if opts.dry_run:
        return {"plan": plan, "estimate_seconds": [low, high]}
    start = time.time()
    # every folder the study writes or replaces, checked before any work starts
    OWNER.refuse_unless_ours(opts.workdir, opts.workdir / "smoke-data", opts.workdir / "data-bin",
                             *(opts.workdir / key for key, _, _ in plan))
    OWNER.claim(opts.workdir)
    data = smoke_data(opts.workdir / "smoke-data") if opts.smoke else demo.resolve_data(opts.data)
    data_bin = demo.preprocess(data, opts.workdir, opts.threshold, opts.verbose, OWNER)
    args = demo_args(opts, data)
    train_seconds = train(opts, args, data_bin, plan)

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    groups = demo.frequency_groups(data_bin / "dict.txt")
    groups = {name: ids.numpy() for name, ids in groups.items()}
    per_run: Dict[str, Dict[int, Dict]] = {}
    for key, alpha, seed in plan:
        per_run[key] = {}
        for L in opts.lengths:
            print(f"[study] scoring {key} at update {L}", flush=True)
            per_run[key][L] = evaluate(data_bin, checkpoint_at(opts.workdir / key, L), groups, alpha)
    stats: Dict[str, Dict[int, Dict]] = {}
    for alpha in (None, *opts.alphas):
        name = method_name(alpha)
        keys = [(key, seed) for key, a, seed in plan if a == alpha]
        stats[name] = {L: summarize({str(seed): per_run[key][L] for key, seed in keys}) for L in opts.lengths}
    result_verdict = verdict(stats, opts.alphas, opts.lengths)
    text = markdown(stats, opts.alphas, opts.lengths, opts.seeds, result_verdict)
    result = {
        "settings": {"data": str(data), "smoke": opts.smoke, "alphas": opts.alphas, "seeds": opts.seeds,
                     "lengths": opts.lengths, "threshold": opts.threshold, "embed_dim": args.embed_dim,
                     "layers": args.layers, "max_tokens": args.max_tokens, "tokens_per_sample": args.tokens_per_sample,
                     "lr": args.lr, "jobs": opts.jobs},
        "std": "sample standard deviation over the seeds (ddof=1)",
        "runs": {key: {"alpha": alpha, "seed": seed, "train_seconds": train_seconds.get(key),
                       "by_length": {str(L): per_run[key][L] for L in opts.lengths}} for key, alpha, seed in plan},
        "stats": {name: {str(L): s for L, s in by_length.items()} for name, by_length in stats.items()},
        "verdict": {**result_verdict,
                    "comparisons": {n: {str(L): c for L, c in by_length.items()}
                                    for n, by_length in result_verdict["comparisons"].items()},
                    "answer_by_length": {str(L): v for L, v in result_verdict["answer_by_length"].items()}},
        "total_seconds": round(time.time() - start, 1),
    }
    (opts.workdir / "study.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (opts.workdir / "study.md").write_text(text, encoding="utf-8")
    print()
    print(text)
    print(f"[study] {opts.workdir / 'study.md'}, {opts.workdir / 'study.json'} (total {result['total_seconds']:.0f} s)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run_study(argv)
    except AggConfigError as refusal:
        parser = build_parser()
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
