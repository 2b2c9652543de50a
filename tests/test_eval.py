"""fairseq-agg-eval end to end: on the demo's MLE and AGG models (lm, compare) and on a tiny
translation model (mt); group perplexities against fairseq-eval-lm on the same checkpoint and
context window; BLEU against sacrebleu on fairseq-generate's own output; clear errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from fairseq_agg import eval as agg_eval
from fairseq_agg import metrics

from conftest import MT_MODEL, USER_DIR, mt_train, run_all, subprocess_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LM_FIGURES = {"svd_projection", "singular_values", "rare_group_size", "isotropy_over_training"}


def _eval_lm(workdir, name, out, *extra):
    agg_eval.main(["lm", str(workdir / "data-bin"), "--path", str(workdir / name / "checkpoint_last.pt"),
                   "--out", str(out), "--cpu", "--num-texts", "12", "--no-progress-bar", "--name", name.upper(), *extra])
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def demo_evals(quick_demo, tmp_path_factory):
    workdir, _ = quick_demo
    out = tmp_path_factory.mktemp("eval")
    evals = {"mle": (_eval_lm(workdir, "mle", out / "mle"), out / "mle"),
             "agg": (_eval_lm(workdir, "agg", out / "agg", "--post-hoc", "mean_removal", "abtt",
                              "--abtt-directions", "2"), out / "agg")}
    return workdir, evals


def test_lm_report_and_all_pictures_from_one_command(demo_evals):
    _, evals = demo_evals
    result, out = evals["agg"]
    assert set(result["figures"]) == LM_FIGURES
    for file in result["figures"].values():
        data = (out / file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, file
    report = (out / "report.md").read_text()
    for heading in ("Perplexity and Uniq per frequency group", "I(W) per frequency group", "Word similarity",
                    "Greedy generation", "Next-token repetition", "Embedding geometry", "Nearest neighbours"):
        assert heading in report
    for file in result["figures"].values():
        assert f"]({file})" in report
    # the curves come from the run's log and its intermediate checkpoint
    assert len(result["training"]["rare_group_size"]) >= 3
    assert [p["update"] for p in result["training"]["isotropy"]] == [75, 150]
    assert result["training"]["isotropy"][-1]["total"] == pytest.approx(result["isotropy"]["total"])
    # the plug-in's task also logged I(W) at each validation: the same values, to the log's 4 digits
    logged = result["training"]["isotropy_validation"]
    assert [p["update"] for p in logged] == [75, 150]
    for from_log, from_checkpoint in zip(logged, result["training"]["isotropy"]):
        assert from_log["total"] == pytest.approx(from_checkpoint["total"], abs=6e-5)


def test_isotropy_curve_falls_back_to_the_validation_log():
    checkpoints = [{"update": 50, "total": 0.9, "rare": 0.8}]
    logged = [{"update": 25, "total": 0.95}, {"update": 50, "total": 0.9}]
    assert agg_eval.isotropy_series({"isotropy": checkpoints, "isotropy_validation": logged}) == logged
    assert agg_eval.isotropy_series({"isotropy": checkpoints * 2, "isotropy_validation": logged}) == checkpoints * 2
    assert agg_eval.isotropy_series({"isotropy": checkpoints, "isotropy_validation": logged[:1]}) == checkpoints
    assert agg_eval.isotropy_series({}) == []


def test_bpe_auto_takes_what_the_preparation_left_in_the_data_folder(tmp_path):
    from argparse import Namespace

    from conftest import REPO

    def resolved(data, bpe="auto"):
        args = Namespace(data=data, bpe=bpe, gpt2_encoder_json=None, gpt2_vocab_bpe=None, sentencepiece_model=None)
        agg_eval.resolve_bpe(args)
        return args

    (tmp_path / "words").mkdir()
    assert resolved(tmp_path / "words").bpe == "none"
    shipped = resolved(tmp_path / "words", bpe="gpt2")  # no download: the copies in data/gpt2_bpe
    assert (shipped.gpt2_encoder_json, shipped.gpt2_vocab_bpe) == (str(REPO / "data" / "gpt2_bpe" / "encoder.json"),
                                                                   str(REPO / "data" / "gpt2_bpe" / "vocab.bpe"))
    (tmp_path / "gpt2" / "bpe").mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        (tmp_path / "gpt2" / "bpe" / name).write_text("{}")
    gpt2 = resolved(tmp_path / "gpt2")
    assert gpt2.bpe == "gpt2" and gpt2.gpt2_encoder_json == str(tmp_path / "gpt2" / "bpe" / "encoder.json")
    (tmp_path / "spm" / "bpe").mkdir(parents=True)
    (tmp_path / "spm" / "bpe" / "spm.model").write_text("")
    spm = resolved(tmp_path / "spm")
    assert spm.bpe == "sentencepiece" and spm.sentencepiece_model == str(tmp_path / "spm" / "bpe" / "spm.model")


def test_generation_beyond_learned_positions_is_refused():
    from types import SimpleNamespace

    from fairseq.modules import LearnedPositionalEmbedding

    model = SimpleNamespace(decoder=SimpleNamespace(embed_positions=LearnedPositionalEmbedding(66, 8, padding_idx=1)))
    with pytest.raises(SystemExit, match=r"--prefix-len 50 \+ --gen-len 100 = 150 tokens exceed the model's 64 "
                                         r"learned positions"):
        agg_eval.greedy_continuations(model, None, None, "cpu", 50, 100, 4, 2, False)


def test_log_points_read_the_simple_and_json_formats(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-01 | INFO | train_inner | epoch 001:     10 / 40 loss=9.1, agg_rare=1200, num_updates=10\n"
        "2026-12-01 | INFO | train_inner | {\"epoch\": 1, \"loss\": \"8.9\", \"agg_rare\": \"1100\", \"num_updates\": \"20\"}\n"
        "2026-12-01 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 9.0 | nll_loss 9.0 | isotropy 0.8123 "
        "| ppl 512 | num_updates 20\n"
        "2026-12-01 | INFO | valid | epoch 001 | valid on 'test' subset | loss 9.2 | nll_loss 9.2 | ppl 600 | num_updates 20\n"
        "2026-12-01 | INFO | valid | {\"epoch\": 2, \"valid_loss\": \"8.5\", \"valid_isotropy\": \"0.7\", "
        "\"valid_num_updates\": \"40\"}\n",
        encoding="utf-8")
    assert agg_eval.parse_train_log(log) == [(10, 1200.0), (20, 1100.0)]
    assert agg_eval.log_points(log, "valid", "isotropy") == [(20, 0.8123), (40, 0.7)]
    assert agg_eval.log_points(log, "valid", "loss") == [(20, 9.0), (40, 8.5)]  # nll_loss is another key


def test_log_points_read_fairseqs_log_file_format(tmp_path):
    """fairseq-train --log-file writes the bare messages, without the console's tags (as
    fairseq 0.12 wrote them for this plug-in's task): simple and json formats."""
    simple = tmp_path / "simple.log"
    simple.write_text(
        "{'_name': None, 'common': {'log_file': 'x.log', 'valid_subset': 'valid'}}\n"
        "begin dry-run validation on \"valid\" subset\n"
        "epoch 001:      2 / 51 loss=11.849, nll_loss=11.849, agg_rare=2586, ppl=3688.25, wps=21669.2, num_updates=2, "
        "lr=0.001\n"
        "epoch 001 | valid on 'valid' subset | loss 11.707 | nll_loss 11.707 | agg_rare 2273 | isotropy 0.9837 | "
        "ppl 3343.95 | num_updates 3\n"
        "epoch 001:      4 / 51 loss=11.885, nll_loss=11.885, agg_rare=2330.5, ppl=3783.01, num_updates=4\n"
        "epoch 001 | loss 11.885 | nll_loss 11.885 | agg_rare 2350.5 | ppl 3781.02 | num_updates 6 | lr 0.001\n",
        encoding="utf-8")
    assert agg_eval.parse_train_log(simple) == [(2, 2586.0), (4, 2330.5)]  # not the epoch summary's 2350.5
    assert agg_eval.log_points(simple, "valid", "isotropy") == [(3, 0.9837)]
    as_json = tmp_path / "json.log"
    as_json.write_text(
        '{"epoch": 1, "update": 0.04, "loss": "11.849", "agg_rare": "2586", "num_updates": "2"}\n'
        '{"epoch": 1, "valid_loss": "11.707", "valid_isotropy": "0.9837", "valid_num_updates": "3"}\n'
        '{"epoch": 1, "train_loss": "11.885", "train_agg_rare": "2350.5", "train_num_updates": "6"}\n',
        encoding="utf-8")
    assert agg_eval.parse_train_log(as_json) == [(2, 2586.0)]
    assert agg_eval.log_points(as_json, "valid", "isotropy") == [(3, 0.9837)]


