"""scripts/reproduce.sh: Tables 3, 4 (and 6, from Table 3's runs) and 7 end to end in smoke
mode; the command lines of every table, parsed by fairseq; checkpoint averaging; clear errors."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fairseq_agg import average_checkpoints as avg
from fairseq_agg import reproduce
from fairseq_agg.checkpoints import seal
from fairseq_agg.fairseq_fixes import saved_counter_state
from fairseq_agg.workdir import stamp_owner

from _fairseq import REPO, USER_DIR

SCRIPT = REPO / "scripts" / "reproduce.sh"
GROUPS_HEADER = ("| Method | PPL Freq | PPL Med | PPL Rare | PPL Total | Uniq Freq | Uniq Med | Uniq Rare "
                 "| Uniq Total | I(W) |")
ISOTROPY_HEADER = "| Method | I(W) Freq | I(W) Med | I(W) Rare | I(W) total |"
BLEU_HEADER = "| Method | BLEU (tokenized, compound split) | sacreBLEU | sentences |"
TABLE7_HEADER = "| Method | BLEU base | BLEU big | sacreBLEU base | sacreBLEU big |"
STUDY_HEADER = ("| Method | PPL Freq | PPL Med | PPL Rare | PPL Total | I(W) Freq | I(W) Med | I(W) Rare "
                "| I(W) Total |")
ABLATION_HEADER = "| Method | PPL | Uniq | I(W) |"


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = time.time()
    proc = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(REPO))
    proc.seconds = time.time() - start
    return proc


def run_ok(*args):
    proc = run_script(*args)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    return proc


def section(markdown: str, heading: str) -> str:
    """The text under a '## heading' of a table file, up to the next '## '."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no '## {heading}' in:\n{markdown}"
    return match.group(1)


def table_rows(text: str, header: str):
    """Row name -> cells of the Markdown table that starts with ``header``."""
    lines = text.splitlines()
    start = lines.index(header)
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def numbers(cells):
    return [float(c) for c in cells]


# -- smoke runs end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_out(tmp_path_factory):
    """One output folder for the language-model tables: the binarized slice is made once."""
    return tmp_path_factory.mktemp("reproduce-lm")


@pytest.fixture(scope="module")
def table3(lm_out):
    proc = run_ok("3", "--smoke", "--out", lm_out)
    return proc, (lm_out / "table3.md").read_text()


def test_table3_smoke_has_the_papers_rows_and_columns(table3, lm_out):
    proc, markdown = table3
    print(f"table 3 smoke: {proc.seconds:.0f} s")
    ours = section(markdown, "Ours")
    rows = table_rows(ours, GROUPS_HEADER)
    assert list(rows) == ["MLE", "AGG", "Human"]
    for name in ("MLE", "AGG"):
        values = numbers(rows[name])
        assert all(v > 1 for v in values[:4]) and 0 < values[-1] <= 1  # perplexities, I(W)
        assert values[7] == sum(values[4:7])  # Uniq total
    assert rows["Human"][:4] == ["-"] * 4
    assert list(table_rows(ours, ISOTROPY_HEADER)) == ["MLE", "AGG"]  # Table 10
    assert "438.67" in section(markdown, "Paper") and "Smoke run" in markdown
    for link in re.findall(r"\]\(([^)]+\.png)\)", markdown):
        assert (lm_out / link).is_file(), link
    # the steps and their logs, as the progress lines say
    for step in ("smoke data: binarize", "lm_mle: train", "lm_agg: train", "lm_mle: eval", "table 3: compare"):
        assert step in proc.stdout
    results = json.loads((lm_out / "runs" / "lm_agg" / "eval" / "results.json").read_text())
    assert results["checkpoint"].endswith("lm_agg/checkpoint_best.pt")
    # later tables may replace the smoke data: --out and the data-bin carry reproduce's stamp
    assert stamp_owner(lm_out) == stamp_owner(lm_out / "data-bin" / "wikitext-2") == "fairseq_agg.reproduce"


