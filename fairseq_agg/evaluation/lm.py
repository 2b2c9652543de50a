"""``fairseq-agg-eval lm``: scoring a language model's test split as ``fairseq-eval-lm`` does, word similarity, continuations, training curves (paper Tables 3-6, 10, 13, 15; Figures 1-4)."""

import argparse
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from fairseq_agg import metrics
from fairseq_agg.evaluation.common import (
    EvalError, PACKAGE_DIR, REPO_DIR, WORDSIM_FILES, WORDSIM_NAMES, _check_vocabulary, _one_line,
    _progress, _task_name, checkpoint_config, choose_queries, dictionary_groups,
    embedding_metrics_after_post_hoc, isotropy_series, load_dictionary_counts, neighbours_table,
    output_embedding, read_text, training_setup, word_rows, write_outputs,
)


def setup_lm(args):
    """Model, task and scoring iterator exactly as fairseq-eval-lm builds them for the same
    checkpoint, data, ``--tokens-per-sample`` and ``--context-window``."""
    from fairseq import checkpoint_utils, options, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    state = checkpoint_config(args.path)
    task_cfg = state["cfg"]["task"]
    tokens_per_sample = args.tokens_per_sample or int(task_cfg.get("tokens_per_sample", 512))
    context_window = tokens_per_sample // 2 if args.context_window is None else args.context_window
    if not 0 <= context_window < tokens_per_sample:
        raise EvalError(f"--context-window {context_window} must lie in [0, --tokens-per-sample {tokens_per_sample})")
    argv = [str(args.data), "--path", str(args.path), "--user-dir", str(PACKAGE_DIR),
            "--task", _task_name(state), "--gen-subset", args.subset,
            "--tokens-per-sample", str(tokens_per_sample), "--context-window", str(context_window),
            "--sample-break-mode", args.sample_break_mode, "--max-tokens", str(args.max_tokens),
            "--num-workers", "0"]
    if args.cpu:
        argv.append("--cpu")
    parser = options.get_eval_lm_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    utils.import_user_module(cfg.common)
    if cfg.eval_lm.context_window > 0:
        cfg.task.tokens_per_sample -= cfg.eval_lm.context_window  # as fairseq-eval-lm does
    from fairseq import tasks

    task = tasks.setup_task(cfg.task)
    try:
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(args.path)], task=task)
    except (RuntimeError, ValueError) as err:
        if "size mismatch" in str(err) or "another dictionary" in str(err):
            raise EvalError(f"{args.path} does not fit the dictionary of {args.data}: "
                            "the checkpoint was trained on another vocabulary") from err
        raise
    model = models[0]
    _check_vocabulary(model, task.target_dictionary, f"{args.data}/dict.txt")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.fp16:
        model.half()
    model.to(device).eval()
    try:
        task.load_dataset(args.subset)
    except FileNotFoundError as err:
        raise EvalError(f"{args.data} has no '{args.subset}' split: {err}") from err
    dataset = task.dataset(args.subset)
    itr = task.eval_lm_dataloader(
        dataset=dataset, max_tokens=args.max_tokens, batch_size=None,
        max_positions=utils.resolve_max_positions(model.max_positions()),
        num_workers=0, context_window=context_window)
    scoring = {"tokens_per_sample": tokens_per_sample, "context_window": context_window, "subset": args.subset,
               "sample_break_mode": args.sample_break_mode}
    return model, task, itr, device, scoring, training_setup(state)