def test_a_curve_without_points_is_named(tmp_path, capsys):
    from argparse import Namespace

    log = tmp_path / "train.log"
    log.write_text("nothing fairseq wrote\n", encoding="utf-8")
    args = Namespace(train_log=log, path=tmp_path / "checkpoint_last.pt", no_training_curves=True,
                     no_progress_bar=True)
    curves = agg_eval.training_curves(args, {}, {"criterion": "agg_cross_entropy"})
    assert curves["rare_group_size"] == []
    assert any("rare-group curve has no points" in n for n in curves["notes"])
    assert "rare-group curve has no points" in capsys.readouterr().err
    from fairseq_agg import figures

    png = figures.rare_group_size(tmp_path / "rare.png", {"AGG": []})
    assert open(png, "rb").read().startswith(PNG_MAGIC)


def test_mle_run_has_no_rare_group_curve(demo_evals):
    _, evals = demo_evals
    result, _ = evals["mle"]
    assert "rare_group_size" not in result["figures"]
    assert result["training"]["rare_group_size"] == []


def test_isotropy_matches_the_demo_table(quick_demo, demo_evals):
    _, demo_results = quick_demo
    _, evals = demo_evals
    for name in ("mle", "agg"):
        result = evals[name][0]
        assert result["isotropy_signs"] == "both"
        for key, demo_key in (("isotropy", "I(W)"), ("isoscore", "IsoScore")):
            assert result[key]["total"] == pytest.approx(demo_results["runs"][name][demo_key], rel=1e-9)
            assert result[key]["rare"] == pytest.approx(demo_results["runs"][name][f"{demo_key} rare"], rel=1e-9)


