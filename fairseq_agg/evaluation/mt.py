"""``fairseq-agg-eval mt``: BLEU through ``fairseq-generate`` and the translation model's embedding analysis (paper Tables 7 and 14)."""

import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from fairseq_agg import metrics
from fairseq_agg.evaluation.common import (
    EvalError, PACKAGE_DIR, _check_vocabulary, _split_exists, _task_name, _token_label,
    checkpoint_config, choose_queries, dictionary_groups, embedding_metrics_after_post_hoc,
    load_dictionary_counts, neighbours_table, output_embedding, token_counts, training_setup,
    word_rows, write_outputs,
)


def run_generate(args, out_dir: Path) -> Path:
    """fairseq-generate with the paper's decoding (beam 4, length penalty 0.6), BPE removed."""
    state = checkpoint_config(args.path)
    target = out_dir / f"generate-{args.subset}.txt"
    cmd = [sys.executable, "-m", "fairseq_cli.generate", str(args.data), "--path", str(args.path),
           "--user-dir", str(PACKAGE_DIR), "--task", _task_name(state), "--gen-subset", args.subset,
           "--beam", str(args.beam), "--lenpen", str(args.lenpen), "--remove-bpe",
           "--max-tokens", str(args.max_tokens), "--num-workers", "0"]
    if args.cpu:
        cmd.append("--cpu")
    if args.fp16:
        cmd.append("--fp16")
    print(f"[eval] fairseq-generate (beam {args.beam}, lenpen {args.lenpen}) -> {target}", file=sys.stderr, flush=True)
    if args.no_progress_bar:
        cmd.append("--no-progress-bar")
    tail: "deque[str]" = deque(maxlen=40)
    with open(target, "w", encoding="utf-8") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.PIPE, text=True)
        # fairseq-generate's own progress bar and log lines, passed on as they come
        for line in proc.stderr:
            tail.append(line)
            if not args.no_progress_bar:
                sys.stderr.write(line)
                sys.stderr.flush()
        returncode = proc.wait()
    if returncode != 0:
        raise EvalError(f"fairseq-generate failed (exit {returncode}):\n{''.join(tail)[-3000:]}")
    return target


def parse_generate_output(path: Path) -> Tuple[List[str], List[str]]:
    """Hypotheses (H lines) and references (T lines) of a fairseq-generate log, in id order."""
    hyps, refs = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            sid, _score, *text = line[2:].split("\t")
            # with --nbest, the first H line of an id is its best hypothesis
            hyps.setdefault(int(sid), text[0] if text else "")
        elif line.startswith("T-"):
            sid, *text = line[2:].split("\t")
            refs[int(sid)] = text[0] if text else ""
    if not hyps:
        raise EvalError(f"{path} holds no hypotheses (H-* lines): not fairseq-generate output")
    missing = sorted(set(hyps) ^ set(refs))
    if missing:
        raise EvalError(f"{path}: ids {missing[:5]} lack a hypothesis or a reference")
    ids = sorted(hyps)
    return [hyps[i] for i in ids], [refs[i] for i in ids]