@torch.no_grad()
def score_lm(model, task, itr, device, max_hidden: int, show_progress: bool) -> Dict[str, np.ndarray]:
    """Per scored position of the split, in corpus order: target, NLL (nats), argmax
    prediction; plus up to ``max_hidden`` last-layer hidden states, evenly spread."""
    pad = task.target_dictionary.pad()
    per_sample: Dict[int, Tuple[np.ndarray, ...]] = {}
    hidden_chunks: List[torch.Tensor] = []
    per_batch = max(1, math.ceil(max_hidden / max(1, len(itr))))
    for sample in _progress(itr, "scoring", total=len(itr), enabled=show_progress):
        if "net_input" not in sample:
            continue
        src = sample["net_input"]["src_tokens"].to(device)
        target = sample["target"].to(device)
        features, _ = model.decoder.extract_features(src, encoder_out=None)
        logits = model.decoder.output_layer(features)
        lprobs = torch.log_softmax(logits.float(), dim=-1)
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        argmax = lprobs.argmax(-1)
        scored = target.ne(pad)
        states = features[scored]
        keep = torch.linspace(0, states.size(0) - 1, min(states.size(0), per_batch)).long() if states.size(0) else []
        hidden_chunks.append(states[keep].float().cpu())
        for row, sample_id in enumerate(sample["id"].tolist()):
            mask = scored[row]
            per_sample[sample_id] = (target[row][mask].cpu().numpy(), nll[row][mask].double().cpu().numpy(),
                                     argmax[row][mask].cpu().numpy())
    if not per_sample:
        raise EvalError("the split holds no scorable tokens")
    order = sorted(per_sample)
    out = {key: np.concatenate([per_sample[i][k] for i in order]) for k, key in enumerate(("targets", "nll", "argmax"))}
    hidden = torch.cat(hidden_chunks)
    if hidden.size(0) > max_hidden:
        hidden = hidden[torch.linspace(0, hidden.size(0) - 1, max_hidden).long()]
    out["hidden"] = hidden.numpy()
    return out


def _check_generation_span(model, prefix_len: int, gen_len: int) -> None:
    from fairseq.modules import LearnedPositionalEmbedding

    span = prefix_len + gen_len
    # Sinusoidal positions extend to any length; learned ones end where training ended.
    positions = getattr(model.decoder, "embed_positions", None)
    if isinstance(positions, LearnedPositionalEmbedding) and span > positions.max_positions:
        raise EvalError(f"--prefix-len {prefix_len} + --gen-len {gen_len} = {span} tokens exceed the model's "
                        f"{positions.max_positions} learned positions; shorten them (or --num-texts 0 to skip "
                        "generation)")


@torch.no_grad()
def greedy_continuations(model, stream: np.ndarray, dictionary, device, prefix_len: int, gen_len: int,
                         num_texts: int, batch_size: int, show_progress: bool) -> Tuple[List[List[int]], List[List[int]], List[List[int]]]:
    """Greedy continuations of ``gen_len`` tokens after ``prefix_len``-token prefixes taken at
    evenly spaced, non-overlapping places of the split; also the human continuations."""
    span = prefix_len + gen_len
    _check_generation_span(model, prefix_len, gen_len)
    available = len(stream) // span
    if available == 0:
        raise EvalError(f"the split has {len(stream)} tokens, fewer than one prefix + continuation ({span})")
    count = min(num_texts, available)
    starts = (np.linspace(0, available - 1, count).round().astype(np.int64)) * span
    prefixes = [stream[s:s + prefix_len].tolist() for s in starts]
    human = [stream[s + prefix_len:s + span].tolist() for s in starts]
    generated: List[List[int]] = []
    banned = [dictionary.pad(), dictionary.bos()]
    batches = range(0, count, batch_size)
    for b in _progress(batches, "generating", total=len(batches), enabled=show_progress):
        tokens = torch.tensor(prefixes[b:b + batch_size], dtype=torch.long, device=device)
        state: Dict = {}
        step_logits = None
        for t in range(prefix_len):  # fairseq's incremental decoding takes one token per call
            step_logits, _ = model.decoder(tokens[:, : t + 1], incremental_state=state)
        for _ in range(gen_len):
            logits = step_logits[:, -1, :].float()
            logits[:, banned] = -math.inf
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            step_logits, _ = model.decoder(tokens, incremental_state=state)
        generated.extend(tokens[:, prefix_len:].cpu().tolist())
    return prefixes, generated, human


