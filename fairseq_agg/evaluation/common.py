"""What every subcommand of ``fairseq-agg-eval`` shares: checkpoint and dictionary access, frequency groups, the input checks, the embedding metrics after post-hoc remedies, and writing the outputs."""

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fairseq_agg import metrics
from fairseq_agg.checkpoints import checksum_mismatch


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fairseq_agg, the --user-dir


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
    from fairseq_agg.modeling import output_projection_weight

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


def isotropy_series(curves: Dict) -> List[Dict]:
    """I(W) over training for Figure 2: from the checkpoints (total and per group) when they
    give a curve, else from the values logged at each validation (total only)."""
    from_checkpoints = curves.get("isotropy") or []
    from_log = curves.get("isotropy_validation") or []
    return from_checkpoints if len(from_checkpoints) >= 2 or len(from_log) < 2 else from_log


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
    """``out`` is a folder this command can write into, found out by writing: a file is created in
    an existing folder, a missing folder is created (with its missing parents), and what was
    created here is removed again. Permission bits alone would pass a folder the system refuses
    (``/proc/x``; anything for root), and the refusal would come only after the scoring."""
    if out.is_dir():
        try:
            handle, probe = tempfile.mkstemp(dir=out, prefix=".fairseq-agg-eval-check-")
        except OSError as err:
            raise EvalError(f"{option} {out} is not writable (creating a file in it failed: {err.strerror}); "
                            "fix its permissions or choose another folder") from None
        os.close(handle)
        os.unlink(probe)
        return
    if out.exists() or out.is_symlink():
        kind = "an existing file" if out.exists() else "a broken symbolic link"
        raise EvalError(f"{option} {out} is {kind}, not a folder; choose a folder (it is created if missing)")
    missing = [out]
    while not missing[-1].parent.is_dir():  # Path("x").parent is Path("."), and the root is its own parent
        ancestor = missing[-1].parent
        if ancestor.exists() or ancestor.is_symlink():
            raise EvalError(f"{option} {out} cannot be created: {ancestor} is a file, not a folder; "
                            f"choose another {option}")
        missing.append(ancestor)
    created = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                if not folder.is_dir():
                    raise
                continue  # made by someone else meanwhile: not ours to remove
            created.append(folder)
    except OSError as err:
        raise EvalError(f"{option} {out} cannot be created (creating {err.filename or folder} failed: "
                        f"{err.strerror}); choose another {option} or fix its permissions") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else wrote into it meanwhile
                folder.rmdir()


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
    mismatch = checksum_mismatch(path)
    if mismatch:
        raise EvalError(mismatch)
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


def _check_modules(names: Sequence[str], why: str) -> None:
    import importlib.util

    for name in names:
        if importlib.util.find_spec(name) is None:
            raise EvalError(f"the Python package {name} is missing ({why}); pip install {PIP_NAMES.get(name, name)}")