def evaluate_mt(args) -> Dict:
    from fairseq import checkpoint_utils, tasks
    from fairseq.data import data_utils
    from sacremoses import MosesDetokenizer

    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    state = checkpoint_config(args.path)
    task_cfg = state["cfg"]["task"]
    src, tgt = task_cfg["source_lang"], task_cfg["target_lang"]
    result: Dict = {"kind": "mt", "name": args.name, "checkpoint": str(args.path), "data": str(args.data),
                    "direction": f"{src}-{tgt}", "trained_with": training_setup(state)}

    generate_output = args.generate_output or run_generate(args, args.out)
    hyps, refs = parse_generate_output(generate_output)
    tok = metrics.tokenized_bleu(hyps, refs)
    result["bleu"] = {"tokenized_compound_split": round(tok.score, 2), "tokenized_signature": "compound-split, tokenize=none",
                      "sentences": len(hyps), "generate_output": str(generate_output)}
    detok = MosesDetokenizer(lang=tgt)
    detok_hyps = [detok.detokenize(h.split()) for h in hyps]
    if args.reference:
        raw_refs = Path(args.reference).read_text(encoding="utf-8").splitlines()
        if len(raw_refs) != len(hyps):
            raise EvalError(f"--reference {args.reference} has {len(raw_refs)} lines for {len(hyps)} hypotheses")
        reference_kind = f"raw reference {args.reference}"
    else:
        raw_refs = [detok.detokenize(r.split()) for r in refs]
        reference_kind = "detokenized T lines of fairseq-generate (pass --reference for the raw test set)"
    sacre = metrics.detokenized_bleu(detok_hyps, raw_refs)
    result["bleu"]["sacrebleu"] = round(sacre.score, 2)
    result["bleu"]["sacrebleu_reference"] = reference_kind

    from fairseq import options, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_generation_parser()
    argv = [str(args.data), "--path", str(args.path), "--user-dir", str(PACKAGE_DIR), "--task", _task_name(state)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(args.path)], task=task)
    model = models[0]
    tgt_dict, src_dict = task.target_dictionary, task.source_dictionary
    _check_vocabulary(model, tgt_dict, f"{args.data}/dict.{tgt}.txt")
    weight = output_embedding(model)
    counts = load_dictionary_counts(tgt_dict)
    groups, fillers = dictionary_groups(tgt_dict, counts)
    group_of = metrics.group_of_tokens(groups, len(tgt_dict))
    result["vocab_size"] = len(tgt_dict)
    result["group_sizes"] = {n: int(len(ids)) for n, ids in groups.items()}
    result["padding_symbols_excluded"] = int(len(fillers))
    check_sentence_count(args, result, task, src, tgt, generate_output)
    result["isotropy"] = metrics.isotropy_by_group(weight, groups, signs=args.isotropy_signs)
    result["isotropy_signs"] = args.isotropy_signs
    result["isoscore"] = metrics.isoscore_by_group(weight, groups)
    result["geometry"] = metrics.embedding_geometry(weight, counts, tgt_dict.nspecial)
    result["singular_values"] = metrics.singular_spectrum(weight[tgt_dict.nspecial:])["normalized"]
    result["post_hoc"] = embedding_metrics_after_post_hoc(args, weight, groups, counts, tgt_dict.nspecial)

    # Cross-lingual neighbours (Table 14): source words among the rows of a joined dictionary,
    # each neighbour tagged with the side of the training data it mostly occurs on.
    if src_dict.symbols == tgt_dict.symbols:
        side_counts = {}
        for lang in (src, tgt):
            prefix = Path(args.data) / f"train.{src}-{tgt}.{lang}"
            dataset = data_utils.load_indexed_dataset(str(prefix), tgt_dict)
            if dataset is None:
                side_counts = {}
                break
            side_counts[lang] = token_counts(dataset, len(tgt_dict), f"counting train.{lang}", not args.no_progress_bar)
        if args.neighbours:
            queries = choose_queries(args, src_dict, groups)
        else:
            # rare tokens of the source side
            source_only = [t for t in groups["rare"] if side_counts and side_counts[src][t] > side_counts[tgt][t]]
            pool = source_only or list(groups["rare"])  # padding symbols are in no group
            queries = [int(pool[i]) for i in np.linspace(0, len(pool) - 1, min(3, len(pool))).round().astype(int)]

        def label(token: int) -> str:
            text = _token_label(tgt_dict, token, group_of)
            if side_counts and side_counts[tgt][token] > side_counts[src][token]:
                text += f" ({tgt})"
            return text

        result["cross_lingual_neighbours"] = neighbours_table(
            weight, tgt_dict, queries, group_of, args.k, candidates=word_rows(tgt_dict, fillers), label=label)
    else:
        result["cross_lingual_neighbours"] = None
        result["cross_lingual_note"] = "source and target dictionaries differ: no shared embedding space"
    result["seconds"] = round(time.time() - start, 1)
    write_outputs(args.out, result, lambda out: draw_mt_figures(out, weight, groups, tgt_dict.nspecial))
    return result


def _generate_ids(path: Path) -> List[int]:
    """The sentence ids of a fairseq-generate output (its H lines), in file order."""
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            ids.append(int(line[2:].split("\t", 1)[0]))
    return sorted(set(ids))


def check_sentence_count(args, result: Dict, task, src: str, tgt: str, generate_output: Path) -> None:
    """Warn, with the count, when the generate output scored fewer sentences than the split
    holds (fairseq-generate leaves out sentences beyond --max-source-positions, for example):
    BLEU is then over a part of the test set. Recorded in ``result["bleu"]``."""
    from fairseq.data import data_utils

    total = None
    for pair in (f"{src}-{tgt}", f"{tgt}-{src}"):
        prefix = Path(args.data) / f"{args.subset}.{pair}.{tgt}"
        if _split_exists(prefix):
            dataset = data_utils.load_indexed_dataset(str(prefix), task.target_dictionary)
            if dataset is not None:
                total = len(dataset)
                break
    if total is None:
        return
    scored = result["bleu"]["sentences"]
    result["bleu"]["sentences_in_split"] = total
    if scored < total:
        missing = sorted(set(range(total)) - set(_generate_ids(generate_output)))
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        message = (f"{generate_output} scores {scored} of the {total} sentences of '{args.subset}' "
                   f"({total - scored} left out: ids {shown}); BLEU is over those {scored} only")
        result["bleu"]["warning"] = message
        print(f"[eval] warning: {message}", file=sys.stderr, flush=True)


def draw_mt_figures(out: Path, weight, groups, nspecial: int) -> Dict[str, str]:
    from fairseq_agg import figures

    drawn = {"svd_projection": figures.svd_projection(out / "svd_projection.png", weight, groups),
             "singular_values": figures.singular_values(out / "singular_values.png",
                                                        {"": metrics.singular_spectrum(weight[nspecial:])["normalized"]})}
    return {k: os.path.basename(v) for k, v in drawn.items()}