def resolve_bpe(args) -> None:
    """``--bpe auto``: the BPE that scripts/prepare-*.sh left in DATA/bpe (GPT-2's files or a
    sentencepiece model), else none (a word-level dictionary). GPT-2's files default to those
    of DATA/bpe, else to the copies shipped in data/gpt2_bpe."""
    bpe_dir = Path(args.data) / "bpe"
    if args.bpe == "auto":
        if (bpe_dir / "encoder.json").is_file():
            args.bpe = "gpt2"
        elif (bpe_dir / "spm.model").is_file():
            args.bpe = "sentencepiece"
        else:
            args.bpe = "none"
    if args.bpe == "gpt2":
        for option, name in (("gpt2_encoder_json", "encoder.json"), ("gpt2_vocab_bpe", "vocab.bpe")):
            if getattr(args, option) is None:
                local = bpe_dir / name
                setattr(args, option, str(local if local.is_file() else REPO_DIR / "data" / "gpt2_bpe" / name))
    elif args.bpe == "sentencepiece" and args.sentencepiece_model is None:
        args.sentencepiece_model = str(bpe_dir / "spm.model")


def _representer(args, dictionary):
    """word -> dictionary ids of its subwords (None if any piece is unknown)."""
    encode = None
    resolve_bpe(args)
    if args.bpe != "none":
        from fairseq.data import encoders

        bpe_args = argparse.Namespace(bpe=args.bpe, gpt2_encoder_json=args.gpt2_encoder_json,
                                      gpt2_vocab_bpe=args.gpt2_vocab_bpe, sentencepiece_model=args.sentencepiece_model,
                                      bpe_codes=args.bpe_codes, bpe_separator="@@")
        try:
            bpe = encoders.build_bpe(bpe_args)
        except Exception as err:  # noqa: BLE001 - fairseq raises many kinds here
            raise EvalError(f"--bpe {args.bpe}: cannot build the encoder ({err})") from err
        # GPT-2 pieces carry their leading space: a word inside a sentence
        encode = (lambda w: bpe.encode(" " + w)) if args.bpe == "gpt2" else bpe.encode

    def token_ids(word: str) -> Optional[List[int]]:
        pieces = encode(word).split() if encode else [word]
        ids = [dictionary.index(p) for p in pieces]
        return None if not ids or dictionary.unk() in ids else ids

    return token_ids


def _wordsim_files(args) -> Dict[str, Path]:
    chosen = OrderedDict()
    if args.wordsim:
        for item in args.wordsim:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise EvalError(f"--wordsim {item!r}: expected NAME=FILE (e.g. MEN=data/wordsim/EN-MEN-TR-3k.txt)")
            chosen[name] = Path(path)
    else:
        for name in WORDSIM_NAMES:
            full = REPO_DIR / "data" / "wordsim" / WORDSIM_FILES[name]
            excerpt = REPO_DIR / "data" / "wordsim" / "excerpts" / WORDSIM_FILES[name]
            chosen[name] = full if full.is_file() else excerpt
    for name, path in chosen.items():
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "not found"
            raise EvalError(f"word-similarity file for {name} {what}: {path} (check --wordsim; "
                            "scripts/download-wordsim.sh fetches the four datasets)")
    return chosen


def read_word_similarity(name: str, path: Path) -> List[Tuple[str, str, float]]:
    """The pairs of a word-similarity file, or one clear error: unreadable, binary, not UTF-8
    (file, line and byte named), not 'word1 word2 score' lines, or a score that is not a finite
    number (NaN or infinite scores would make Spearman's rho NaN)."""
    what = f"word-similarity file {path} ({name})"
    text = read_text(path, what, "convert it to UTF-8 text of 'word1 word2 score' lines")
    for number, line in enumerate(text.splitlines(), 1):
        # the fields as metrics.load_word_similarity splits them
        fields = [f for f in re.split(r"[\t ,]+", line.strip()) if f]
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) == 4 and re.fullmatch(r"\d+", fields[0]):
            fields = fields[1:]
        if len(fields) != 3:
            continue
        try:
            score = float(fields[2])
        except ValueError:
            continue
        if not math.isfinite(score):
            raise EvalError(f"{what}, line {number}: the score {fields[2]!r} is not a finite number; "
                            "fix or remove that pair")
    try:
        return metrics.load_word_similarity(path)
    except ValueError as err:
        raise EvalError(f"word-similarity file for {name}: {_one_line(err)}; fix the file or give another") from None