def test_table6_reuses_the_table3_models_and_resumes_an_unfinished_one(table3, lm_out):
    run_dir = lm_out / "runs" / "lm_mle"
    stamp = run_dir / "train.json"
    finished = json.loads(stamp.read_text())

    # interrupted after its last checkpoint: nothing is left to train, and fairseq would refuse to
    stamp.write_text(json.dumps(dict(finished, finished=False)))
    proc = run_ok("6", "--smoke", "--out", lm_out)
    assert "lm_mle: train had reached --max-update before it was interrupted" in proc.stdout
    assert "lm_mle: eval done before" in proc.stdout and json.loads(stamp.read_text())["finished"]

    # interrupted half-way: the checkpoint says 10 of its 20 updates
    last = run_dir / "checkpoint_last.pt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    state["optimizer_history"][-1]["num_updates"] = 10
    torch.save(state, last)
    seal(last)
    stamp.write_text(json.dumps(dict(finished, finished=False)))
    proc = run_ok("6", "--smoke", "--out", lm_out)
    assert "lm_agg: train done before" in proc.stdout and "lm_agg: eval done before" in proc.stdout
    assert "lm_mle: train (resuming from checkpoint_last.pt)" in proc.stdout
    assert "lm_mle: eval finished" in proc.stdout  # on the resumed checkpoint
    log = (run_dir / "train.log").read_text()
    assert "Loaded checkpoint" in log and log.count("done training") == 2
    resumed = log[log.index("Loaded checkpoint"):]
    assert "num_updates=15," in resumed and "Stopping training due to num_updates: 20 >= max_update: 20" in resumed
    rows = table_rows(section((lm_out / "table6.md").read_text(), "Ours"), "| Dataset | MLE | AGG |")
    assert list(rows) == ["MEN", "WS353", "RG65", "RW"]


def paper_header(markdown: str) -> str:
    return section(markdown, "Paper").strip().splitlines()[0]


