"""``fairseq-agg-eval compare``: runs side by side in the layout of the paper's tables, several runs (seeds) per method as mean +- sample std."""

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

from fairseq_agg import metrics
from fairseq_agg.evaluation.common import (
    EvalError, KIND_WORDS, REQUIRED_MODULES, _check_modules, _json_default, _one_line,
    check_output_folder, isotropy_series, read_text,
)


def alpha_sweep(runs: Mapping[str, Dict]) -> List[Dict]:
    """PPL, Uniq and I(W) per AGG alpha (Figure 5), when the language-model runs include AGG
    runs of at least two alphas; [] otherwise."""
    points = {}
    for result in runs.values():
        alpha = (result.get("trained_with") or {}).get("agg_alpha")
        if result.get("kind") != "lm" or alpha is None or not str(result["trained_with"]["criterion"]).startswith("agg_"):
            continue
        points.setdefault(float(alpha), {"alpha": float(alpha), "ppl": result["ppl"]["total"]["ppl"],
                                         "uniq": result["uniq"]["total"], "isotropy": result["isotropy"]["total"]})
    return [points[a] for a in sorted(points)] if len(points) >= 2 else []


# the settings that make two runs the same method (the seed may differ)
_SAME_METHOD_KEYS = ("criterion", "agg_alpha", "agg_no_g1", "agg_no_g2", "agg_static_after", "agg_study",
                     "unlikelihood_alpha", "label_smoothing")


# headline numbers of compare.json per method: (label, path in results.json)
SUMMARY_KEYS = tuple(
    [(f"ppl {g}", ("ppl", g, "ppl")) for g in ("frequent", "medium", "rare", "other", "total")]
    + [(f"I(W) {g}", ("isotropy", g)) for g in ("frequent", "medium", "rare", "total")]
    + [(f"IsoScore {g}", ("isoscore", g)) for g in ("frequent", "medium", "rare", "total")]
    + [(f"Uniq {g}", ("uniq", g)) for g in ("frequent", "medium", "rare", "total")]
    + [("BLEU", ("bleu", "tokenized_compound_split")), ("sacreBLEU", ("bleu", "sacrebleu"))])


def _lookup(result: Mapping, path: Sequence[str]):
    for key in path:
        if not isinstance(result, Mapping) or key not in result:
            return None
        result = result[key]
    return result


def method_summary(results: Sequence[Mapping]) -> Dict[str, Dict]:
    """Per headline number of several runs of one method: the runs' values, their mean and
    sample standard deviation (ddof=1; None for one run)."""
    out: Dict[str, Dict] = OrderedDict()
    for label, path in SUMMARY_KEYS:
        values = [_lookup(r, path) for r in results]
        if any(v is None for v in values):
            continue
        stat = metrics.Stat(values)
        out[label] = {"values": stat.values, "mean": float(stat), "std": stat.std if stat.n > 1 else None}
    return out


def _group_runs(args) -> "OrderedDict[str, List[Tuple[Path, Dict]]]":
    """Method name -> its runs (path, results): runs with the same name (from --names, else
    each results.json's name) are runs of one method, e.g. seeds."""
    loaded = []
    for path in args.results:
        path = Path(path)
        result = _read_results(path)
        if path.is_dir():
            path = path / "results.json"
        loaded.append((path, result))
    if args.names:
        if len(args.names) != len(loaded):
            raise EvalError(f"--names gives {len(args.names)} name{'s' if len(args.names) != 1 else ''} for "
                            f"{len(loaded)} runs: give one name per run, in the order of the runs")
        names = list(args.names)
    else:
        names = [result.get("name") or path.parent.name for path, result in loaded]
    methods: "OrderedDict[str, List[Tuple[Path, Dict]]]" = OrderedDict()
    for name, item in zip(names, loaded):
        methods.setdefault(name, []).append(item)
    for name, items in methods.items():
        settings = {json.dumps({k: (r.get("trained_with") or {}).get(k) for k in _SAME_METHOD_KEYS}, sort_keys=True)
                    for _, r in items}
        if len(settings) > 1:
            raise EvalError(f"the runs named {name!r} were trained with different settings ({' vs '.join(sorted(settings))}); "
                            "runs of one method (seeds) must share them: give the others other --names")
        if len({p.resolve() for p, _ in items}) < len(items):
            raise EvalError(f"the same results.json is given twice for {name!r}")
    return methods