def load_wordsim(args) -> "OrderedDict[str, Tuple[Path, List[Tuple[str, str, float]]]]":
    """name -> (file, pairs) of the word-similarity data sets, each file checked."""
    return OrderedDict((name, (path, read_word_similarity(name, path))) for name, path in _wordsim_files(args).items())


def evaluate_lm(args) -> Dict:
    start = time.time()
    model, task, itr, device, scoring, trained_with = setup_lm(args)
    dictionary = task.target_dictionary
    vocab = len(dictionary)
    counts = load_dictionary_counts(dictionary)
    groups, fillers = dictionary_groups(dictionary, counts)
    group_of = metrics.group_of_tokens(groups, vocab)
    weight = output_embedding(model)
    show = not args.no_progress_bar
    # everything that can fail on the command line's inputs, before the long scoring pass
    wordsim_files = getattr(args, "wordsim_loaded", None) or load_wordsim(args)
    wordsim = OrderedDict((name, pairs) for name, (_, pairs) in wordsim_files.items())
    representer = _representer(args, dictionary)
    queries = choose_queries(args, dictionary, groups)
    if args.num_texts > 0:
        _check_generation_span(model, args.prefix_len, args.gen_len)

    print(f"[eval] scoring '{args.subset}' (tokens per sample {scoring['tokens_per_sample']}, "
          f"context window {scoring['context_window']})", file=sys.stderr, flush=True)
    scored = score_lm(model, task, itr, device, args.max_hidden_states, show)
    result: Dict = {"kind": "lm", "name": args.name, "checkpoint": str(args.path), "data": str(args.data),
                    "scoring": scoring, "trained_with": trained_with, "vocab_size": vocab,
                    "group_sizes": {n: int(len(ids)) for n, ids in groups.items()},
                    "padding_symbols_excluded": int(len(fillers))}
    result["ppl"] = metrics.group_perplexity(scored["nll"], scored["targets"], groups, vocab)
    result["uniq"] = metrics.unique_tokens(scored["argmax"], groups, vocab)
    result["human"] = metrics.unique_tokens(scored["targets"], groups, vocab)
    result["next_token"] = metrics.next_token_repetition(scored["argmax"], scored["targets"])

    print("[eval] isotropy and geometry", file=sys.stderr, flush=True)
    result["isotropy"] = metrics.isotropy_by_group(weight, groups, signs=args.isotropy_signs)
    result["isotropy_signs"] = args.isotropy_signs
    result["isoscore"] = metrics.isoscore_by_group(weight, groups)
    result["geometry"] = metrics.embedding_geometry(weight, counts, dictionary.nspecial)
    result["geometry"]["hidden_mean_cosine"] = metrics.mean_pairwise_cosine(scored["hidden"])
    result["geometry"]["hidden_states_sampled"] = int(scored["hidden"].shape[0])
    spectrum = metrics.singular_spectrum(weight[dictionary.nspecial:])
    result["singular_values"] = spectrum["normalized"]

    result["word_similarity"] = OrderedDict()
    for name, (path, pairs) in wordsim_files.items():
        entry = metrics.word_similarity(pairs, weight, representer)
        entry["file"] = str(path)
        result["word_similarity"][name] = entry
    result["word_similarity_bpe"] = args.bpe
    if wordsim and all(e["covered"] == 0 for e in result["word_similarity"].values()):
        print(f"[eval] warning: no word-similarity pair has both words in the dictionary with --bpe {args.bpe}; "
              "if the dictionary holds subwords, name their BPE with --bpe", file=sys.stderr, flush=True)
    result["post_hoc"] = embedding_metrics_after_post_hoc(args, weight, groups, counts, dictionary.nspecial,
                                                          representer, wordsim)

    result["neighbours"] = neighbours_table(weight, dictionary, queries, group_of, args.k,
                                            candidates=word_rows(dictionary, fillers))

    if args.num_texts > 0:
        prefixes, generated, human = greedy_continuations(
            model, scored["targets"], dictionary, device, args.prefix_len, args.gen_len, args.num_texts,
            args.batch_size, show)
        result["generation"] = {"model": metrics.continuation_metrics(generated),
                                "human": metrics.continuation_metrics(human),
                                "prefix_len": args.prefix_len, "gen_len": args.gen_len}
        result["generation"]["examples"] = [
            {"prefix": dictionary.string(torch.tensor(p)), "continuation": dictionary.string(torch.tensor(g)),
             "uniq": len(set(g))}
            for p, g in list(zip(prefixes, generated))[: args.examples]]

    result["training"] = training_curves(args, groups, trained_with)
    result["seconds"] = round(time.time() - start, 1)
    write_outputs(args.out, result, lambda out: draw_lm_figures(out, weight, groups, result, dictionary.nspecial))
    return result