def test_tables_8_9_and_figure_5_smoke_have_the_papers_rows_and_columns(table3, lm_out):
    proc = run_ok("8", "--smoke", "--out", lm_out)
    assert "lm_mle: train done before" in proc.stdout and "lm_agg: train done before" in proc.stdout
    markdown = (lm_out / "table8.md").read_text()
    rows = table_rows(section(markdown, "Ours"), ABLATION_HEADER)
    assert list(rows) == ["MLE", "AGG", "no g1", "no g2"]
    assert all(len(numbers(cells)) == 3 for cells in rows.values())
    assert paper_header(markdown) == ABLATION_HEADER and "| no g1 | 15.48 | 13018 | 0.367 |" in markdown
    assert "'agg_no_g1': True" in (lm_out / "runs" / reproduce.LM_NO_G1.id / "train.log").read_text()

    run_ok("9", "--smoke", "--out", lm_out)
    markdown = (lm_out / "table9.md").read_text()
    assert list(table_rows(section(markdown, "Ours"), ABLATION_HEADER)) == ["MLE", "AGG", "static AGG"]
    assert paper_header(markdown) == ABLATION_HEADER and "| static AGG | 15.55 | 13614 | 0.752 |" in markdown

    run_ok("fig5", "--smoke", "--out", lm_out)
    markdown = (lm_out / "tablefig5.md").read_text()
    ours = section(markdown, "Ours")
    alphas = [f"alpha {a}" for a in reproduce.ALPHAS]
    assert list(table_rows(ours, ABLATION_HEADER)) == alphas
    assert list(table_rows(ours, GROUPS_HEADER)) == alphas + ["Human"]
    links = re.findall(r"\]\(([^)]+\.png)\)", markdown)
    assert any(link.endswith("alpha_sweep.png") for link in links)
    for link in links:
        assert (lm_out / link).is_file(), link
    for alpha in reproduce.ALPHAS:
        results = json.loads((lm_out / "runs" / reproduce.LM_ALPHA[alpha].id / "eval" / "results.json").read_text())
        assert results["trained_with"] == {**results["trained_with"], "criterion": "agg_cross_entropy",
                                           "agg_alpha": float(alpha)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-study")
    first = run_ok("1", "--smoke", "--out", out)
    second = run_ok("2", "--smoke", "--out", out)
    return out, first, second


def test_tables_1_and_2_smoke_have_the_papers_rows_and_columns(study):
    out, first, second = study
    print(f"tables 1 and 2 smoke: {first.seconds + second.seconds:.0f} s")
    assert "study_mle: train done before" in second.stdout  # Table 2 reuses Table 1's MLE run
    for key, names in (("1", ["MLE", "Freeze"]), ("2", ["MLE", "Freeze (b) & (c)", "Freeze (b)", "Freeze (c)"])):
        markdown = (out / f"table{key}.md").read_text()
        rows = table_rows(section(markdown, "Ours"), STUDY_HEADER)
        assert list(rows) == names
        for cells in rows.values():
            values = numbers(cells)
            assert all(v > 1 for v in values[:4]) and all(0 < v <= 1 for v in values[4:])
        assert paper_header(markdown) == STUDY_HEADER
        assert list(table_rows(section(markdown, "Paper"), STUDY_HEADER)) == names
    for mode in ("freeze", "detach_bc", "detach_b", "detach_c"):
        assert f"'agg_study': {mode}," in (out / "runs" / f"study_{mode}" / "train.log").read_text()


def test_static_agg_counts_one_epoch_as_the_agg_task_does(table3, lm_out):
    log = (lm_out / "runs" / "lm_agg" / "train.log").read_text()
    window = int(re.search(r"window K = (\d+) updates \(one epoch\)", log).group(1))
    tables, ctx = reproduce.parse(["9", "--smoke", "--out", str(lm_out)])
    args = reproduce.train_args(reproduce.LM_STATIC, ctx)
    assert args[args.index("--agg-static-after") + 1] == str(window)


def test_table4_smoke_has_the_papers_rows_and_columns(table3, lm_out):
    proc = run_ok("4", "--smoke", "--out", lm_out)
    print(f"table 4 smoke: {proc.seconds:.0f} s")
    markdown = (lm_out / "table4.md").read_text()
    ours = section(markdown, "Ours")
    assert list(table_rows(ours, GROUPS_HEADER)) == ["UL", "UL+AGG", "Human"]
    assert list(table_rows(ours, ISOTROPY_HEADER)) == ["UL", "UL+AGG"]  # Table 11
    assert "385.6" in section(markdown, "Paper")
    log = (lm_out / "runs" / "lm_ul_agg" / "train.log").read_text()
    assert "agg_unlikelihood" in log and "ul_loss" in log and "agg_rare" in log


def test_a_changed_command_does_not_reuse_a_trained_run(table3, lm_out):
    # both runs were; the smoke runs go two at a time, so either may be the one that says so
    with pytest.raises(SystemExit, match=r"lm_(mle|agg) in .* was trained with another command"):
        reproduce.main(["3", "--smoke", "--out", str(lm_out), "--", "--seed", "2"])


def test_a_failing_step_names_itself_and_its_log(table3, lm_out):
    proc = run_script("1", "--smoke", "--out", lm_out, "--", "--no-such-option")
    assert proc.returncode != 0
    assert re.search(r"step 'train' of study_\w+ failed \(exit \d+\); log: .*/runs/study_\w+/train\.log", proc.stderr)
    assert "--no-such-option" in proc.stderr  # the log's tail comes with it


def test_steps_are_skipped_when_done_and_refused_only_where_a_checkpoint_would_resume(tmp_path):
    _, ctx = reproduce.parse(["3", "--smoke", "--out", str(tmp_path)])
    runner = reproduce.Runner(ctx)
    folder = tmp_path / "run"
    checkpoint = folder / "checkpoint_last.pt"

    def train(code):
        return reproduce.Step("train", "fake", [sys.executable, "-c", code], folder / "train.log", checkpoint)

    with pytest.raises(SystemExit, match=r"step 'train' of fake failed \(exit 3\); log: .*run/train\.log"):
        runner.run(train("raise SystemExit(3)"))
    writes = f"open({str(checkpoint)!r}, 'w').write('a')"
    assert runner.run(train(writes))  # another command, but nothing to resume: it runs
    assert not runner.run(train(writes))  # finished with the same command: reused
    assert runner.run(train(writes), force=True)
    with pytest.raises(SystemExit, match=r"fake in .*run was trained with another command"):
        runner.run(train(writes + " # changed"))
    with pytest.raises(SystemExit, match="finished without writing"):
        runner.run(reproduce.Step("eval", "fake", [sys.executable, "-c", "pass"], folder / "eval.log",
                                  folder / "eval" / "results.json"))


@pytest.fixture(scope="module")
def table7(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce-mt")
    proc = run_ok("7", "--smoke", "--out", out)
    return proc, out


def test_table7_smoke_has_bleu_for_base_and_big(table7):
    proc, out = table7
    print(f"table 7 smoke: {proc.seconds:.0f} s")
    markdown = (out / "table7.md").read_text()
    ours = section(markdown, "Ours")
    # the paper's layout: a row per method, a column per model size
    pivot = table_rows(ours, TABLE7_HEADER)
    assert list(pivot) == ["MLE", "AGG"]
    rows = table_rows(ours, BLEU_HEADER)
    assert list(rows) == ["MLE base", "AGG base", "MLE big", "AGG big"]
    for cells in rows.values():
        assert 0 <= float(cells[0]) <= 100 and int(cells[2]) == reproduce.SMOKE_MT_LINES["test"]
    for method in ("MLE", "AGG"):
        assert pivot[method] == [rows[f"{method} base"][0], rows[f"{method} big"][0],
                                 rows[f"{method} base"][1], rows[f"{method} big"][1]]
    assert paper_header(markdown) == "| Method | BLEU base | BLEU big |" and "28.70" in section(markdown, "Paper")
    for run in ("mt_base_mle", "mt_base_agg", "mt_big_mle", "mt_big_agg"):
        results = json.loads((out / "runs" / run / "eval" / "results.json").read_text())
        assert results["checkpoint"].endswith(f"{run}/checkpoint_avg5.pt")
        generate = (out / "runs" / run / "eval" / "generate-test.txt").read_text()
        assert "Generate test with beam=4" in generate


def test_table7_averages_the_last_five_checkpoints(table7):
    _, out = table7
    folder = out / "runs" / "mt_big_agg"
    inputs = [folder / f"checkpoint_1_{u}.pt" for u in (4, 8, 12, 16, 20)]
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in inputs]
    averaged = torch.load(folder / "checkpoint_avg5.pt", map_location="cpu", weights_only=False)
    key = "decoder.embed_tokens.weight"
    expected = torch.stack([s["model"][key].double() for s in states]).mean(0)
    assert torch.allclose(averaged["model"][key].double(), expected, atol=1e-6)
    assert not torch.equal(states[0]["model"][key], states[-1]["model"][key])
    counter, newest = saved_counter_state(averaged), saved_counter_state(states[-1])
    assert counter["num_updates"] == newest["num_updates"] == 20
    assert torch.equal(counter["slot_ids"], newest["slot_ids"])
    # the big smoke model is bigger than the base one
    base = torch.load(out / "runs" / "mt_base_agg" / "checkpoint_avg5.pt", map_location="cpu", weights_only=False)
    assert base["model"][key].shape[1] == 32 and averaged["model"][key].shape[1] == 64


# -- every table's command lines -------------------------------------------------------------------

def dry_run(capsys, *argv):
    capsys.readouterr()
    assert reproduce.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [shlex.split(line) for line in out.splitlines()
                if line and not line.startswith("#") and not line.startswith("[reproduce]")]
    return out, commands


def parse_train(command):
    from fairseq import options

    args = command[command.index("fairseq_cli.train") + 1:]
    assert args[1:3] == ["--user-dir", USER_DIR]
    # before the data is there, one epoch of updates is a placeholder
    args = ["1" if a == reproduce.ONE_EPOCH else a for a in args]
    return options.parse_args_and_arch(options.get_training_parser(), args)


EXPECTED = {  # per table: (criterion, an option's value) of each run, in row order
    "1": [("cross_entropy", None), ("agg_cross_entropy", ("agg_study", "freeze"))],
    "2": [("cross_entropy", None), ("agg_cross_entropy", ("agg_study", "detach_bc")),
          ("agg_cross_entropy", ("agg_study", "detach_b")), ("agg_cross_entropy", ("agg_study", "detach_c"))],
    "3": [("cross_entropy", None), ("agg_cross_entropy", ("agg_alpha", 0.03))],
    "4": [("unlikelihood_cross_entropy", ("unlikelihood_alpha", 1.0)), ("agg_unlikelihood", ("agg_alpha", 0.03))],
    "6": [("cross_entropy", None), ("agg_cross_entropy", ("agg_alpha", 0.03))],
    "7": [("label_smoothed_cross_entropy", ("arch", "transformer_wmt_en_de")),
          ("agg_cross_entropy", ("arch", "transformer_wmt_en_de")),
          ("label_smoothed_cross_entropy", ("arch", "transformer_wmt_en_de_big")),
          ("agg_cross_entropy", ("arch", "transformer_wmt_en_de_big"))],
    "8": [("cross_entropy", None), ("agg_cross_entropy", ("agg_no_g1", False)),
          ("agg_cross_entropy", ("agg_no_g1", True)), ("agg_cross_entropy", ("agg_no_g2", True))],
    "9": [("cross_entropy", None), ("agg_cross_entropy", ("agg_static_after", None)),
          ("agg_cross_entropy", ("agg_static_after", 1))],
    "fig5": [("agg_cross_entropy", ("agg_alpha", float(a))) for a in reproduce.ALPHAS],
}


def test_every_table_is_listed():
    assert set(EXPECTED) == set(reproduce.TABLES)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_full_mode_commands_of_every_table(capsys, tmp_path, key):
    out, commands = dry_run(capsys, key, "--out", str(tmp_path / "out"),
                            "--lm-data", str(tmp_path / "wt103"), "--mt-data", str(tmp_path / "wmt"))
    assert not (tmp_path / "out").exists(), "a dry run creates nothing"
    table = reproduce.TABLES[key]
    assert "scripts/prepare-" in out  # the data is missing: said, not fatal in a dry run
    trains = [c for c in commands if "fairseq_cli.train" in c]
    evals = [c for c in commands if "fairseq_agg.eval" in c and c[c.index("fairseq_agg.eval") + 1] != "compare"]
    assert len(trains) == len(evals) == len({run.id for _, run in table.rows})
    for command, (criterion, option) in zip(trains, EXPECTED[key]):
        args = parse_train(command)
        assert args.criterion == criterion and args.fp16 and not args.cpu
        if option:
            assert getattr(args, option[0]) == option[1]
        if key in ("1", "2"):  # Table 12, empirical study
            shape = (args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim, args.decoder_attention_heads)
            assert shape == (6, 512, 2048, 8) and args.max_update == 40000
        elif key == "7":
            assert args.max_update == 190000 and args.save_interval_updates == 2000 and args.keep_interval_updates >= 5
        else:
            assert args.arch == "transformer_lm_gpt2_small" and args.max_update == 50000
    compare = commands[-1]
    assert compare[compare.index("fairseq_agg.eval") + 1] == "compare"
    names = compare[compare.index("--names") + 1:compare.index("--tables")]
    assert names == [name for name, _ in table.rows]
    assert compare[compare.index("--tables") + 1:compare.index("--out")] == list(table.compare)
    if key == "7":
        from fairseq_agg.eval import build_parser

        for command in evals:
            options = build_parser().parse_args(command[command.index("fairseq_agg.eval") + 1:])
            assert (options.command, options.beam, options.lenpen) == ("mt", 4, 0.6)
        averages = [c for c in commands if any(w.endswith("average_checkpoints.py") for w in c)]
        assert len(averages) == 4 and all(c[c.index("--num-update-checkpoints") + 1] == "5" for c in averages)
        assert all(c[c.index("--path") + 1].endswith("checkpoint_avg5.pt") for c in evals)


@pytest.mark.parametrize("key", list(EXPECTED))
def test_smoke_commands_of_every_table_are_the_full_ones_shrunk(capsys, tmp_path, key):
    _, full = dry_run(capsys, key, "--out", str(tmp_path / "full"))
    _, smoke = dry_run(capsys, key, "--smoke", "--out", str(tmp_path / "smoke"))
    smoke = [c for c in smoke if "fairseq_cli.preprocess" not in c]
    assert [c[1:3] for c in smoke] == [c[1:3] for c in full]  # the same steps, in the same order
    for small, big in zip(smoke, full):
        if "fairseq_cli.train" in small:
            args = parse_train(small)
            assert args.cpu and not args.fp16 and args.max_update == 20
            assert max(getattr(args, "decoder_embed_dim", 0), getattr(args, "encoder_embed_dim", 0)) <= 64
            assert parse_train(big).criterion == args.criterion
            # the full command line, then the options that shrink it
            config = big[big.index("--user-dir") + 2:big.index("--save-dir")]
            assert small[small.index("--user-dir") + 2:][:len(config) - 1] == [a for a in config if a != "--fp16"]


def test_all_runs_each_model_once(capsys, tmp_path):
    _, commands = dry_run(capsys, "all", "--out", str(tmp_path))
    save_dirs = [c[c.index("--save-dir") + 1] for c in commands if "fairseq_cli.train" in c]
    assert len(save_dirs) == len(set(save_dirs)) == 20
    assert sum(1 for c in commands if "compare" in c) == len(reproduce.TABLES)
    _, commands = dry_run(capsys, "all", "--smoke", "--out", str(tmp_path))
    lm, mt = [c for c in commands if "fairseq_cli.preprocess" in c]
    assert lm[lm.index("--trainpref") + 1] == str(tmp_path / "data-raw" / "wikitext-2" / "train.txt")
    assert mt[mt.index("--trainpref") + 1] == str(tmp_path / "data-raw" / "wmt14-en-de" / "train")


def test_dry_run_through_the_script_prints_the_commands(tmp_path):
    proc = run_ok("alpha", "--smoke", "--dry-run", "--out", tmp_path / "o")
    trains = [line for line in proc.stdout.splitlines() if "fairseq_cli.train" in line]
    assert [re.findall(r"--agg-alpha (\S+)", t)[-1] for t in trains] == list(reproduce.ALPHAS)
    assert not (tmp_path / "o").exists()


# -- clear errors ----------------------------------------------------------------------------------

def test_missing_full_mode_data_names_the_prepare_script(tmp_path):
    proc = run_script("3", "--lm-data", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert "bash scripts/prepare-wikitext103.sh" in proc.stderr and "--lm-data" in proc.stderr
    assert "nowhere does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_incomplete_data_is_named(tmp_path):
    (tmp_path / "wmt").mkdir()
    (tmp_path / "wmt" / "dict.en.txt").write_text("")
    with pytest.raises(SystemExit, match=r"WMT14 En-De data-bin is missing: .*wmt lacks dict\.de\.txt.*"
                                         r"bash scripts/prepare-wmt14-en-de\.sh"):
        reproduce.main(["7", "--mt-data", str(tmp_path / "wmt"), "--out", str(tmp_path / "out")])


def test_an_out_folder_reproduce_did_not_write_is_refused_in_one_line_and_left_alone(tmp_path):
    users = tmp_path / "data-bin" / "wikitext-2"
    users.mkdir(parents=True)
    (users / "dict.txt").write_text("the user's dictionary")
    proc = run_script("1", "--smoke", "--out", tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"scripts/reproduce.sh: error: {tmp_path} holds files that fairseq_agg.reproduce did not write "
        "(no .fairseq-agg-owner stamp); pass another --out or remove it yourself"]
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "data-bin", "data-bin/wikitext-2", "data-bin/wikitext-2/dict.txt"]
    assert (users / "dict.txt").read_text() == "the user's dictionary"


def test_smoke_data_in_its_own_out_folder_is_replaced_only_if_reproduce_wrote_it(tmp_path, capsys):
    out = reproduce.OWNER.claim(tmp_path / "out")  # as an earlier or interrupted run leaves it
    users = out / "data-bin" / "wmt14-en-de"
    users.mkdir(parents=True)
    (users / "dict.en.txt").write_text("the user's dictionary")
    with pytest.raises(SystemExit) as refused:
        reproduce.main(["7", "--smoke", "--out", str(out)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"scripts/reproduce.sh: error: {users} holds files that fairseq_agg.reproduce did not write "
        "(no .fairseq-agg-owner stamp); pass another --out or remove it yourself"]
    assert (users / "dict.en.txt").read_text() == "the user's dictionary"
    assert not (out / "runs").exists() and not (out / "data-raw").exists()


def test_unknown_table_lists_the_tables():
    with pytest.raises(SystemExit, match="unknown table '5'; choose one of 1, 2, 3, 4, 6, 7, 8, 9, fig5"):
        reproduce.main(["5", "--dry-run"])


# -- average_checkpoints ---------------------------------------------------------------------------

def fake_checkpoint(path: Path, update: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    state = {
        "model": {
            "decoder.embed_tokens.weight": torch.randn(6, 4, generator=generator),
            "decoder.layers.0.fc1.weight": torch.randn(3, 4, generator=generator).half(),
            "decoder.version": torch.tensor([update]),
            "agg_counter._extra_state": {"num_updates": update, "slot_ids": torch.tensor([update, 5])},
        },
        "optimizer_history": [{"num_updates": update}],
        "cfg": {"task": {"_name": "translation_agg"}},
    }
    torch.save(state, path)
    return state


def test_average_of_the_last_update_checkpoints(tmp_path):
    states = {u: fake_checkpoint(tmp_path / f"checkpoint_1_{u}.pt", u, seed=u) for u in (20, 100, 300, 4000)}
    fake_checkpoint(tmp_path / "checkpoint3.pt", 5000, seed=9)  # epoch checkpoints are not update checkpoints
    fake_checkpoint(tmp_path / "checkpoint_last.pt", 5000, seed=9)
    output = tmp_path / "avg" / "averaged.pt"
    assert avg.main(["--inputs", str(tmp_path), "--num-update-checkpoints", "3", "--output", str(output)]) == 0
    result = torch.load(output, weights_only=False)
    used = [states[u]["model"] for u in (100, 300, 4000)]  # by number: 100 is newer than 20
    for key in ("decoder.embed_tokens.weight", "decoder.layers.0.fc1.weight"):
        expected = torch.stack([m[key].double() for m in used]).mean(0)
        assert result["model"][key].dtype == torch.float32
        assert torch.allclose(result["model"][key].double(), expected, atol=1e-6)
    newest = states[4000]
    assert torch.equal(result["model"]["decoder.version"], newest["model"]["decoder.version"])
    assert result["model"]["agg_counter._extra_state"]["num_updates"] == 4000
    assert torch.equal(result["model"]["agg_counter._extra_state"]["slot_ids"], torch.tensor([4000, 5]))
    assert result["optimizer_history"] == newest["optimizer_history"]
    assert list(result["model"]) == list(newest["model"])


def test_average_of_listed_files_and_of_epoch_checkpoints(tmp_path):
    a = fake_checkpoint(tmp_path / "checkpoint1.pt", 10, seed=1)
    b = fake_checkpoint(tmp_path / "checkpoint2.pt", 20, seed=2)
    fake_checkpoint(tmp_path / "checkpoint10.pt", 30, seed=3)
    listed = avg.average_checkpoints([tmp_path / "checkpoint2.pt", tmp_path / "checkpoint1.pt"])
    key = "decoder.embed_tokens.weight"
    assert torch.allclose(listed["model"][key], (a["model"][key] + b["model"][key]) / 2)
    assert listed["model"]["agg_counter._extra_state"]["num_updates"] == 20  # the first listed is the newest
    assert avg.last_checkpoints(tmp_path, 2, by_update=False) == [tmp_path / "checkpoint10.pt", tmp_path / "checkpoint2.pt"]


def test_average_refuses_too_few_or_mismatched_checkpoints(tmp_path):
    fake_checkpoint(tmp_path / "checkpoint_1_10.pt", 10, seed=1)
    with pytest.raises(SystemExit, match=r"holds 1 checkpoint_<epoch>_<update>\.pt .*fewer than the 5"):
        avg.main(["--inputs", str(tmp_path), "--num-update-checkpoints", "5", "--output", str(tmp_path / "o.pt")])
    other = fake_checkpoint(tmp_path / "other.pt", 20, seed=2)
    other["model"]["extra.weight"] = torch.zeros(1)
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other model entries"):
        avg.average_checkpoints([tmp_path / "other.pt", tmp_path / "checkpoint_1_10.pt"])
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("option", ["--num-update-checkpoints", "--num-epoch-checkpoints"])
def test_a_count_of_zero_checkpoints_is_named_as_such(tmp_path, option):
    args = avg.build_parser().parse_args(["--inputs", str(tmp_path), option, "0", "--output", str(tmp_path / "a.pt")])
    with pytest.raises(avg.AverageError, match=f"^average_checkpoints: {option} must be a positive number of checkpoints, got 0$"):
        avg.resolve_inputs(args)
