"""The evaluation metrics of the AGG paper and of the geometry that explains them, as plain
functions of tensors and arrays (torch, numpy, scipy; no fairseq). Definitions follow
DESIGN section 4; :mod:`fairseq_agg.eval` feeds them from fairseq checkpoints.

Conventions: token ids index a fairseq dictionary whose first ``nspecial`` entries are the
special symbols; "groups" map a group name to the (sorted) token ids of that group.
"""

import math
import re
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from fairseq_agg.isotropy import isoscore, isotropy

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int]]

GROUP_NAMES = ("frequent", "medium", "rare")
# Below this many covered pairs a rank correlation says nothing (two pairs give +-1).
MIN_WORDSIM_PAIRS = 10
# DESIGN section 4: top 30% of the dictionary by training count, next 50%, last 20%.
GROUP_FRACTIONS = (0.3, 0.5, 0.2)


def _long_array(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


def _float64_matrix(weight) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float64).numpy()
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected an (N, d) matrix, got shape {w.shape}")
    return w


# -- frequency groups -------------------------------------------------------------------------

def read_dictionary_counts(dict_file: Union[str, Path]) -> List[Tuple[str, int]]:
    """(symbol, count) pairs of a fairseq ``dict.txt`` (specials are not in the file)."""
    entries = []
    for number, line in enumerate(Path(dict_file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(" ", 2)
        if len(parts) == 3 and parts[2] == "#fairseq:overwrite":
            parts = parts[:2]
        else:
            parts = line.rstrip().rsplit(" ", 1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ValueError(f"{dict_file}:{number}: not a fairseq dictionary line: {line!r}")
        entries.append((parts[0], int(parts[1])))
    return entries


# fairseq-preprocess pads the dictionary to a multiple of 8 entries (--padding-factor) with
# never-seen symbols named madeupword0000, madeupword0001, ...
_FILLER = re.compile(r"madeupword\d{4}")


def filler_symbols(symbols: Sequence[str], counts: Optional[ArrayLike] = None) -> np.ndarray:
    """Ids of fairseq's padding symbols (``madeupword0000``, ... with a training count of 0 where
    ``counts`` are given): entries that are no words and never occur in the data."""
    ids = [i for i, s in enumerate(symbols) if _FILLER.fullmatch(str(s))]
    if counts is not None:
        c = np.asarray(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts,
                       dtype=np.float64).reshape(-1)
        ids = [i for i in ids if c[i] == 0]
    return np.asarray(ids, dtype=np.int64)


def frequency_groups(counts: ArrayLike, nspecial: int, exclude: Optional[ArrayLike] = None) -> "OrderedDict[str, np.ndarray]":
    """Dictionary ids (specials excluded) ordered by training count, descending (ties keep
    dictionary order): top 30% ``frequent``, next 50% ``medium``, last 20% ``rare``.

    ``counts``: training count of every dictionary entry, specials included (their values are
    ignored). ``exclude``: ids in no group either, e.g. fairseq's padding symbols
    (:func:`filler_symbols`); the fractions apply to the rest."""
    counts = np.asarray(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts,
                        dtype=np.float64).reshape(-1)
    if nspecial < 0 or nspecial >= counts.size:
        raise ValueError(f"nspecial={nspecial} leaves no regular token in a dictionary of {counts.size}")
    regular = np.arange(nspecial, counts.size)
    if exclude is not None and len(exclude):
        regular = np.setdiff1d(regular, _long_array(exclude))
        if regular.size == 0:
            raise ValueError("no regular token is left once the excluded ids are removed")
    order = regular[np.argsort(-counts[regular], kind="stable")]
    n = order.size
    n_freq = int(round(GROUP_FRACTIONS[0] * n))
    n_med = int(round(GROUP_FRACTIONS[1] * n))
    cuts = [0, n_freq, n_freq + n_med, n]
    return OrderedDict((name, np.sort(order[cuts[i]:cuts[i + 1]])) for i, name in enumerate(GROUP_NAMES))


def group_of_tokens(groups: Mapping[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """Per dictionary id, the index of its group in ``groups`` (-1: in no group, e.g. specials)."""
    lookup = np.full(vocab_size, -1, dtype=np.int64)
    for index, ids in enumerate(groups.values()):
        lookup[_long_array(ids)] = index
    return lookup


# -- perplexity and next-token predictions ------------------------------------------------------

def group_perplexity(nll: ArrayLike, targets: ArrayLike, groups: Mapping[str, np.ndarray],
                     vocab_size: int) -> Dict[str, Dict[str, float]]:
    """exp(mean NLL) over the positions whose target lies in each group, plus ``total`` over
    every position and ``other`` over targets in no group (the specials: end of line, unk).

    ``nll``: natural-log negative log-likelihood per scored position; ``targets``: its target
    ids. Each entry carries ``nll_sum`` and ``tokens`` so that the groups combine back to the
    total: exp(sum of nll_sum / sum of tokens)."""
    nll = np.asarray(nll.detach().cpu().double().numpy() if isinstance(nll, torch.Tensor) else nll,
                     dtype=np.float64).reshape(-1)
    targets = _long_array(targets)
    if nll.shape != targets.shape:
        raise ValueError(f"{nll.size} NLL values for {targets.size} targets")
    which = group_of_tokens(groups, vocab_size)[targets]
    out: Dict[str, Dict[str, float]] = {}
    selections = [(name, which == i) for i, name in enumerate(groups)]
    selections += [("other", which < 0), ("total", np.ones_like(which, dtype=bool))]
    for name, mask in selections:
        tokens = int(mask.sum())
        nll_sum = float(nll[mask].sum())
        out[name] = {"ppl": math.exp(nll_sum / tokens) if tokens else float("nan"),
                     "nll_sum": nll_sum, "tokens": tokens}
    return out


def unique_tokens(tokens: ArrayLike, groups: Mapping[str, np.ndarray], vocab_size: int) -> Dict[str, int]:
    """Distinct token ids per group, and their ``total`` over the groups (specials are in no
    group and not counted). Applied to argmax next-token predictions this is the paper's
    Uniq; applied to the test targets it is the Human row."""
    distinct = np.unique(_long_array(tokens))
    which = group_of_tokens(groups, vocab_size)[distinct]
    out = {name: int((which == i).sum()) for i, name in enumerate(groups)}
    out["total"] = int((which >= 0).sum())
    return out


def next_token_repetition(predictions: ArrayLike, targets: ArrayLike,
                          context_lengths: Iterable[int] = (16, 32, 128, 512)) -> Dict[str, float]:
    """rep/l and wrep/l of Welleck et al. (2020) for next-token (argmax) predictions over a
    contiguous token stream: rep/l is the fraction of predictions that occur among the
    previous l ground-truth tokens, wrep/l the fraction that do so while differing from the
    true next token. Also ``acc``, the next-token accuracy."""
    predictions, targets = _long_array(predictions), _long_array(targets)
    if predictions.shape != targets.shape or predictions.size == 0:
        raise ValueError("predictions and targets must be non-empty and of equal length")
    last_seen: Dict[int, int] = {}
    distance = np.empty(predictions.size, dtype=np.int64)  # to the prediction's last occurrence
    never = np.iinfo(np.int64).max
    for t, (pred, target) in enumerate(zip(predictions.tolist(), targets.tolist())):
        distance[t] = t - last_seen[pred] if pred in last_seen else never
        last_seen[target] = t  # the target at t is part of the context of t + 1
    wrong = predictions != targets
    out = {"acc": float((~wrong).mean())}
    for length in context_lengths:
        repeated = distance <= length
        out[f"rep/{length}"] = float(repeated.mean())
        out[f"wrep/{length}"] = float((repeated & wrong).mean())
    return out


# -- generated continuations -----------------------------------------------------------------

def seq_rep_n(tokens: Sequence[int], n: int) -> float:
    """1 - distinct n-grams / n-grams within one continuation (Welleck et al. 2020)."""
    tokens = list(tokens)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def continuation_metrics(continuations: Sequence[Sequence[int]], ns: Sequence[int] = (1, 2, 3, 4)) -> Dict[str, float]:
    """Over greedy continuations: ``uniq_per_text`` (mean distinct tokens of one continuation,
    the Uniq of the paper's Tables 5 and 15), ``seq-rep-n`` averaged over continuations, and
    ``distinct_tokens`` over all continuations together."""
    if not continuations:
        raise ValueError("no continuations")
    out = {"texts": len(continuations),
           "uniq_per_text": float(np.mean([len(set(c)) for c in continuations]))}
    for n in ns:
        out[f"seq-rep-{n}"] = float(np.mean([seq_rep_n(c, n) for c in continuations]))
    out["distinct_tokens"] = len(set(t for c in continuations for t in c))
    return out


# -- word similarity ---------------------------------------------------------------------------

def load_word_similarity(path: Union[str, Path]) -> List[Tuple[str, str, float]]:
    """Word pairs with human scores from the usual formats: ``word1 word2 score`` separated by
    tabs, spaces or commas, an optional header line, ``#`` comments, CRLF line ends, and an
    optional leading index column (vecto's CSVs)."""
    pairs = []
    first_content_line = True
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f for f in re.split(r"[\t ,]+", line) if f]
        if len(fields) in (1, 4) and re.fullmatch(r"\d+", fields[0]):
            fields = fields[1:]  # index column
            if not fields:
                continue  # an index with empty cells (vecto's files end with one)
        try:
            if len(fields) != 3:
                raise ValueError
            pairs.append((fields[0], fields[1], float(fields[2])))
        except ValueError:
            if not first_content_line:
                raise ValueError(f"{path}:{number}: expected 'word1 word2 score', got {line!r}") from None
        first_content_line = False
    if not pairs:
        raise ValueError(f"{path}: no word pairs")
    return pairs


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def word_similarity(pairs: Sequence[Tuple[str, str, float]], weight, token_ids: Callable[[str], Optional[List[int]]],
                    min_pairs: int = MIN_WORDSIM_PAIRS) -> Dict[str, float]:
    """Spearman rho x 100 between the cosine similarity of two words' vectors and the human
    score, over the pairs whose words both have a vector. A word's vector is the mean of its
    subword rows of ``weight`` (DESIGN section 4); ``token_ids(word)`` returns those rows'
    ids, or None when the word cannot be represented (unknown pieces). With fewer than
    ``min_pairs`` covered pairs rho is NaN (reported as n/a)."""
    w = _float64_matrix(weight)
    cache: Dict[str, Optional[np.ndarray]] = {}

    def vector(word: str) -> Optional[np.ndarray]:
        if word not in cache:
            ids = token_ids(word)
            cache[word] = w[list(ids)].mean(axis=0) if ids else None
        return cache[word]

    cosines, scores = [], []
    for a, b, score in pairs:
        va, vb = vector(a), vector(b)
        if va is None or vb is None:
            continue
        denom = np.linalg.norm(va) * np.linalg.norm(vb)
        cosines.append(float(va @ vb / denom) if denom > 0 else 0.0)
        scores.append(score)
    enough = len(cosines) >= max(2, min_pairs)
    return {"spearman": 100.0 * spearman(cosines, scores) if enough else float("nan"),
            "pairs": len(pairs), "covered": len(cosines)}


# -- neighbours and geometry -------------------------------------------------------------------

def _unit_rows(w: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norms > 0, norms, 1.0)


def nearest_neighbours(weight, queries: Sequence[int], k: int = 5, candidates: Optional[ArrayLike] = None) -> List[List[Tuple[int, float]]]:
    """Top-``k`` rows by cosine similarity to each query row (the query itself excluded),
    among ``candidates`` (default: every row)."""
    unit = _unit_rows(_float64_matrix(weight))
    pool = np.arange(unit.shape[0]) if candidates is None else _long_array(candidates)
    out = []
    for q in queries:
        sims = unit[pool] @ unit[q]
        sims = np.where(pool == q, -np.inf, sims)
        top = np.argsort(-sims, kind="stable")[:k]
        out.append([(int(pool[i]), float(sims[i])) for i in top])
    return out


def mean_pairwise_cosine(vectors) -> float:
    """Mean cosine similarity over pairs of distinct rows, in float64, without an N x N
    matrix (:func:`fairseq_agg.remedies.mean_pairwise_cosine`)."""
    from fairseq_agg.remedies import mean_pairwise_cosine as pairwise

    return float(pairwise(torch.from_numpy(_float64_matrix(vectors))))


def singular_spectrum(weight) -> Dict[str, object]:
    """Singular values of W normalised by the largest (the paper's Figure 3c), and the
    entropy of the singular values normalised to sum 1 (natural log; its maximum is log d)."""
    s = np.linalg.svd(_float64_matrix(weight), compute_uv=False)
    p = s / s.sum()
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    return {"normalized": (s / s[0]).tolist(), "entropy": entropy,
            "entropy_normalized": entropy / math.log(len(s)) if len(s) > 1 else 1.0}


def embedding_geometry(weight, counts: Optional[ArrayLike] = None, nspecial: int = 0) -> Dict[str, float]:
    """Geometry of an embedding matrix over its regular rows (the first ``nspecial`` rows are
    left out): mean pairwise cosine, norm of the mean row and its ratio to the mean row norm,
    the singular spectrum's entropy, and -- given training ``counts`` -- the Pearson
    correlation of row norm with log unigram probability over tokens seen in training."""
    from scipy.stats import pearsonr

    w = _float64_matrix(weight)[nspecial:]
    norms = np.linalg.norm(w, axis=1)
    mean_norm = float(np.linalg.norm(w.mean(axis=0)))
    spectrum = singular_spectrum(w)
    out = {"mean_cosine": mean_pairwise_cosine(w), "mean_embedding_norm": mean_norm,
           "mean_embedding_norm_ratio": mean_norm / float(norms.mean()),
           "singular_entropy": spectrum["entropy"], "singular_entropy_normalized": spectrum["entropy_normalized"]}
    if counts is not None:
        c = np.asarray(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts,
                       dtype=np.float64).reshape(-1)[nspecial:]
        if c.size != w.shape[0]:
            raise ValueError(f"{c.size + nspecial} counts for {w.shape[0] + nspecial} embedding rows")
        seen = c > 0
        if seen.sum() >= 3:
            out["norm_logfreq_pearson"] = float(pearsonr(norms[seen], np.log(c[seen] / c[seen].sum())).statistic)
    return out


def isotropy_by_group(weight, groups: Mapping[str, np.ndarray], signs: str = "both") -> Dict[str, float]:
    """I(W) over all rows of ``weight`` (``total``) and over each group's rows; ``signs``: see
    :func:`fairseq_agg.isotropy.isotropy` (default: both signs of every eigenvector)."""
    out = {"total": isotropy(weight, signs=signs)}
    for name, ids in groups.items():
        out[name] = isotropy(weight, rows=torch.as_tensor(_long_array(ids)), signs=signs)
    return out


def isoscore_by_group(weight, groups: Mapping[str, np.ndarray]) -> Dict[str, float]:
    """IsoScore (Rudman et al. 2022) over all rows of ``weight`` (``total``) and over each
    group's rows."""
    out = {"total": isoscore(weight)}
    for name, ids in groups.items():
        out[name] = isoscore(weight, rows=torch.as_tensor(_long_array(ids)))
    return out


# -- several runs of one method (seeds) ---------------------------------------------------------

class Stat(float):
    """The mean of several runs' values (it is that float), with the values, their number ``n``
    and ``std``, the sample standard deviation (ddof=1; NaN for one value)."""

    def __new__(cls, values: Sequence[float]):
        values = [float(v) for v in values]
        if not values:
            raise ValueError("no values")
        array = np.asarray(values, dtype=np.float64)
        self = super().__new__(cls, float(array.mean()))
        self.values = values
        self.n = len(values)
        self.std = float(array.std(ddof=1)) if len(values) > 1 else float("nan")
        self.integral = all(v == int(v) for v in values if math.isfinite(v))
        return self

    def format(self, digits: int = 2) -> str:
        """``mean ± std`` with ``digits`` decimals (the mean alone for one value; n/a when a
        value is NaN, e.g. a rank correlation over too few pairs)."""
        if math.isnan(self):
            return "n/a"
        if self.n == 1 or not math.isfinite(self.std):
            return f"{float(self):.{digits}f}"
        return f"{float(self):.{digits}f} ± {self.std:.{digits}f}"

    def __str__(self) -> str:
        if self.integral and self.std == 0:
            return str(int(self))
        return self.format(1 if self.integral else 3)

    def __repr__(self) -> str:
        return f"Stat({self.values})"


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def aggregate_runs(values: Sequence):
    """Several runs' results (dicts as ``fairseq-agg-eval`` or the demo write them) as one:
    numbers become :class:`Stat` (mean, sample std over the runs), dicts are aggregated key by
    key (keys present in every run), lists and tuples of equal length element by element;
    anything else (text, lists of other lengths, None) is taken from the first run."""
    values = list(values)
    first = values[0]
    if all(_is_number(v) for v in values):
        return Stat(values)
    if all(isinstance(v, Mapping) for v in values):
        return OrderedDict((k, aggregate_runs([v[k] for v in values])) for k in first if all(k in v for v in values))
    if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) == 1:
        return [aggregate_runs(list(column)) for column in zip(*values)]
    return first


def svd_projection(weight) -> np.ndarray:
    """Rows of W projected on its top two right singular vectors (the 2-D view of the
    paper's Figures 1 and 3)."""
    w = _float64_matrix(weight)
    _, _, vt = np.linalg.svd(w, full_matrices=False)
    return w @ vt[:2].T


# -- BLEU --------------------------------------------------------------------------------------

_COMPOUND = re.compile(r"(\S)-(\S)")


def split_compounds(line: str) -> str:
    r"""``a-b`` -> ``a ##AT##-##AT## b``: the compound splitting of the WMT14 En-De papers,
    exactly as fairseq's compound_split_bleu.sh (``perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'``):
    one left-to-right pass, so in ``a-b-c`` only the first hyphen is split, as there."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], compound_split: bool = True):
    """BLEU on already tokenized text (multi-bleu.perl semantics: no further tokenisation),
    with compound splitting. Returns sacrebleu's BLEUScore."""
    import sacrebleu

    _check_parallel(hypotheses, references)
    if compound_split:
        hypotheses = [split_compounds(h) for h in hypotheses]
        references = [split_compounds(r) for r in references]
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="none")


def detokenized_bleu(hypotheses: Sequence[str], references: Sequence[str]):
    """sacreBLEU (default 13a tokenisation) of detokenized hypotheses against raw references."""
    import sacrebleu

    _check_parallel(hypotheses, references)
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)])


def _check_parallel(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
