"""The evaluation metrics (fairseq_agg.metrics) against hand counts and independent
references: scipy, sacrebleu's command line, fairseq's own BLEU scorer, the perl one-liner of
fairseq's compound_split_bleu.sh, and brute-force O(N^2) definitions."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from fairseq_agg import metrics
from fairseq_agg.isotropy import isotropy

from conftest import DATA

NSPECIAL = 4


# -- groups, perplexity, Uniq -----------------------------------------------------------------

def test_frequency_groups_split_30_50_20_by_count_with_stable_ties():
    counts = [0, 0, 0, 0] + [5, 50, 7, 7, 1, 100, 3, 7, 2, 9]  # ids 4..13
    groups = metrics.frequency_groups(counts, NSPECIAL)
    # by count: 9(100) 5(50) 13(9) | 6(7) 7(7) 11(7) 4(5) 10(3) | 12(2) 8(1)
    assert groups["frequent"].tolist() == [5, 9, 13]
    assert groups["medium"].tolist() == [4, 6, 7, 10, 11]
    assert groups["rare"].tolist() == [8, 12]


def test_group_perplexities_combine_to_the_total():
    rng = np.random.default_rng(0)
    vocab = 30
    targets = rng.integers(0, vocab, size=500)
    nll = rng.uniform(0.1, 8.0, size=500)
    groups = metrics.frequency_groups(rng.integers(1, 100, size=vocab), NSPECIAL)
    out = metrics.group_perplexity(nll, targets, groups, vocab)
    assert out["total"]["ppl"] == pytest.approx(np.exp(nll.mean()))
    parts = ["frequent", "medium", "rare", "other"]
    assert sum(out[p]["tokens"] for p in parts) == 500
    combined = np.exp(sum(out[p]["nll_sum"] for p in parts) / 500)
    assert combined == pytest.approx(out["total"]["ppl"], rel=1e-12)
    rare = np.isin(targets, groups["rare"])
    assert out["rare"]["ppl"] == pytest.approx(np.exp(nll[rare].mean()))
    assert out["other"]["tokens"] == int((targets < NSPECIAL).sum())


def test_uniq_and_human_hand_counted():
    counts = [0] * NSPECIAL + [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]  # ids 4..13 already in count order
    groups = metrics.frequency_groups(counts, NSPECIAL)  # frequent 4-6, medium 7-11, rare 12-13
    predictions = [4, 4, 5, 2, 3, 8, 8, 8, 13, 2]  # 2 and 3 are specials: not counted
    assert metrics.unique_tokens(predictions, groups, 14) == {"frequent": 2, "medium": 1, "rare": 1, "total": 4}
    targets = [4, 5, 6, 7, 9, 11, 12, 12, 13, 1]
    assert metrics.unique_tokens(targets, groups, 14) == {"frequent": 3, "medium": 3, "rare": 2, "total": 8}


def _brute_force_repetition(pred, target, length):
    rep = wrep = 0
    for t in range(len(pred)):
        previous = target[max(0, t - length):t]
        if pred[t] in previous:
            rep += 1
            wrep += pred[t] != target[t]
    return rep / len(pred), wrep / len(pred)


def test_rep_and_wrep_match_a_brute_force_count():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 12, size=400)
    pred = np.where(rng.random(400) < 0.3, target, rng.integers(0, 12, size=400))
    out = metrics.next_token_repetition(pred, target, context_lengths=(1, 4, 16))
    for length in (1, 4, 16):
        rep, wrep = _brute_force_repetition(pred.tolist(), target.tolist(), length)
        assert out[f"rep/{length}"] == pytest.approx(rep)
        assert out[f"wrep/{length}"] == pytest.approx(wrep)
    assert out["acc"] == pytest.approx(float((pred == target).mean()))


def test_continuation_metrics_hand_counted():
    texts = [[1, 2, 1, 2, 1, 2], [5, 6, 7, 8, 9, 10]]
    out = metrics.continuation_metrics(texts, ns=(1, 2))
    assert out["uniq_per_text"] == 4.0  # 2 and 6 distinct tokens
    assert out["seq-rep-1"] == pytest.approx(((1 - 2 / 6) + 0) / 2)
    assert out["seq-rep-2"] == pytest.approx(((1 - 2 / 5) + 0) / 2)  # bigrams 12 21 12 21 12
    assert out["distinct_tokens"] == 8


# -- word similarity ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "tiger\tcat\t7.35\nbook paper 7.46\r\ncomputer  keyboard\t7.62\n",
    "word1\tword2\tscore\ntiger\tcat\t7.35\nbook\tpaper\t7.46\ncomputer\tkeyboard\t7.62\n",
    "# a comment\r\n# another\r\ntiger\tcat\t7.35\r\nbook\tpaper\t7.46\r\ncomputer\tkeyboard\t7.62\r\n",
    ",word1,word2,similarity\n0,tiger,cat,7.35\n1,book,paper,7.46\n2,computer,keyboard,7.62\n3,,,\n",
])
def test_word_similarity_loader_formats(tmp_path, text):
    path = tmp_path / "pairs.txt"
    path.write_bytes(text.encode())
    assert metrics.load_word_similarity(path) == [("tiger", "cat", 7.35), ("book", "paper", 7.46),
                                                   ("computer", "keyboard", 7.62)]


def test_word_similarity_loader_names_a_bad_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("tiger cat 7.35\nbook paper\n")
    with pytest.raises(ValueError, match=r"pairs.txt:2: expected 'word1 word2 score'"):
        metrics.load_word_similarity(path)


def test_shipped_excerpts_load():
    folder = DATA / "wordsim" / "excerpts"
    sizes = {name: len(metrics.load_word_similarity(folder / name)) for name in
             ("EN-MEN-TR-3k.txt", "EN-WS-353-ALL.txt", "EN-RG-65.txt", "EN-RW-STANFORD.txt")}
    assert sizes == {"EN-MEN-TR-3k.txt": 120, "EN-WS-353-ALL.txt": 120, "EN-RG-65.txt": 65, "EN-RW-STANFORD.txt": 120}
    assert b"\r\n" in (folder / "EN-WS-353-ALL.txt").read_bytes()  # the canonical file's CRLF kept


def test_word_similarity_matches_scipy_with_subword_means():
    rng = np.random.default_rng(3)
    vocab = {f"w{i}": [i] for i in range(40)}
    vocab["split"] = [3, 7, 11]  # a word of three pieces: its vector is their mean
    weight = rng.normal(size=(40, 8))
    words = list(vocab)
    # distinct words: a word paired with itself has cosine 1 up to rounding, and such ties
    # would make rank order depend on the last bit
    pairs = [(words[i], words[(i + 1 + rng.integers(len(words) - 1)) % len(words)], float(rng.uniform(0, 10)))
             for i in rng.integers(len(words), size=60)]
    pairs.append(("w1", "unknown", 5.0))
    out = metrics.word_similarity(pairs, weight, lambda w: vocab.get(w))
    cos, gold = [], []
    for a, b, score in pairs[:-1]:
        va = torch.tensor(weight[vocab[a]]).mean(0)
        vb = torch.tensor(weight[vocab[b]]).mean(0)
        cos.append(float(torch.nn.functional.cosine_similarity(va, vb, dim=0)))
        gold.append(score)
    assert out["covered"] == 60 and out["pairs"] == 61
    assert out["spearman"] == pytest.approx(100 * spearmanr(cos, gold).statistic, abs=1e-9)


# -- neighbours and geometry -------------------------------------------------------------------

def test_nearest_neighbours_match_a_full_cosine_matrix():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(50, 6))
    full = torch.nn.functional.cosine_similarity(torch.tensor(w)[:, None], torch.tensor(w)[None], dim=-1)
    full.fill_diagonal_(-2)
    for query, found in zip([0, 7, 49], metrics.nearest_neighbours(w, [0, 7, 49], k=4)):
        expected = torch.topk(full[query], 4).indices.tolist()
        assert [t for t, _ in found] == expected
        assert [c for _, c in found] == pytest.approx(full[query, expected].tolist())


def test_mean_cosine_equals_the_pairwise_definition():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(70, 5)) + 2.0
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    sims = unit @ unit.T
    direct = (sims.sum() - np.trace(sims)) / (70 * 69)
    assert metrics.mean_pairwise_cosine(w) == pytest.approx(direct, rel=1e-12)


def test_geometry_against_direct_formulas():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(64, 6))
    counts = rng.integers(0, 500, size=64)
    counts[:NSPECIAL] = 0
    geo = metrics.embedding_geometry(w, counts, NSPECIAL)
    regular = w[NSPECIAL:]
    norms = np.linalg.norm(regular, axis=1)
    assert geo["mean_embedding_norm"] == pytest.approx(np.linalg.norm(regular.mean(0)))
    assert geo["mean_embedding_norm_ratio"] == pytest.approx(np.linalg.norm(regular.mean(0)) / norms.mean())
    seen = counts[NSPECIAL:] > 0
    p = counts[NSPECIAL:][seen] / counts[NSPECIAL:][seen].sum()
    assert geo["norm_logfreq_pearson"] == pytest.approx(pearsonr(norms[seen], np.log(p)).statistic)
    s = np.linalg.svd(regular, compute_uv=False)
    q = s / s.sum()
    assert geo["singular_entropy"] == pytest.approx(-(q * np.log(q)).sum())
    spectrum = metrics.singular_spectrum(regular)
    assert spectrum["normalized"] == pytest.approx((s / s[0]).tolist())


def test_isotropy_by_group_uses_only_the_group_rows():
    rng = np.random.default_rng(7)
    w = rng.normal(size=(40, 4))
    groups = metrics.frequency_groups(rng.integers(1, 50, size=40), NSPECIAL)
    out = metrics.isotropy_by_group(w, groups)
    assert out["total"] == pytest.approx(isotropy(w))
    assert out["rare"] == pytest.approx(isotropy(w[groups["rare"]]))


# -- BLEU --------------------------------------------------------------------------------------

HYPS = ["das ist ein gut-gemachter Test .", "die Katze sitzt auf der Matte", "Hallo Welt !",
        "ein zwei-drei-vier Beispiel mit mehr Wörtern hier", "kurz"]
REFS = ["das ist ein gut-gemachter Versuch .", "die Katze saß auf der Matte", "Hallo , Welt !",
        "ein zwei-drei-vier Beispiel mit vielen Wörtern hier", "sehr kurz"]


def test_compound_splitting_matches_fairseqs_perl_one_liner():
    perl = shutil.which("perl")
    assert perl, "perl runs fairseq's compound_split_bleu.sh; it is part of every Debian base image"
    text = "\n".join(HYPS + ["a-b-c x - y well-known -lead trail- 3-4"]) + "\n"
    expected = subprocess.run([perl, "-ple", "s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g"], input=text,
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert [metrics.split_compounds(line) for line in text.splitlines()] == expected


def test_tokenized_bleu_matches_sacrebleu_cli_and_fairseq_scorer(tmp_path):
    hyp_file, ref_file = tmp_path / "hyp", tmp_path / "ref"
    split_h = [metrics.split_compounds(h) for h in HYPS]
    split_r = [metrics.split_compounds(r) for r in REFS]
    hyp_file.write_text("\n".join(split_h) + "\n")
    ref_file.write_text("\n".join(split_r) + "\n")
    ours = metrics.tokenized_bleu(HYPS, REFS).score
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file), "-tok", "none", "-b", "-w", "4"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert ours == pytest.approx(float(cli), abs=0.005)
    score = subprocess.run([sys.executable, "-m", "fairseq_cli.score", "--sys", str(hyp_file), "--ref", str(ref_file)],
                           capture_output=True, text=True, check=True).stdout
    fairseq_bleu = float(score.split("BLEU4 = ")[1].split(",")[0]) if "BLEU4 = " in score else float(score.split("BLEU = ")[1].split(",")[0])
    assert ours == pytest.approx(fairseq_bleu, abs=0.005)


def test_detokenized_bleu_matches_sacrebleu_cli(tmp_path):
    hyp_file, ref_file = tmp_path / "hyp", tmp_path / "ref"
    hyp_file.write_text("\n".join(HYPS) + "\n")
    ref_file.write_text("\n".join(REFS) + "\n")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref_file), "-i", str(hyp_file), "-b", "-w", "4"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert metrics.detokenized_bleu(HYPS, REFS).score == pytest.approx(float(cli), abs=0.005)


def test_bleu_refuses_misaligned_files():
    with pytest.raises(ValueError, match="5 hypotheses but 4 references"):
        metrics.tokenized_bleu(HYPS, REFS[:4])


# -- padding symbols, several runs ---------------------------------------------------------------

def test_padding_symbols_are_in_no_group():
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "the", "a", "cat", "madeupword", "dog", "madeupword0000",
               "madeupword0001"]
    counts = [0, 0, 0, 0, 50, 40, 3, 2, 1, 0, 0]  # "madeupword" (no digits) is a real word here
    fillers = metrics.filler_symbols(symbols, counts)
    assert fillers.tolist() == [9, 10]
    groups = metrics.frequency_groups(counts, NSPECIAL, exclude=fillers)
    grouped = np.concatenate(list(groups.values()))
    assert sorted(grouped.tolist()) == [4, 5, 6, 7, 8]
    assert groups["rare"].tolist() == [8]  # the fractions apply to the five words
    assert 9 not in grouped and 10 not in grouped


def test_stat_is_numpys_mean_and_sample_std():
    values = [174.09, 175.3, 172.8]
    stat = metrics.Stat(values)
    assert float(stat) == pytest.approx(np.mean(values), rel=1e-15)
    assert stat.std == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert stat.format(2) == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
    assert str(metrics.Stat([12, 12, 12])) == "12"
    assert np.isnan(metrics.Stat([1.0]).std) and metrics.Stat([1.0]).format(2) == "1.00"


def test_aggregate_runs_takes_every_number_of_every_run():
    runs = [{"name": "AGG", "ppl": {"total": {"ppl": 180.0 + i, "tokens": 100}}, "singular_values": [1.0, 0.5 + i / 10],
             "neighbours": [{"query": "x", "neighbours": ["a", "b"]}], "trained_with": {"criterion": "agg_cross_entropy"}}
            for i in range(3)]
    agg = metrics.aggregate_runs(runs)
    assert agg["name"] == "AGG" and agg["trained_with"]["criterion"] == "agg_cross_entropy"
    total = agg["ppl"]["total"]["ppl"]
    assert total.values == [180.0, 181.0, 182.0] and total.std == pytest.approx(1.0)
    assert str(agg["ppl"]["total"]["tokens"]) == "100"
    assert float(agg["singular_values"][1]) == pytest.approx(0.6)
    assert agg["neighbours"][0]["neighbours"] == ["a", "b"]
