"""fairseq-agg-eval: the AGG paper's evaluations from a checkpoint, as JSON, Markdown and PNG.

    fairseq-agg-eval lm  DATA_BIN --path CHECKPOINT --out DIR   # Tables 3-6, 10, 13, 15; geometry
    fairseq-agg-eval mt  DATA_BIN --path CHECKPOINT --out DIR   # Table 7 (BLEU), Table 14
    fairseq-agg-eval compare RUN.json ... --out DIR             # runs side by side, as the paper's tables

(also ``python -m fairseq_agg.eval``). The metrics themselves live in
:mod:`fairseq_agg.metrics`; this module loads checkpoints and data with fairseq, runs the
model, and writes the reports. Definitions: DESIGN section 4 and ``fairseq-agg-eval lm -h``.
"""

import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings
from collections import OrderedDict, deque
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fairseq_agg import metrics

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
WORDSIM_NAMES = ("MEN", "WS353", "RG65", "RW")
WORDSIM_FILES = {"MEN": "EN-MEN-TR-3k.txt", "WS353": "EN-WS-353-ALL.txt", "RG65": "EN-RG-65.txt",
                 "RW": "EN-RW-STANFORD.txt"}

logger = logging.getLogger("fairseq_agg.eval")


class EvalError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"fairseq-agg-eval: {message}")