def test_report_shows_the_other_positions_and_isoscore(demo_evals):
    _, evals = demo_evals
    result, out = evals["mle"]
    report = (out / "report.md").read_text()
    other = result["ppl"]["other"]
    assert other["tokens"] > 0
    assert "| Method | PPL Freq | PPL Med | PPL Rare | PPL Other | PPL Total |" in report
    assert f"| {report_number(other['ppl'])} |" in report
    assert "the others (end of line, `<unk>`) have PPL MLE " + report_number(other["ppl"]) in report
    assert "| Method | I(W) Freq | I(W) Med | I(W) Rare | I(W) Total | IsoScore Freq |" in report
    assert f"{result['isoscore']['total']:.3f}" in report


def report_number(value):
    return f"{value:.2f}"


def test_padding_symbols_are_in_no_group_and_never_neighbours(tmp_path):
    """The demo binarizes without fairseq's padding symbols; a dictionary that has them
    (fairseq-preprocess's default --padding-factor 8) keeps them out of the groups, the
    neighbour queries and the neighbours."""
    from argparse import Namespace

    from fairseq.data import Dictionary

    dictionary = Dictionary()
    for i, word in enumerate(["the", "of", "cat", "dog", "zebra", "okapi", "quokka", "numbat", "aye-aye"]):
        dictionary.add_symbol(word, n=100 - 10 * i)
    dictionary.pad_to_multiple_(8)
    fillers = [i for i, s in enumerate(dictionary.symbols) if s.startswith("madeupword")]
    assert len(fillers) == 3
    groups, found = agg_eval.dictionary_groups(dictionary, agg_eval.load_dictionary_counts(dictionary))
    assert found.tolist() == fillers
    grouped = set(np.concatenate(list(groups.values())).tolist())
    assert grouped == set(range(dictionary.nspecial, len(dictionary))) - set(fillers)
    assert groups["rare"].tolist() == [11, 12]  # numbat, aye-aye: the least frequent words, not fillers
    assert not set(agg_eval.word_rows(dictionary, found).tolist()) & set(fillers)
    queries = agg_eval.choose_queries(Namespace(neighbours=None), dictionary, groups)
    assert queries and not set(queries) & set(fillers)