_INNER_PROGRESS = re.compile(r"epoch \d+:\s+\d+\s*/\s*\d+")


def _log_section(line: str, record: Optional[Mapping]) -> Optional[str]:
    """"train_inner", "valid", "train" or None for one line of a fairseq-train log: the
    console's lines carry the tag (``| train_inner |``, ``| valid |``); a log written by
    fairseq's ``--log-file`` has the bare messages, told apart by their shape (the per-update
    lines ``epoch 001:   10 / 228 ...``, validation lines ``valid on '...' subset``; in json,
    ``valid_``- and ``train_``-prefixed keys for validation and epoch records)."""
    if "train_inner" in line:
        return "train_inner"
    if "| valid |" in line or "valid on '" in line or '"valid_' in line or "INFO:valid:" in line:
        return "valid"
    if "| train |" in line or '"train_' in line:
        return "train"
    if _INNER_PROGRESS.search(line):
        return "train_inner"
    if record is not None and "num_updates" in record:
        return "train_inner"  # an untagged json record without a prefix
    return None


def log_points(path: Path, section: str, key: str) -> List[Tuple[int, float]]:
    """(update, value of ``key``) from fairseq-train's ``train_inner`` or ``valid`` log lines,
    the first value per update. Reads the console's output (what the demo's ``train.log``
    holds; simple, json or tqdm format) and the file fairseq's ``--log-file`` writes."""
    number = r"(-?[\d.]+(?:e-?\d+)?)"
    pattern = re.compile(rf"\b({re.escape(key)}|num_updates)[ =]+{number}")
    points: Dict[int, float] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        record = None
        if "{" in line:
            try:
                record = json.loads(line[line.index("{"):])
            except ValueError:
                record = None
            if not isinstance(record, dict):
                record = None
        if _log_section(line, record) != section:
            continue
        values = None
        if record is not None:
            values = {k: record.get(k, record.get(f"{section}_{k}")) for k in (key, "num_updates")}
        if values is None:
            values = dict(pattern.findall(line))
        if values.get(key) is not None and values.get("num_updates") is not None:
            points.setdefault(int(float(values["num_updates"])), float(values[key]))
    return sorted(points.items())


def parse_train_log(path: Path) -> List[Tuple[int, float]]:
    """(update, AGG rare-group size) from fairseq-train's ``train_inner`` log lines."""
    return log_points(path, "train_inner", "agg_rare")