def compare(args) -> str:
    _check_modules(REQUIRED_MODULES["compare"], "fairseq-agg-eval compare")
    from fairseq_agg import figures
    from fairseq_agg.report import compare_report, resolve_tables

    methods = _group_runs(args)
    all_results = [r for items in methods.values() for _, r in items]
    kinds = {r.get("kind") for r in all_results}
    if len(kinds) != 1:
        raise EvalError(f"cannot compare runs of different kinds: {sorted(map(str, kinds))}")
    resolve_tables(args.tables, kinds.pop())
    for name, items in methods.items():
        for path, result in items:
            if "singular_values" not in result:
                raise EvalError(f"run {name!r} ({path}): its results.json lacks 'singular_values' (written by another "
                                "version of fairseq-agg-eval?); evaluate the checkpoint again")
    runs = OrderedDict((name, items[0][1] if len(items) == 1 else metrics.aggregate_runs([r for _, r in items]))
                       for name, items in methods.items())
    counts = OrderedDict((name, len(items)) for name, items in methods.items())
    check_output_folder(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = {"singular_values": figures.singular_values(args.out / "singular_values.png",
                                                        {n: r["singular_values"] for n, r in runs.items()})}
    iso = {n: isotropy_series(r.get("training", {})) for n, r in runs.items()}
    iso = {n: series for n, series in iso.items() if series}
    if iso:
        drawn["isotropy_over_training"] = figures.isotropy_over_training(args.out / "isotropy_over_training.png", iso)
    agg_runs = [n for n, r in runs.items() if str((r.get("trained_with") or {}).get("criterion", "")).startswith("agg_")]
    rare = {n: list(runs[n].get("training", {}).get("rare_group_size") or []) for n in agg_runs}
    rare.update({n: r["training"]["rare_group_size"] for n, r in runs.items() if r.get("training", {}).get("rare_group_size")})
    if any(rare.values()):
        drawn["rare_group_size"] = figures.rare_group_size(args.out / "rare_group_size.png", rare)
    sweep = alpha_sweep(runs)
    if sweep:
        drawn["alpha_sweep"] = figures.alpha_sweep(args.out / "alpha_sweep.png", sweep)
    text = compare_report(runs, tables=args.tables, figures={k: os.path.basename(v) for k, v in drawn.items()},
                          run_counts=counts)
    (args.out / "compare.md").write_text(text, encoding="utf-8")
    summary = {"runs": list(runs), "tables": args.tables,
               "std": "sample standard deviation over a method's runs (ddof=1)",
               "methods": OrderedDict((name, {"results": [str(p) for p, _ in items],
                                              "summary": method_summary([r for _, r in items])})
                                      for name, items in methods.items())}
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    print(text)
    return text


def _read_results(path: Path) -> Dict:
    """One results.json of ``lm`` or ``mt`` (or the folder holding it), checked."""
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise EvalError(f"{path} does not exist (give results.json files or the folders holding them)")
    text = read_text(path, str(path), "give the results.json that `fairseq-agg-eval lm|mt` wrote")
    try:
        result = json.loads(text)
    except ValueError as err:
        raise EvalError(f"{path} is not valid JSON ({_one_line(err)}); give the results.json that "
                        "`fairseq-agg-eval lm|mt` wrote") from None
    if not isinstance(result, dict) or result.get("kind") not in KIND_WORDS:
        raise EvalError(f"{path} is not a results.json of fairseq-agg-eval lm or mt; give the results.json "
                        "that `fairseq-agg-eval lm|mt` wrote")
    return result