def test_compare_with_several_runs_per_method_gives_mean_and_sample_std(demo_evals, tmp_path):
    _, evals = demo_evals
    folders, values = [], {"MLE": [], "AGG": []}
    for method, key, shifts in (("MLE", "mle", (0.0, 3.0, -1.5)), ("AGG", "agg", (0.0, -2.0, 4.5))):
        base = json.loads((evals[key][1] / "results.json").read_text())
        for i, shift in enumerate(shifts):
            run = json.loads(json.dumps(base))
            run["ppl"]["total"]["ppl"] += shift
            run["isotropy"]["total"] = min(1.0, run["isotropy"]["total"] * (1 - 0.01 * i))
            run["isoscore"]["rare"] += 0.001 * i
            folder = tmp_path / f"{key}{i}"
            folder.mkdir()
            (folder / "results.json").write_text(json.dumps(run))
            folders.append(str(folder))
            values[method].append(run)
    out = tmp_path / "cmp"
    agg_eval.main(["compare", *folders, "--out", str(out), "--names", *["MLE"] * 3, *["AGG"] * 3])
    summary = json.loads((out / "compare.json").read_text())
    assert summary["runs"] == ["MLE", "AGG"] and "ddof=1" in summary["std"]
    text = (out / "compare.md").read_text()
    for method, runs in values.items():
        got = summary["methods"][method]["summary"]
        for label, pick in (("ppl total", lambda r: r["ppl"]["total"]["ppl"]), ("I(W) total", lambda r: r["isotropy"]["total"]),
                            ("IsoScore rare", lambda r: r["isoscore"]["rare"])):
            per_run = [pick(r) for r in runs]
            assert got[label]["values"] == per_run
            assert got[label]["mean"] == pytest.approx(np.mean(per_run), rel=1e-12)
            assert got[label]["std"] == pytest.approx(np.std(per_run, ddof=1), rel=1e-9)
        ppl = [r["ppl"]["total"]["ppl"] for r in runs]
        assert f"{np.mean(ppl):.2f} ± {np.std(ppl, ddof=1):.2f}" in text
    assert "mean ± sample standard deviation (ddof=1)" in text and "MLE 3 runs, AGG 3 runs" in text
    # runs trained otherwise cannot be one method
    other = json.loads((tmp_path / "agg0" / "results.json").read_text())
    other["trained_with"]["agg_alpha"] = 0.5
    (tmp_path / "agg1" / "results.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="trained with different settings"):
        agg_eval.main(["compare", *folders[3:], "--out", str(tmp_path / "bad"), "--names", "AGG", "AGG", "AGG"])


def _fairseq_eval_lm(workdir, name, tokens_per_sample, context_window):
    task = "language_modeling_agg" if name == "agg" else "language_modeling"
    cmd = [sys.executable, "-m", "fairseq_cli.eval_lm", str(workdir / "data-bin"),
           "--path", str(workdir / name / "checkpoint_last.pt"), "--user-dir", USER_DIR, "--task", task,
           "--gen-subset", "test", "--tokens-per-sample", str(tokens_per_sample),
           "--context-window", str(context_window), "--max-tokens", "4096", "--cpu", "--num-workers", "0"]
    log = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert log.returncode == 0, log.stderr[-2000:]
    text = log.stdout + log.stderr
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", text).group(1))
    tokens = int(re.search(r"Evaluated ([\d,]+) tokens", text).group(1).replace(",", ""))
    return loss, tokens


@pytest.mark.parametrize("name", ["mle", "agg"])
def test_group_perplexities_combine_to_fairseq_eval_lm(demo_evals, name):
    workdir, evals = demo_evals
    result, _ = evals[name]
    scoring = result["scoring"]
    loss_base2, tokens = _fairseq_eval_lm(workdir, name, scoring["tokens_per_sample"], scoring["context_window"])
    parts = [result["ppl"][g] for g in ("frequent", "medium", "rare", "other")]
    assert sum(p["tokens"] for p in parts) == tokens == result["ppl"]["total"]["tokens"]
    combined_nll = sum(p["nll_sum"] for p in parts) / tokens
    assert combined_nll / 0.6931471805599453 == pytest.approx(loss_base2, abs=1e-4)
    assert result["ppl"]["total"]["ppl"] == pytest.approx(2 ** loss_base2, rel=1e-3)


def test_uniq_and_human_are_consistent(demo_evals):
    _, evals = demo_evals
    result, _ = evals["agg"]
    for counts in (result["uniq"], result["human"]):
        assert counts["total"] == counts["frequent"] + counts["medium"] + counts["rare"]
    for group, size in result["group_sizes"].items():
        assert 0 <= result["human"][group] <= size


def test_compare_writes_the_papers_tables(demo_evals, tmp_path):
    _, evals = demo_evals
    agg_eval.main(["compare", str(evals["mle"][1]), str(evals["agg"][1]), "--out", str(tmp_path)])
    text = (tmp_path / "compare.md").read_text()
    header = "| Method | PPL Freq | PPL Med | PPL Rare | PPL Total | Uniq Freq | Uniq Med | Uniq Rare | Uniq Total | I(W) |"
    assert header in text
    assert re.search(r"^\| MLE \|", text, re.M) and re.search(r"^\| AGG \|", text, re.M)
    assert re.search(r"^\| Human \| - \| - \| - \| - \| \d+", text, re.M)
    assert "| Dataset | MLE | AGG |" in text
    for figure in ("singular_values.png", "isotropy_over_training.png", "rare_group_size.png"):
        assert (tmp_path / figure).read_bytes().startswith(PNG_MAGIC)
    agg_eval.main(["compare", str(evals["mle"][1]), str(evals["agg"][1]), "--out", str(tmp_path / "t3"),
                   "--tables", "3", "--names", "MLE", "AGG"])
    only = (tmp_path / "t3" / "compare.md").read_text()
    assert header in only and "Word similarity" not in only


def test_wrong_vocabulary_is_a_clear_error(quick_demo, lm_data, tmp_path):
    workdir, _ = quick_demo
    with pytest.raises(SystemExit, match="trained on another vocabulary"):
        agg_eval.main(["lm", str(lm_data), "--path", str(workdir / "agg" / "checkpoint_last.pt"),
                       "--out", str(tmp_path), "--cpu", "--no-progress-bar"])
    assert not (tmp_path / "results.json").exists()


def test_bad_options_are_clear_errors(quick_demo, tmp_path):
    workdir, _ = quick_demo
    base = ["lm", str(workdir / "data-bin"), "--path", str(workdir / "agg" / "checkpoint_last.pt"),
            "--out", str(tmp_path), "--cpu", "--no-progress-bar"]
    with pytest.raises(SystemExit, match="--context-window 128 must lie in"):
        agg_eval.main(base + ["--context-window", "128"])
    with pytest.raises(SystemExit, match="checkpoint .*missing.pt does not exist"):
        agg_eval.main(["lm", str(workdir / "data-bin"), "--path", str(tmp_path / "missing.pt"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected NAME=FILE"):
        agg_eval.main(base + ["--wordsim", "MEN"])
    with pytest.raises(SystemExit, match="not in the dictionary"):
        agg_eval.main(base + ["--neighbours", "no-such-token-xyz"])


def test_compare_refuses_mixed_kinds(tmp_path):
    for kind in ("lm", "mt"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "results.json").write_text(json.dumps({"kind": kind, "name": kind}))
    with pytest.raises(SystemExit, match="different kinds"):
        agg_eval.main(["compare", str(tmp_path / "lm"), str(tmp_path / "mt"), "--out", str(tmp_path / "c")])


# -- translation -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mt_eval(mt_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("mt_model")
    run_all([mt_train(mt_data, save, "--max-update", "40", "--agg-alpha", "0.08", name="mt-agg")])
    out = tmp_path_factory.mktemp("mt_eval")
    agg_eval.main(["mt", str(mt_data), "--path", str(save / "checkpoint_last.pt"), "--out", str(out),
                   "--cpu", "--subset", "valid", "--no-progress-bar", "--name", "AGG"])
    return save, out, json.loads((out / "results.json").read_text())


def test_mt_bleu_matches_sacrebleu_on_generate_output(mt_eval):
    import sacrebleu

    _, out, result = mt_eval
    hyps, refs = agg_eval.parse_generate_output(out / "generate-valid.txt")
    assert result["bleu"]["sentences"] == len(hyps) > 0
    split = [metrics.split_compounds(x) for x in hyps], [metrics.split_compounds(x) for x in refs]
    expected = sacrebleu.corpus_bleu(split[0], [split[1]], tokenize="none").score
    assert result["bleu"]["tokenized_compound_split"] == pytest.approx(expected, abs=0.005)
    assert 0.0 <= result["bleu"]["sacrebleu"] <= 100.0


def test_mt_bleu_of_a_written_generate_output_matches_sacrebleu(mt_eval, mt_data, tmp_path):
    """Hypotheses that share some words with their references, ids out of order, two
    hypotheses per id (--nbest 2: the first is the best): both BLEU scores against sacrebleu
    on the same sentences in id order, the compound split written out as in fairseq's
    compound_split_bleu.sh."""
    import sacrebleu
    from sacremoses import MosesDetokenizer

    save, _, _ = mt_eval
    refs = ["Orlando Bloom und Miranda Kerr lieben sich noch immer",
            "Schauspieler Orlando Bloom und Model Miranda Kerr wollen künftig getrennte Wege gehen .",
            "In einem Interview sagte Bloom jedoch , dass er und Kerr sich noch immer lieben .",
            "Die Mitte-Links-Regierung hat &quot; keine &quot; Mehrheit mehr .",
            "Das ist ein gutes Ergebnis für alle Beteiligten ."]
    hyps = ["Orlando Bloom und Miranda Kerr lieben sich immer noch",
            "Schauspieler Orlando Bloom und das Model Miranda Kerr gehen getrennte Wege .",
            "In einem Gespräch sagte Bloom , dass er und Kerr sich immer noch lieben .",
            "Die Mitte-Rechts-Regierung hat &quot; keine &quot; Mehrheit .",
            "Das ist ein Ergebnis für alle ."]
    lines = []
    for i in (3, 0, 4, 1, 2):
        lines += [f"S-{i}\tsource {i}", f"T-{i}\t{refs[i]}", f"H-{i}\t-0.5\t{hyps[i]}",
                  f"D-{i}\t-0.5\t{hyps[i]}", f"P-{i}\t-0.5 -0.5", f"H-{i}\t-0.9\tganz falsch"]
    generate = tmp_path / "generate-test.txt"
    generate.write_text("\n".join(lines) + "\nGenerate test with beam=4: BLEU4 = 0.00\n", encoding="utf-8")
    raw = [MosesDetokenizer(lang="de").detokenize(r.split()) for r in refs]
    reference = tmp_path / "test.raw.de"
    reference.write_text("\n".join(raw) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    agg_eval.main(["mt", str(mt_data), "--path", str(save / "checkpoint_last.pt"), "--out", str(out), "--cpu",
                   "--generate-output", str(generate), "--reference", str(reference), "--no-progress-bar"])
    bleu = json.loads((out / "results.json").read_text())["bleu"]

    def split(text):
        return re.sub(r"(\S)-(\S)", r"\1 ##AT##-##AT## \2", text)

    tokenized = sacrebleu.corpus_bleu([split(h) for h in hyps], [[split(r) for r in refs]], tokenize="none").score
    detokenized = sacrebleu.corpus_bleu([MosesDetokenizer(lang="de").detokenize(h.split()) for h in hyps], [raw]).score
    assert 20 < tokenized < 90 and 20 < detokenized < 90  # neither trivially 0 nor 100
    assert bleu["sentences"] == 5
    assert bleu["sentences_in_split"] == 40  # mt_data's test split
    assert "scores 5 of the 40 sentences of 'test' (35 left out: ids 5, 6, 7" in bleu["warning"]
    assert "**Warning:**" in (out / "report.md").read_text()
    assert bleu["tokenized_compound_split"] == pytest.approx(tokenized, abs=0.005)
    assert bleu["sacrebleu"] == pytest.approx(detokenized, abs=0.005)
    assert bleu["sacrebleu_reference"].startswith("raw reference")


def test_mt_report_neighbours_and_figures(mt_eval):
    _, out, result = mt_eval
    assert len(result["cross_lingual_neighbours"]) == 3
    assert all(len(row["neighbours"]) == 5 for row in result["cross_lingual_neighbours"])
    assert 0.0 < result["isotropy"]["total"] <= 1.0
    report = (out / "report.md").read_text()
    assert "BLEU (paper Table 7)" in report and "Cross-lingual nearest neighbours" in report
    for file in result["figures"].values():
        assert (out / file).read_bytes().startswith(PNG_MAGIC)


def test_mt_rejects_a_file_that_is_not_generate_output(mt_eval, mt_data, tmp_path):
    save, _, _ = mt_eval
    bogus = tmp_path / "bogus.txt"
    bogus.write_text("not a generate log\n")
    with pytest.raises(SystemExit, match="holds no hypotheses"):
        agg_eval.main(["mt", str(mt_data), "--path", str(save / "checkpoint_last.pt"), "--out", str(tmp_path / "o"),
                       "--generate-output", str(bogus), "--cpu"])


def test_post_hoc_remedies_reported_before_and_after(quick_demo, demo_evals):
    import torch

    from fairseq_agg import remedies
    from fairseq_agg.isotropy import isotropy

    workdir, evals = demo_evals
    result, out = evals["agg"]
    state = torch.load(workdir / "agg" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    weight = state["model"]["decoder.embed_tokens.weight"].double()
    regular = weight[4:]
    after_mean = result["post_hoc"]["mean_removal"]
    assert after_mean["geometry"]["mean_embedding_norm"] < 1e-9
    abtt = torch.cat([weight[:4], torch.as_tensor(remedies.all_but_the_top(regular, 2))])
    assert result["post_hoc"]["abtt"]["isotropy"]["total"] == pytest.approx(isotropy(abtt), rel=1e-9)
    assert result["post_hoc"]["abtt"]["label"] == "all-but-the-top (D=2)"
    report = (out / "report.md").read_text()
    assert "| AGG | as trained |" in report and "| AGG | mean removal |" in report