def isotropy_over_training(checkpoint_dir: Path, groups, show_progress: bool, signs: str = "both") -> List[Dict]:
    """I(W) (total and per group) of every ``checkpoint_<epoch>_<update>.pt`` and of
    ``checkpoint_last.pt`` in a save directory, by update."""
    from fairseq import checkpoint_utils

    found = {}
    for path in sorted(checkpoint_dir.glob("checkpoint*.pt")):
        if re.fullmatch(r"checkpoint(_\d+_\d+|_last|\d+)\.pt", path.name):
            found[path] = None
    points = {}
    for path in _progress(list(found), "checkpoints", enabled=show_progress):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        update = int(state["optimizer_history"][-1]["num_updates"])
        if update in points:
            continue
        model_state = state["model"]
        weight = None
        for key in ("decoder.output_projection.weight", "decoder.embed_tokens.weight"):
            if key in model_state:
                weight = model_state[key].float()
                break
        if weight is None:
            continue
        iso = metrics.isotropy_by_group(weight, groups, signs=signs)
        iso["update"] = update
        points[update] = iso
    return [points[u] for u in sorted(points)]


def training_curves(args, groups, trained_with: Optional[Mapping] = None) -> Dict:
    """Figures 2 and 4 from the training log and the checkpoints next to ``--path``; ``notes``
    says which curve has no points and why (also printed)."""
    curves: Dict = {}
    notes: List[str] = []
    log = args.train_log or args.path.parent / "train.log"
    agg = str((trained_with or {}).get("criterion") or "").startswith("agg_")
    if log.is_file():
        curves["rare_group_size"] = parse_train_log(log)
        # the plug-in's tasks log I(W) at each validation, whichever checkpoints were kept
        curves["isotropy_validation"] = [{"update": u, "total": v} for u, v in log_points(log, "valid", "isotropy")]
        if agg and not curves["rare_group_size"]:
            notes.append(f"{log} has no training line with agg_rare and num_updates: the rare-group curve has no "
                         "points (the log is read in fairseq-train's console format, simple or json, and in the "
                         "format of fairseq's --log-file)")
        if not curves["isotropy_validation"]:
            notes.append(f"{log} has no validation line with isotropy: the logged I(W) curve has no points "
                         "(only the plug-in's tasks log it, at each validation)")
    else:
        notes.append(f"no training log at {log} (--train-log FILE names one): the rare-group curve and the logged "
                     "I(W) curve have no points")
    if not args.no_training_curves:
        curves["isotropy"] = isotropy_over_training(args.path.parent, groups, not args.no_progress_bar,
                                                    getattr(args, "isotropy_signs", "both"))
    if len(curves.get("isotropy") or []) < 2 and len(curves.get("isotropy_validation") or []) < 2:
        notes.append("fewer than two points for I(W) over training (checkpoints or validation lines): "
                     "its figure is left out")
    for note in notes:
        print(f"[eval] note: {note}", file=sys.stderr, flush=True)
    curves["notes"] = notes
    return curves


def draw_lm_figures(out: Path, weight, groups, result: Dict, nspecial: int) -> Dict[str, str]:
    from fairseq_agg import figures

    name = result["name"]
    drawn = {"svd_projection": figures.svd_projection(out / "svd_projection.png", weight, groups, title=name),
             "singular_values": figures.singular_values(out / "singular_values.png", {name: result["singular_values"]})}
    curves = result.get("training", {})
    agg = str((result.get("trained_with") or {}).get("criterion") or "").startswith("agg_")
    if curves.get("rare_group_size") or agg:  # an AGG run without points says so in the figure
        drawn["rare_group_size"] = figures.rare_group_size(out / "rare_group_size.png",
                                                           {name: curves.get("rare_group_size") or []})
    series = isotropy_series(curves)
    if series:
        drawn["isotropy_over_training"] = figures.isotropy_over_training(out / "isotropy_over_training.png",
                                                                          {name: series})
    return {k: os.path.basename(v) for k, v in drawn.items()}