def _progress(iterable, desc: str, total: Optional[int] = None, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def token_counts(dataset, vocab_size: int, desc: str, show_progress: bool) -> np.ndarray:
    """How often each token occurs in a binarized split (eos included, as stored)."""
    buffer = getattr(dataset, "_bin_buffer", None)
    index = getattr(dataset, "_index", None)
    if buffer is not None and index is not None:
        # fairseq's mmap format stores the split as one array of ids: count it in one pass
        return np.bincount(np.frombuffer(buffer, dtype=index.dtype), minlength=vocab_size)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in _progress(range(len(dataset)), desc, enabled=show_progress):
        counts += np.bincount(dataset[i].numpy(), minlength=vocab_size)
    return counts


# -- checkpoints ---------------------------------------------------------------------------------

def checkpoint_config(path: Path) -> Dict:
    from fairseq import checkpoint_utils

    if not path.is_file():
        raise EvalError(f"checkpoint {path} does not exist")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    cfg = state.get("cfg")
    if cfg is None:
        raise EvalError(f"{path} holds no fairseq configuration (not a fairseq >= 0.10 checkpoint)")
    return state


def training_setup(state: Dict) -> Dict:
    """The criterion a checkpoint was trained with and its AGG / unlikelihood settings."""
    criterion = state["cfg"].get("criterion") or {}
    keys = ("agg_alpha", "agg_no_g1", "agg_no_g2", "agg_static_after", "agg_study", "unlikelihood_alpha",
            "label_smoothing")
    setup = {"criterion": criterion.get("_name")}
    setup.update((k, criterion[k]) for k in keys if k in criterion)
    return setup


def output_embedding(model) -> torch.Tensor:
    """The output embedding rows (tied or not) of a fairseq LM or translation model."""
    from fairseq_agg.criterions.agg_cross_entropy import output_projection_weight

    return output_projection_weight(model).detach().float().cpu()


def _task_name(state) -> str:
    return state["cfg"]["task"]["_name"]


def _check_vocabulary(model, dictionary, what: str) -> None:
    rows = output_embedding(model).size(0)
    if rows != len(dictionary):
        raise EvalError(f"the checkpoint's output embedding has {rows} rows but {what} has "
                        f"{len(dictionary)} entries: the checkpoint was trained on another vocabulary")


def load_dictionary_counts(dictionary) -> np.ndarray:
    """Training counts of every dictionary entry (fairseq's dictionary holds those of dict.txt)."""
    counts = np.asarray(dictionary.count, dtype=np.float64)
    counts[: dictionary.nspecial] = 0.0
    return counts


def dictionary_groups(dictionary, counts: np.ndarray):
    """The frequency groups of a fairseq dictionary, without its specials and without the
    padding symbols fairseq-preprocess adds (``madeupword0000``, ...): (groups, filler ids)."""
    fillers = metrics.filler_symbols(dictionary.symbols, counts)
    return metrics.frequency_groups(counts, dictionary.nspecial, exclude=fillers), fillers


def word_rows(dictionary, fillers) -> np.ndarray:
    """Rows that stand for tokens: neither specials nor padding symbols (neighbour candidates)."""
    return np.setdiff1d(np.arange(dictionary.nspecial, len(dictionary)), fillers)


# -- language models -----------------------------------------------------------------------------

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


def _token_label(dictionary, token: int, group_of: np.ndarray) -> str:
    tag = {0: "", 1: "", 2: " [rare]"}.get(int(group_of[token]), "")
    return dictionary[token] + tag


def choose_queries(args, dictionary, groups, count: int = 3) -> List[int]:
    if args.neighbours:
        ids = []
        for word in args.neighbours:
            index = dictionary.index(word)
            if index == dictionary.unk():
                raise EvalError(f"--neighbours: {word!r} is not in the dictionary")
            ids.append(index)
        return ids
    rare = groups["rare"]
    # rare tokens at evenly spaced places of the group (sorted by id, i.e. first seen)
    return [int(rare[i]) for i in np.linspace(0, len(rare) - 1, count).round().astype(int)] if len(rare) else []


def neighbours_table(weight, dictionary, queries, group_of, k: int, candidates=None,
                     label=None) -> List[Dict]:
    label = label or (lambda t: _token_label(dictionary, t, group_of))
    rows = []
    for query, found in zip(queries, metrics.nearest_neighbours(weight, queries, k=k, candidates=candidates)):
        rows.append({"query": dictionary[query], "neighbours": [label(t) for t, _ in found],
                     "cosines": [round(c, 4) for _, c in found]})
    return rows


def post_hoc_embeddings(args, weight: torch.Tensor, nspecial: int) -> Dict[str, Tuple[str, torch.Tensor]]:
    """The output embedding after each requested post-hoc remedy (regular rows changed,
    special rows kept): name -> (label, matrix)."""
    from fairseq_agg import remedies

    out = OrderedDict()
    for method in args.post_hoc or []:
        regular = weight[nspecial:]
        if method == "mean_removal":
            label, changed = "mean removal", remedies.remove_mean(regular)
        else:
            directions = args.abtt_directions or max(1, round(weight.size(1) / 100))
            label, changed = f"all-but-the-top (D={directions})", remedies.all_but_the_top(regular, directions)
        out[method] = (label, torch.cat([weight[:nspecial].double(), torch.as_tensor(changed).double()]))
    return out


def embedding_metrics_after_post_hoc(args, weight, groups, counts, nspecial, representer=None, wordsim=None) -> Dict:
    """I(W), geometry and word similarity recomputed on each post-hoc-modified embedding (the
    model's predictions are not changed: perplexity and Uniq stay those of the model)."""
    out = OrderedDict()
    for method, (label, changed) in post_hoc_embeddings(args, weight, nspecial).items():
        entry = {"label": label, "isotropy": metrics.isotropy_by_group(changed, groups, signs=args.isotropy_signs),
                 "isoscore": metrics.isoscore_by_group(changed, groups),
                 "geometry": metrics.embedding_geometry(changed, counts, nspecial)}
        if representer is not None:
            entry["word_similarity"] = OrderedDict(
                (name, metrics.word_similarity(pairs, changed, representer)) for name, pairs in wordsim.items())
        out[method] = entry
    return out


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


# -- training curves (Figures 2 and 4) -------------------------------------------------------------

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


# -- translation ---------------------------------------------------------------------------------

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


# -- outputs -------------------------------------------------------------------------------------

def write_outputs(out: Path, result: Dict, draw) -> None:
    out.mkdir(parents=True, exist_ok=True)
    from fairseq_agg import figures  # noqa: F401 - fail before writing anything if matplotlib is missing

    result["figures"] = draw(out)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n", encoding="utf-8")
    from fairseq_agg.report import run_report

    (out / "report.md").write_text(run_report(result), encoding="utf-8")
    print(f"[eval] wrote {out / 'results.json'}, {out / 'report.md'} and {len(result['figures'])} figures",
          file=sys.stderr, flush=True)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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


def isotropy_series(curves: Dict) -> List[Dict]:
    """I(W) over training for Figure 2: from the checkpoints (total and per group) when they
    give a curve, else from the values logged at each validation (total only)."""
    from_checkpoints = curves.get("isotropy") or []
    from_log = curves.get("isotropy_validation") or []
    return from_checkpoints if len(from_checkpoints) >= 2 or len(from_log) < 2 else from_log


def draw_mt_figures(out: Path, weight, groups, nspecial: int) -> Dict[str, str]:
    from fairseq_agg import figures

    drawn = {"svd_projection": figures.svd_projection(out / "svd_projection.png", weight, groups),
             "singular_values": figures.singular_values(out / "singular_values.png",
                                                        {"": metrics.singular_spectrum(weight[nspecial:])["normalized"]})}
    return {k: os.path.basename(v) for k, v in drawn.items()}


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
            raise EvalError(f"--names gives {len(args.names)} names for {len(loaded)} runs")
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


# -- input checks --------------------------------------------------------------------------------
# Everything the command line names is checked before a model is loaded or a split scored, so
# that a typo costs seconds rather than a run. Each problem is one line (EvalError: no
# traceback, exit status 1) that names the input and what to do about it.

KIND_WORDS = {"lm": "language-model", "mt": "translation"}
REQUIRED_MODULES = {"lm": ("matplotlib", "scipy"), "mt": ("matplotlib", "sacrebleu", "sacremoses"),
                    "compare": ("matplotlib",)}
BPE_MODULES = {"gpt2": "regex", "sentencepiece": "sentencepiece", "subword_nmt": "subword_nmt"}
PIP_NAMES = {"subword_nmt": "subword-nmt"}


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _check_readable_file(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise EvalError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise EvalError(f"{what} {path} is a folder, not a file; {fix}")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise EvalError(f"cannot read {what} {path} ({err.strerror}); fix its permissions") from None


def read_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 text file (a UTF-8 byte-order mark is allowed), or one clear error naming the
    file, and for text in another encoding the line and byte where decoding fails."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EvalError(f"cannot read {what} ({err.strerror})") from None
    if data.startswith(b"\x1f\x8b"):
        raise EvalError(f"{what} is gzip-compressed; gunzip it first")
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    if b"\x00" in data:
        offset = data.index(b"\x00")
        line = data[:offset].count(b"\n") + 1
        raise EvalError(f"{what} is a binary file (NUL byte at line {line}, byte offset {offset}), not text; {fix}")
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = data[:offset].count(b"\n") + 1
        raise EvalError(f"{what} is not UTF-8: byte 0x{data[offset]:02x} at line {line} (byte offset {offset}) "
                        f"does not decode; {fix} (e.g. iconv -f latin1 -t utf-8)") from None


def check_output_folder(out: Path, option: str = "--out") -> None:
    """``out`` is a writable folder, or one that can be created (nothing is created here)."""
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise EvalError(f"{option} {out} is not writable; fix its permissions or choose another folder")
        return
    if out.exists() or out.is_symlink():
        kind = "an existing file" if out.exists() else "a broken symbolic link"
        raise EvalError(f"{option} {out} is {kind}, not a folder; choose a folder (it is created if missing)")
    ancestor = out.parent
    while not ancestor.is_dir():  # Path("x").parent is Path("."), and the root is its own parent
        if ancestor.exists() or ancestor.is_symlink():
            raise EvalError(f"{option} {out} cannot be created: {ancestor} is a file, not a folder; "
                            f"choose another {option}")
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EvalError(f"{option} {out} cannot be created: {ancestor} is not writable; "
                        f"choose another {option} or fix its permissions")


def peek_checkpoint(path: Path) -> Dict:
    """A checkpoint's task name and task settings, read without loading it into memory (its
    tensors are memory-mapped, not read), after checking the file: {"task": name or None,
    "task_cfg": mapping}."""
    if not path.exists():
        raise EvalError(f"checkpoint {path} does not exist; give the .pt file fairseq-train saved "
                        "(e.g. SAVE_DIR/checkpoint_best.pt)")
    if path.is_dir():
        raise EvalError(f"--path {path} is a folder; give a checkpoint file in it (e.g. {path / 'checkpoint_best.pt'})")
    _check_readable_file(path, "checkpoint", "give the .pt file fairseq-train saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=False)  # torch's legacy format
        except Exception as err:  # noqa: BLE001 - torch and pickle raise many kinds here
            raise EvalError(f"cannot read checkpoint {path} ({type(err).__name__}: {_one_line(err)[:200]}): not a "
                            "PyTorch checkpoint, or a truncated copy; give the .pt file fairseq-train saved") from None
    if not isinstance(state, Mapping) or "model" not in state:
        raise EvalError(f"{path} is not a fairseq checkpoint (no model state); give the .pt file fairseq-train saved")
    cfg, legacy = state.get("cfg"), state.get("args")
    if cfg is not None and cfg.get("task") is not None:
        task_cfg = cfg["task"]
        return {"task": task_cfg.get("_name"), "task_cfg": task_cfg}
    if legacy is not None:  # fairseq < 0.10: an argparse namespace
        return {"task": getattr(legacy, "task", None), "task_cfg": vars(legacy)}
    raise EvalError(f"{path} holds no fairseq configuration (not a fairseq >= 0.10 checkpoint)")


def checkpoint_kind(task: Optional[str]) -> Optional[str]:
    """"lm" or "mt" from a fairseq task name (None for other tasks)."""
    if task and task.startswith("language_modeling"):
        return "lm"
    if task and task.startswith("translation"):
        return "mt"
    return None


def _split_exists(prefix: Path) -> bool:
    binarized = Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()
    return binarized or prefix.is_file()  # or fairseq's raw-text format


def _dictionary_words(path: Path) -> set:
    """The entries of a fairseq dict.txt as fairseq's Dictionary reads them, plus its specials."""
    words = {"<s>", "<pad>", "</s>"}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        word, _, flag = line.rstrip().rpartition(" ")
        if flag == "#fairseq:overwrite":
            word = word.rpartition(" ")[0]
        words.add(word)
    return words


def _check_modules(names: Sequence[str], why: str) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise EvalError(f"the Python package {name} is missing ({why}); pip install {PIP_NAMES.get(name, name)}")


def _check_data(args, task_cfg: Mapping) -> Optional[Path]:
    """The data folder holds the dictionaries and the split the subcommand reads; returns the
    dictionary that --neighbours' tokens come from (None when the languages are not known)."""
    data = args.data
    preprocess = "give the folder fairseq-preprocess wrote (its --destdir) for the checkpoint's data"
    if not data.is_dir():
        raise EvalError(f"data folder {data} does not exist; {preprocess}")
    if args.command == "lm":
        dicts, splits = [data / "dict.txt"], [data / args.subset]
    else:
        src, tgt = task_cfg.get("source_lang"), task_cfg.get("target_lang")
        if not src or not tgt:
            return None  # fairseq infers the languages from the folder's file names
        dicts = [data / f"dict.{src}.txt", data / f"dict.{tgt}.txt"]
        splits = [] if args.generate_output else [data / f"{args.subset}.{src}-{tgt}.{src}",
                                                   data / f"{args.subset}.{tgt}-{src}.{src}"]
    for path in dicts:
        if not path.is_file():
            raise EvalError(f"data folder {data} has no {path.name}; {preprocess}")
    if splits and not any(_split_exists(prefix) for prefix in splits):
        raise EvalError(f"data folder {data} has no '{args.subset}' split ({splits[0].name}.bin and .idx); "
                        "choose another --subset or binarize that split with fairseq-preprocess")
    return dicts[0]


def _check_bpe(args) -> None:
    resolve_bpe(args)
    needed = {"gpt2": (("--gpt2-encoder-json", args.gpt2_encoder_json), ("--gpt2-vocab-bpe", args.gpt2_vocab_bpe)),
              "sentencepiece": (("--sentencepiece-model", args.sentencepiece_model),),
              "subword_nmt": (("--bpe-codes", args.bpe_codes),)}.get(args.bpe, ())
    for option, value in needed:
        if value is None:
            raise EvalError(f"--bpe {args.bpe} needs {option} FILE")
        _check_readable_file(Path(value), option, "give the file, or --bpe none for a word-level dictionary")
    if args.bpe in BPE_MODULES:
        _check_modules([BPE_MODULES[args.bpe]], f"--bpe {args.bpe}")


def check_inputs(args) -> None:
    """Every input of ``lm`` and ``mt``, in the order of their cost: options, files named on
    the command line, the output folder, the checkpoint's kind, the data folder. Word-similarity
    files are read and kept (``args.wordsim_loaded``)."""
    if args.abtt_directions is not None and args.abtt_directions <= 0:
        raise EvalError("--abtt-directions must be positive")
    for option in ("max_tokens", "k"):
        if getattr(args, option) <= 0:
            raise EvalError(f"--{option.replace('_', '-')} must be positive")
    if args.command == "lm":
        if args.prefix_len <= 0 or args.gen_len <= 0 or args.num_texts < 0 or args.batch_size <= 0:
            raise EvalError("--prefix-len, --gen-len and --batch-size must be positive, --num-texts non-negative")
        if args.tokens_per_sample is not None and args.tokens_per_sample <= 0:
            raise EvalError("--tokens-per-sample must be positive")
        if args.context_window is not None and args.context_window < 0:
            raise EvalError("--context-window must not be negative")
        if args.max_hidden_states <= 0:
            raise EvalError("--max-hidden-states must be positive")
    _check_modules(REQUIRED_MODULES[args.command], f"fairseq-agg-eval {args.command}")
    if not args.data.is_dir():
        raise EvalError(f"data folder {args.data} does not exist; give the folder fairseq-preprocess wrote "
                        "(its --destdir) for the checkpoint's data")
    header = peek_checkpoint(args.path)
    kind = checkpoint_kind(header["task"])
    if kind is not None and kind != args.command:
        raise EvalError(f"{args.path} is a {KIND_WORDS[kind]} checkpoint (task {header['task']}); "
                        f"score it with `fairseq-agg-eval {kind}`")
    check_output_folder(args.out)
    if args.command == "lm":
        if args.train_log is not None:
            _check_readable_file(args.train_log, "--train-log", "give fairseq-train's log, or leave --train-log out")
        _check_bpe(args)
        args.wordsim_loaded = load_wordsim(args)
    else:
        if args.generate_output is not None:
            _check_readable_file(args.generate_output, "--generate-output",
                                 "give a file fairseq-generate wrote, or leave the option out to run it")
            read_text(args.generate_output, f"--generate-output {args.generate_output}",
                      "give a file fairseq-generate wrote")
        if args.reference is not None:
            _check_readable_file(args.reference, "--reference", "give the raw reference text of the split")
            read_text(args.reference, f"--reference {args.reference}", "give the raw reference text of the split")
    dictionary = _check_data(args, header["task_cfg"])
    if args.neighbours and dictionary is not None:
        words = _dictionary_words(dictionary)
        for word in args.neighbours:
            if word not in words:
                raise EvalError(f"--neighbours: {word!r} is not in the dictionary {dictionary}; "
                                "give tokens as they appear there")


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


# -- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fairseq-agg-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q):
        q.add_argument("data", type=Path, help="fairseq data-bin folder the checkpoint was trained on")
        q.add_argument("--path", type=Path, required=True, help="checkpoint to evaluate")
        q.add_argument("--out", type=Path, required=True, help="folder for results.json, report.md and figures")
        q.add_argument("--name", default=None, help="run name in reports (default: the checkpoint's folder name)")
        q.add_argument("--subset", default="test", help="split to evaluate (default: %(default)s)")
        q.add_argument("--max-tokens", type=int, default=4096, help="tokens per scoring batch (default: %(default)s)")
        q.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
        q.add_argument("--fp16", action="store_true", help="run the model in float16 (GPU)")
        q.add_argument("--k", type=int, default=5, help="nearest neighbours per query (default: %(default)s)")
        q.add_argument("--neighbours", nargs="+", default=None, metavar="TOKEN",
                       help="tokens whose nearest neighbours to list (default: three rare-group tokens)")
        q.add_argument("--post-hoc", nargs="+", default=None, choices=["mean_removal", "abtt"],
                       help="also report I(W), geometry (and word similarity) after these post-hoc remedies "
                       "of the output embedding: mean removal, all-but-the-top (Mu and Viswanath 2018)")
        q.add_argument("--isotropy-signs", default="both", choices=["both", "as_returned"],
                       help="I(W)'s directions: both signs of every eigenvector of W^T W, independent of the "
                       "signs LAPACK returns (default), or as_returned, the older variant over the eigenvectors "
                       "with the signs torch.linalg.eigh returned (it changes when a sign flips)")
        q.add_argument("--abtt-directions", type=int, default=None,
                       help="principal directions all-but-the-top removes (default: d / 100, at least 1)")
        q.add_argument("--no-progress-bar", action="store_true")

    lm = sub.add_parser("lm", help="language model: PPL/Uniq per frequency group, I(W), word similarity, "
                        "neighbours, greedy generation, rep/wrep, geometry, figures")
    common(lm)
    lm.add_argument("--tokens-per-sample", type=int, default=None,
                    help="scoring block length (default: the checkpoint's training value)")
    lm.add_argument("--context-window", type=int, default=None,
                    help="tokens of context before each scored block, as fairseq-eval-lm "
                    "(default: half of --tokens-per-sample)")
    lm.add_argument("--sample-break-mode", default="none", choices=["none", "complete", "complete_doc", "eos"],
                    help="as fairseq-eval-lm (default: %(default)s)")
    lm.add_argument("--wordsim", nargs="+", default=None, metavar="NAME=FILE",
                    help="word-similarity files (default: MEN, WS353, RG65, RW from data/wordsim, the "
                    "excerpts shipped in data/wordsim/excerpts unless scripts/download-wordsim.sh fetched them)")
    lm.add_argument("--bpe", default="auto", choices=["auto", "none", "gpt2", "sentencepiece", "subword_nmt"],
                    help="how words map to dictionary pieces for word similarity; auto: the BPE files that "
                    "scripts/prepare-*.sh left in DATA/bpe, else none (default: %(default)s)")
    lm.add_argument("--gpt2-encoder-json", default=None,
                    help="(default: DATA/bpe/encoder.json, else the copy shipped in data/gpt2_bpe)")
    lm.add_argument("--gpt2-vocab-bpe", default=None,
                    help="(default: DATA/bpe/vocab.bpe, else the copy shipped in data/gpt2_bpe)")
    lm.add_argument("--sentencepiece-model", default=None, help="(default: DATA/bpe/spm.model)")
    lm.add_argument("--bpe-codes", default=None, help="subword-nmt codes, for --bpe subword_nmt")
    lm.add_argument("--num-texts", type=int, default=100,
                    help="greedy continuations to generate; 0 skips generation (default: %(default)s)")
    lm.add_argument("--prefix-len", type=int, default=50, help="(default: %(default)s)")
    lm.add_argument("--gen-len", type=int, default=100, help="(default: %(default)s)")
    lm.add_argument("--batch-size", type=int, default=32, help="continuations generated at once (default: %(default)s)")
    lm.add_argument("--examples", type=int, default=3, help="continuations quoted in the report (default: %(default)s)")
    lm.add_argument("--max-hidden-states", type=int, default=5000,
                    help="hidden states sampled for their mean cosine (default: %(default)s)")
    lm.add_argument("--train-log", type=Path, default=None,
                    help="fairseq-train log for the rare-group curve (default: train.log next to the checkpoint)")
    lm.add_argument("--no-training-curves", action="store_true",
                    help="skip I(W) over the other checkpoints of the checkpoint's folder")

    mt = sub.add_parser("mt", help="translation: tokenized (compound-split) BLEU and sacreBLEU, "
                        "cross-lingual neighbours, I(W), geometry, figures")
    common(mt)
    mt.add_argument("--generate-output", type=Path, default=None,
                    help="an existing fairseq-generate output to score (default: run fairseq-generate)")
    mt.add_argument("--reference", type=Path, default=None,
                    help="raw (untokenized) reference file for sacreBLEU, e.g. newstest2014.de")
    mt.add_argument("--beam", type=int, default=4, help="(default: %(default)s)")
    mt.add_argument("--lenpen", type=float, default=0.6, help="(default: %(default)s)")

    cmp_ = sub.add_parser("compare", help="several runs' results.json side by side as the paper's tables")
    cmp_.add_argument("results", nargs="+", help="results.json files (or folders holding one)")
    cmp_.add_argument("--out", type=Path, required=True)
    cmp_.add_argument("--names", nargs="+", default=None,
                      help="row names, one per run (default: each run's name); runs given the same name are runs of "
                      "one method (seeds): their row shows mean ± sample std (ddof=1), compare.json each run's values")
    cmp_.add_argument("--tables", nargs="+", default=None,
                      help="tables to write (default: all that the runs support); see fairseq_agg/report.py")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # fairseq 0.12 on current hydra/torch: deprecation notices that say nothing about the run
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(hydra|torch\.utils\.data)")
    warnings.filterwarnings("ignore", message=".*(schema_matching|strict flag|pin_memory).*")
    if args.command == "compare":
        compare(args)
        return 0
    if args.name is None:
        args.name = args.path.resolve().parent.name
    check_inputs(args)  # all of them, before anything that takes time
    if args.command == "lm":
        result = evaluate_lm(args)
    else:
        result = evaluate_mt(args)
    from fairseq_agg.report import summary_line

    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
