"""Reproduce the paper's tables: train a table's runs, evaluate them, write DIR/table<N>.md.

    scripts/reproduce.sh TABLE [--smoke] [--out DIR] [--dry-run] [--jobs N] [-- FAIRSEQ-TRAIN OPTIONS]

(also ``python -m fairseq_agg.reproduce``). TABLE is 1, 2, 3, 4, 6, 7, 8, 9, fig5 (the alpha
sweep of Figure 5; also ``alpha``) or ``all``. A table is a list of runs, each a row of the
paper's table; a run is a configuration file of ``configs/`` plus a few options. Every run goes
through the same steps:

    train    python -m fairseq_cli.train DATA --user-dir fairseq_agg $(configs/X.args) OPTIONS
    average  python fairseq_agg/average_checkpoints.py ... (translation: the last 5 checkpoints)
    eval     python -m fairseq_agg.eval lm|mt DATA --path CHECKPOINT --out DIR/runs/RUN/eval

and the table ends with ``python -m fairseq_agg.eval compare ... --tables N``, whose tables go
to DIR/table<N>.md next to the paper's numbers. Runs live in DIR/runs/RUN and are shared between
tables (Table 6 evaluates Table 3's models, Tables 8 and 9 reuse its MLE and AGG rows): a step
that finished with the same command is not redone, and an interrupted training resumes from its
checkpoint_last.pt. DIR must be new, empty or an earlier reproduction's (it carries the
``.fairseq-agg-owner`` stamp); any other is refused in one line before any work starts.

Full mode reads the data-bin folders of scripts/prepare-wikitext103.sh and
scripts/prepare-wmt14-en-de.sh and expects a GPU. ``--smoke`` runs the same steps on CPU with
the same configuration files, followed by options that shrink them: tiny models (2 layers, d=32;
the big translation model d=64), 20 updates, and the shipped corpora (data/wikitext-2,
data/wmt14-en-de-sample), sliced and binarized into DIR/data-bin; its numbers mean nothing, it
checks the pipeline.
"""

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from fairseq_agg.errors import AggConfigError
from fairseq_agg.workdir import Owner

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
CONFIG_DIR = REPO_DIR / "configs"
SHIPPED_DATA = REPO_DIR / "data"

# An option value only known once the data is there: the updates of one training epoch.
ONE_EPOCH = "<updates-in-one-epoch>"
ONE_EPOCH_PROBE = "1"  # stands in for it while fairseq parses the command line to count the epoch

LM_PREPARE = "bash scripts/prepare-wikitext103.sh"
MT_PREPARE = "bash scripts/prepare-wmt14-en-de.sh"

# --out must be new, empty or an earlier reproduction's; the smoke data-bins in it are replaced
# only when they carry its stamp.
OWNER = Owner("fairseq_agg.reproduce", "--out")


class ReproduceError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"reproduce: {message}")


# -- what a table is -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """Runs of one kind of model: the data they train on, which checkpoint is evaluated, and
    the options that shrink them in --smoke mode (appended after the configuration, so they win)."""
    kind: str  # "lm" or "mt": the data set and the fairseq_agg.eval subcommand
    evaluated: str  # checkpoint file of the save directory that is evaluated
    average_last: int  # checkpoints averaged into `evaluated` first (0: none)
    smoke: Tuple[str, ...]


SMOKE_SCHEDULE = ("--max-update", "20", "--warmup-updates", "5", "--log-interval", "5", "--num-workers", "0")
LM = Family("lm", "checkpoint_best.pt", 0, smoke=(
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--max-tokens", "512", "--update-freq", "1",
    *SMOKE_SCHEDULE))
# 20 updates, a checkpoint every 4: five to average, as in full mode (every 2000 of 190k). The
# shipped sentences have at most 70 words; 80 positions also stop the untrained models' beam
# search after 79 tokens instead of 200.
MT_SMOKE_SCHEDULE = ("--max-tokens", "1024", "--update-freq", "1", "--save-interval-updates", "4",
                     "--max-source-positions", "80", "--max-target-positions", "80", *SMOKE_SCHEDULE)


def _mt_smoke_shape(dim: int, heads: int) -> Tuple[str, ...]:
    return ("--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", str(dim), "--decoder-embed-dim", str(dim),
            "--encoder-ffn-embed-dim", str(2 * dim), "--decoder-ffn-embed-dim", str(2 * dim),
            "--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads))


MT_BASE = Family("mt", "checkpoint_avg5.pt", 5, smoke=_mt_smoke_shape(32, 2) + MT_SMOKE_SCHEDULE)
MT_BIG = Family("mt", "checkpoint_avg5.pt", 5, smoke=_mt_smoke_shape(64, 4) + MT_SMOKE_SCHEDULE)


@dataclass(frozen=True)
class Run:
    """One trained model: DIR/runs/<id>, trained with configs/<config> followed by ``options``."""
    id: str
    family: Family
    config: str
    options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    key: str
    title: str
    rows: Tuple[Tuple[str, Run], ...]  # (row name in the table, run)
    compare: Tuple[str, ...]  # fairseq_agg.eval compare --tables
    paper: str  # the paper's numbers, Markdown


LM_MLE = Run("lm_mle", LM, "lm_mle.args")
LM_AGG = Run("lm_agg", LM, "lm_agg.args")
LM_UL = Run("lm_ul", LM, "lm_ul.args")
# configs/lm_agg_*.args would have to be agg_cross_entropy (tests/test_configs.py): UL+AGG is the UL recipe with AGG's criterion
LM_UL_AGG = Run("lm_ul_agg", LM, "lm_ul.args", ("--criterion", "agg_unlikelihood", "--agg-alpha", "0.03"))
LM_NO_G1 = Run("lm_agg_no_g1", LM, "lm_agg.args", ("--agg-no-g1",))
LM_NO_G2 = Run("lm_agg_no_g2", LM, "lm_agg.args", ("--agg-no-g2",))
# the paper fixes the rare group "after 1 epoch"
LM_STATIC = Run("lm_agg_static", LM, "lm_agg.args", ("--agg-static-after", ONE_EPOCH))
ALPHAS = ("0.01", "0.02", "0.03", "0.04", "0.05")  # the paper's search grid
LM_ALPHA = {a: LM_AGG if a == "0.03" else Run(f"lm_agg_alpha{a}", LM, "lm_agg.args", ("--agg-alpha", a))
            for a in ALPHAS}

STUDY_CONFIG = "study/lm_6layer_mle.args"
STUDY_MLE = Run("study_mle", LM, STUDY_CONFIG)


def study_run(mode: str) -> Run:
    return Run(f"study_{mode}", LM, STUDY_CONFIG, ("--criterion", "agg_cross_entropy", "--agg-study", mode))


MT_BASE_MLE = Run("mt_base_mle", MT_BASE, "mt_base_mle.args")
MT_BASE_AGG = Run("mt_base_agg", MT_BASE, "mt_base_agg.args")
MT_BIG_MLE = Run("mt_big_mle", MT_BIG, "mt_big_mle.args")
MT_BIG_AGG = Run("mt_big_agg", MT_BIG, "mt_big_agg.args")

_STUDY_HEAD = ("| Method | PPL Freq | PPL Med | PPL Rare | PPL Total | I(W) Freq | I(W) Med | I(W) Rare | I(W) Total |\n"
               "|:---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
               "| MLE | 16.58 | 224.24 | 813.76 | 20.77 | 0.426 | 0.286 | 0.198 | 0.293 |\n")
_GROUPS_HEAD = ("| Method | PPL Freq | PPL Med | PPL Rare | PPL Total | Uniq Freq | Uniq Med | Uniq Rare | Uniq Total | I(W) |\n"
                "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
_HUMAN = "| Human | - | - | - | - | 10844 | 7146 | 300 | 18920 | - |\n"
_ABLATION_HEAD = ("| Method | PPL | Uniq | I(W) |\n|:---|---:|---:|---:|\n"
                  "| MLE | 15.51 | 13143 | 0.377 |\n| AGG | 15.51 | 13737 | 0.813 |\n")

TABLES: "OrderedDict[str, Table]" = OrderedDict((t.key, t) for t in (
    Table("1", "Freezing the rare-token embeddings (6-layer study model, WikiText-103)",
          (("MLE", STUDY_MLE), ("Freeze", study_run("freeze"))), ("1",),
          _STUDY_HEAD + "| Freeze | 16.48 | 233.92 | 3017.53 | 20.78 | 0.840 | 0.651 | 0.831 | 0.739 |\n"),
    Table("2", "Freezing parts (b) and (c) of the rare-token gradient (6-layer study model, WikiText-103)",
          (("MLE", STUDY_MLE), ("Freeze (b) & (c)", study_run("detach_bc")), ("Freeze (b)", study_run("detach_b")),
           ("Freeze (c)", study_run("detach_c"))), ("2",),
          _STUDY_HEAD + "| Freeze (b) & (c) | 17.41 | 247.89 | 66.41 | 21.79 | 0.323 | 0.693 | 0.551 | 0.536 |\n"
          "| Freeze (b) | 16.99 | 240.72 | 65.76 | 21.26 | 0.495 | 0.561 | 0.678 | 0.748 |\n"
          "| Freeze (c) | 16.61 | 220.07 | 645.24 | 20.76 | 0.443 | 0.276 | 0.15 | 0.317 |\n"),
    Table("3", "MLE vs AGG, WikiText-103 language modelling (with Table 10, I(W) per group)",
          (("MLE", LM_MLE), ("AGG", LM_AGG)), ("3", "10"),
          _GROUPS_HEAD + "| MLE | 13.30 | 146.47 | 438.67 | 15.51 | 9107 | 3945 | 91 | 13143 | 0.377 |\n"
          "| AGG | 13.35 | 146.44 | 75.39 | 15.51 | 9105 | 4287 | 345 | 13737 | 0.813 |\n" + _HUMAN +
          "\nTable 10:\n\n| Method | I(W) Freq | I(W) Med | I(W) Rare |\n|:---|---:|---:|---:|\n"
          "| MLE | 0.51 | 0.33 | 0.278 |\n| AGG | 0.702 | 0.714 | 0.813 |\n"),
    Table("4", "UL vs UL+AGG, WikiText-103 language modelling (with Table 11, I(W) per group)",
          (("UL", LM_UL), ("UL+AGG", LM_UL_AGG)), ("4", "11"),
          _GROUPS_HEAD + "| UL | 14.05 | 125.17 | 385.6 | 16.17 | 9527 | 4402 | 97 | 14026 | 0.396 |\n"
          "| UL+AGG | 14.17 | 125.93 | 71.48 | 16.25 | 9625 | 4884 | 453 | 14962 | 0.654 |\n" + _HUMAN +
          "\nTable 11:\n\n| Method | I(W) Freq | I(W) Med | I(W) Rare |\n|:---|---:|---:|---:|\n"
          "| UL | 0.533 | 0.351 | 0.293 |\n| UL+AGG | 0.731 | 0.626 | 0.696 |\n"),
    Table("6", "Word similarity of the Table 3 models (Spearman rho x 100)",
          (("MLE", LM_MLE), ("AGG", LM_AGG)), ("6",),
          "| Dataset | MLE | AGG |\n|:---|---:|---:|\n| MEN | 33.57 | 55.13 |\n| WS353 | 47.51 | 56.54 |\n"
          "| RG65 | 35.48 | 65.45 |\n| RW | 32.13 | 36.36 |\n"),
    Table("7", "WMT14 En-De BLEU, Transformer base and big (average of the last 5 checkpoints, beam 4, lenpen 0.6)",
          (("MLE base", MT_BASE_MLE), ("AGG base", MT_BASE_AGG), ("MLE big", MT_BIG_MLE), ("AGG big", MT_BIG_AGG)),
          ("7",),
          "| Method | BLEU base | BLEU big |\n|:---|---:|---:|\n| Transformer (MLE) | 27.30 | 28.40 |\n"
          "| CosReg | 28.38 | 28.94 |\n| Adv MLE | 28.43 | 29.52 |\n| SC | 28.45 | 29.32 |\n| AGG | 28.70 | 29.81 |\n"),
    Table("8", "Ablation of the gates g1 and g2 (WikiText-103)",
          (("MLE", LM_MLE), ("AGG", LM_AGG), ("no g1", LM_NO_G1), ("no g2", LM_NO_G2)), ("8",),
          _ABLATION_HEAD + "| no g1 | 15.48 | 13018 | 0.367 |\n| no g2 | 15.51 | 13682 | 0.701 |\n"),
    Table("9", "Dynamic vs static rare-token grouping (static: the group fixed after one epoch; WikiText-103)",
          (("MLE", LM_MLE), ("AGG", LM_AGG), ("static AGG", LM_STATIC)), ("9",),
          _ABLATION_HEAD + "| static AGG | 15.55 | 13614 | 0.752 |\n"),
    Table("fig5", "Sensitivity to alpha (Figure 5; WikiText-103)",
          tuple((f"alpha {a}", LM_ALPHA[a]) for a in ALPHAS), ("ablation", "groups"),
          "Figure 5 is a plot (PPL, Uniq and I(W) against alpha in {0.01, ..., 0.05}); the paper gives no numbers.\n"),
))
TABLE_ALIASES = {"alpha": "fig5", "figure5": "fig5"}


# -- command lines ---------------------------------------------------------------------------------

def read_config(name: str) -> List[str]:
    """The fairseq-train options of configs/<name>: one option per line, '#' starts a comment."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise ReproduceError(f"configuration {path} does not exist")
    words: List[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.lstrip().startswith("#"):
            words += shlex.split(line)
    return words


def updates_per_epoch(data: Path, train_args: Sequence[str]) -> int:
    """The updates in one epoch of a training run on one GPU, counted from the batches that
    fairseq-train makes of the train split (the number the AGG task logs as its default window
    K). Counted by fairseq itself: it drops blocks that do not fit, which a count from the
    token total misses."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        parser, [str(data), "--user-dir", str(PACKAGE_DIR), *train_args]))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset(cfg.dataset.train_subset, combine=True, epoch=1)
    # the model's limit equals the task's for fairseq's language models (--tokens-per-sample)
    itr = task.get_batch_iterator(
        dataset=task.dataset(cfg.dataset.train_subset), max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), cfg.dataset.max_tokens),
        ignore_invalid_inputs=True, required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed, num_workers=0, epoch=1)
    return math.ceil(len(itr) / cfg.optimization.update_freq[0])


@dataclass
class Context:
    out: Path
    smoke: bool
    cpu: bool
    dry_run: bool
    jobs: int
    lm_data: Path
    mt_data: Path
    extra_train: List[str]
    python: str = sys.executable

    def data(self, run: Run) -> Path:
        return self.lm_data if run.family.kind == "lm" else self.mt_data

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.id


def train_args(run: Run, ctx: Context) -> List[str]:
    args = read_config(run.config) + list(run.options)
    if ctx.smoke:
        args += run.family.smoke
    if ctx.cpu:
        args = [a for a in args if a != "--fp16"] + ["--cpu"]  # fp16 training needs a GPU
    args += ["--save-dir", str(ctx.run_dir(run)), "--log-format", "simple"] + ctx.extra_train
    if ONE_EPOCH in args:
        data = ctx.data(run)
        if (data / "train.idx").is_file():
            counted = updates_per_epoch(data, [ONE_EPOCH_PROBE if a == ONE_EPOCH else a for a in args])
            args = [str(counted) if a == ONE_EPOCH else a for a in args]
        elif not ctx.dry_run:
            raise ReproduceError(f"{data} has no train split to count one epoch of updates in")
    return args


# Evaluation sizes in smoke mode: a few short continuations instead of 100 of 50 + 100 tokens.
SMOKE_LM_EVAL = ("--num-texts", "4", "--prefix-len", "16", "--gen-len", "16", "--max-hidden-states", "500")


@dataclass
class Step:
    what: str  # "binarize", "train", "average", "eval", "compare"
    who: str  # a run id, "table N" or "smoke data"
    command: List[str]
    log: Path
    done_when: Path  # the step's output; its absence means the step has to run
    before: Optional[Callable[[], None]] = None  # work in this process before the command (slicing data)
    note: str = ""  # printed with the command in --dry-run

    @property
    def stamp(self) -> Path:
        return self.log.with_suffix(".json")


def run_steps(run: Run, ctx: Context) -> List[Step]:
    folder = ctx.run_dir(run)
    data = ctx.data(run)
    steps = [Step("train", run.id,
                  [ctx.python, "-m", "fairseq_cli.train", str(data), "--user-dir", str(PACKAGE_DIR),
                   *train_args(run, ctx)],
                  folder / "train.log", folder / "checkpoint_last.pt",
                  note=f"configs/{run.config}" + (f" + {' '.join(run.options)}" if run.options else ""))]
    checkpoint = folder / run.family.evaluated
    if run.family.average_last:
        steps.append(Step("average", run.id,
                          # by path: `-m` would import the package, and with it fairseq, for nothing
                          [ctx.python, str(PACKAGE_DIR / "average_checkpoints.py"), "--inputs", str(folder),
                           "--num-update-checkpoints", str(run.family.average_last), "--output", str(checkpoint)],
                          folder / "average.log", checkpoint))
    command = [ctx.python, "-m", "fairseq_agg.eval", run.family.kind, str(data), "--path", str(checkpoint),
               "--out", str(folder / "eval"), "--name", run.id, "--no-progress-bar"]
    if ctx.cpu:
        command.append("--cpu")
    if run.family.kind == "mt" and (data / "test.raw.de").is_file():
        # written by scripts/prepare-wmt14-en-de.sh: detokenized sacreBLEU against the raw test set
        command += ["--reference", str(data / "test.raw.de")]
    if run.family.kind == "lm" and ctx.smoke:
        command += SMOKE_LM_EVAL
    steps.append(Step("eval", run.id, command, folder / "eval.log", folder / "eval" / "results.json"))
    return steps


def compare_step(table: Table, ctx: Context) -> Step:
    out = ctx.out / "compare" / f"table{table.key}"
    return Step("compare", f"table {table.key}",
                [ctx.python, "-m", "fairseq_agg.eval", "compare",
                 *(str(ctx.run_dir(run) / "eval") for _, run in table.rows),
                 "--names", *(name for name, _ in table.rows), "--tables", *table.compare, "--out", str(out)],
                out / "compare.log", out / "compare.md")


# -- smoke data ------------------------------------------------------------------------------------

# Slices of the shipped corpora: 20 updates stay inside the first epoch (so the translation runs
# keep all five interval checkpoints), evaluation takes seconds.
SMOKE_LM_LINES = {"train": 1500, "valid": 100, "test": 100}
SMOKE_MT_LINES = {"train": 1500, "valid": 24, "test": 24}
SMOKE_VOCAB = 2000


def _head(src: Path, dst: Path, lines: int) -> None:
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= lines:
                break
            fout.write(line)


def smoke_data_steps(kinds: Sequence[str], ctx: Context) -> List[Step]:
    steps = []
    preprocess = [ctx.python, "-m", "fairseq_cli.preprocess", "--workers", "1", "--padding-factor", "1",
                  "--nwordssrc", str(SMOKE_VOCAB)]
    if "lm" in kinds:
        lm_raw = ctx.out / "data-raw" / "wikitext-2"

        def slice_lm() -> None:
            OWNER.replace(ctx.lm_data)  # fairseq-preprocess refuses an existing dictionary
            lm_raw.mkdir(parents=True, exist_ok=True)
            for split, lines in SMOKE_LM_LINES.items():
                _head(SHIPPED_DATA / "wikitext-2" / f"wiki.{split}.tokens", lm_raw / f"{split}.txt", lines)

        steps.append(Step("binarize", "smoke data",
                          [*preprocess, "--only-source", "--trainpref", str(lm_raw / "train.txt"),
                           "--validpref", str(lm_raw / "valid.txt"), "--testpref", str(lm_raw / "test.txt"),
                           "--destdir", str(ctx.lm_data)],
                          ctx.out / "data-bin" / "wikitext-2.log", ctx.lm_data / "test.idx", before=slice_lm,
                          note="after copying the first " + ", ".join(f"{n} lines of wiki.{s}.tokens"
                                                                      for s, n in SMOKE_LM_LINES.items())
                          + f" from data/wikitext-2 to {lm_raw}"))
    if "mt" in kinds:
        mt_raw = ctx.out / "data-raw" / "wmt14-en-de"

        def slice_mt() -> None:
            OWNER.replace(ctx.mt_data)
            mt_raw.mkdir(parents=True, exist_ok=True)
            for split, lines in SMOKE_MT_LINES.items():
                for lang in ("en", "de"):
                    _head(SHIPPED_DATA / "wmt14-en-de-sample" / f"{split}.{lang}", mt_raw / f"{split}.{lang}", lines)

        steps.append(Step("binarize", "smoke data",
                          [*preprocess, "--source-lang", "en", "--target-lang", "de", "--joined-dictionary",
                           "--trainpref", str(mt_raw / "train"), "--validpref", str(mt_raw / "valid"),
                           "--testpref", str(mt_raw / "test"), "--destdir", str(ctx.mt_data)],
                          ctx.out / "data-bin" / "wmt14-en-de.log", ctx.mt_data / "test.en-de.de.idx", before=slice_mt,
                          note="after copying the first " + ", ".join(f"{n} pairs of {s}"
                                                                      for s, n in SMOKE_MT_LINES.items())
                          + f" from data/wmt14-en-de-sample to {mt_raw}"))
    return steps


# -- full-mode data --------------------------------------------------------------------------------

def missing_files(kind: str, data: Path) -> List[str]:
    if kind == "lm":
        needed = ["dict.txt"] + [f"{s}.{e}" for s in ("train", "valid", "test") for e in ("bin", "idx")]
    else:
        needed = ["dict.en.txt", "dict.de.txt"] + [f"{s}.en-de.{l}.{e}" for s in ("train", "valid", "test")
                                                   for l in ("en", "de") for e in ("bin", "idx")]
    return [name for name in needed if not (data / name).is_file()]


def data_problem(kind: str, data: Path, option: str) -> Optional[str]:
    corpus, prepare = ("WikiText-103", LM_PREPARE) if kind == "lm" else ("WMT14 En-De", MT_PREPARE)
    if not data.is_dir():
        what = f"{data} does not exist"
    else:
        missing = missing_files(kind, data)
        if not missing:
            return None
        what = f"{data} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
    return (f"the {corpus} data-bin is missing: {what}. Prepare it with `{prepare}` "
            f"(or pass {option} DIR); --smoke runs on the shipped data instead.")


# -- running ---------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"[reproduce] {message}", flush=True)


class Runner:
    """Runs steps as subprocesses, their output in their log files; skips a step whose stamp
    (the command, stored next to the log) shows it already finished with the same command."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.lock = threading.Lock()
        self.active: Dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), self.env.get("PYTHONPATH")) if p)
        if ctx.jobs > 1:  # side-by-side runs share the cores instead of each taking all of them
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                self.env.setdefault(var, str(max(1, (os.cpu_count() or 1) // ctx.jobs)))

    def _read_stamp(self, step: Step) -> Optional[Dict]:
        if not step.stamp.is_file():
            return None
        try:
            return json.loads(step.stamp.read_text(encoding="utf-8"))
        except ValueError:
            return None

    @staticmethod
    def _same_command(stamp: Dict, step: Step) -> bool:
        # the interpreter's path (python, python3, a venv's) is no part of what a step computes
        return (stamp.get("command") or [None])[1:] == step.command[1:]

    @staticmethod
    def _reached_max_update(step: Step) -> bool:
        from fairseq_agg.checkpoints import training_progress

        given = [value for option, value in zip(step.command, step.command[1:]) if option == "--max-update"]
        try:
            max_update = int(given[-1])  # argparse: the last one given wins (a --smoke schedule over a config's)
        except (ValueError, IndexError):
            return False
        progress = training_progress(step.done_when)
        return progress is not None and 0 < max_update <= progress.num_updates

    def run(self, step: Step, force: bool = False) -> bool:
        """Runs the step unless it is done; True if it ran."""
        stamp = self._read_stamp(step)
        same = stamp is not None and self._same_command(stamp, step)
        trained = (step.log.parent / "checkpoint_last.pt").is_file()
        if stamp is not None and not same and step.what == "train" and trained:  # fairseq would resume it
            raise ReproduceError(
                f"{step.who} in {step.log.parent} was trained with another command (see {step.stamp}); "
                f"remove {step.log.parent} to train it again, or use another --out")
        if same and stamp.get("finished") and step.done_when.is_file() and not force:
            say(f"{step.who}: {step.what} done before, reusing {step.done_when}")
            return False
        resuming = step.what == "train" and trained
        if resuming and same and not force and self._reached_max_update(step):
            # interrupted between its last checkpoint and its stamp: fairseq would refuse to train on
            step.stamp.write_text(json.dumps(dict(stamp, finished=True), indent=1) + "\n")
            say(f"{step.who}: train had reached --max-update before it was interrupted, reusing {step.done_when}")
            return False
        step.log.parent.mkdir(parents=True, exist_ok=True)
        if step.before:
            step.before()
        step.stamp.write_text(json.dumps({"command": step.command, "finished": False}, indent=1) + "\n")
        say(f"{step.who}: {step.what}{' (resuming from checkpoint_last.pt)' if resuming else ''}, log {step.log}")
        start = time.time()
        with open(step.log, "a" if resuming else "w", encoding="utf-8") as log:
            log.write("$ " + shlex.join(step.command) + "\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    raise ReproduceError("stopped after another step failed")
                proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
                self.active[proc.pid] = proc
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C: the step runs in its own session and would outlive us
                self._terminate(proc)
                raise
            finally:
                with self.lock:
                    self.active.pop(proc.pid, None)
        if rc != 0:
            tail = "\n".join(step.log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
            raise ReproduceError(f"step '{step.what}' of {step.who} failed (exit {rc}); log: {step.log}\n{tail}")
        if not step.done_when.is_file():
            raise ReproduceError(f"step '{step.what}' of {step.who} finished without writing {step.done_when}; "
                                 f"log: {step.log}")
        step.stamp.write_text(json.dumps({"command": step.command, "finished": True,
                                          "seconds": round(time.time() - start, 1)}, indent=1) + "\n")
        say(f"{step.who}: {step.what} finished in {time.time() - start:.0f} s")
        return True

    def run_chain(self, steps: Sequence[Step]) -> None:
        """Steps of one run in order; a step that ran makes the later ones run again."""
        ran = False
        for step in steps:
            ran = self.run(step, force=ran) or ran
        if steps and steps[-1].what == "eval":
            summary = [l for l in steps[-1].log.read_text(encoding="utf-8", errors="replace").splitlines()
                       if l.startswith(f"{steps[0].who}: ")]
            if summary:
                say(summary[-1])

    @staticmethod
    def _terminate(proc: subprocess.Popen) -> None:
        """The step's process and what it started (fairseq-agg-eval runs fairseq-generate)."""
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        with self.lock:
            self.stopping = True
            for proc in self.active.values():  # only the processes this runner started
                self._terminate(proc)

    def run_parallel(self, chains: Sequence[Sequence[Step]]) -> None:
        if self.ctx.jobs <= 1 or len(chains) <= 1:
            for chain in chains:
                self.run_chain(chain)
            return
        with ThreadPoolExecutor(max_workers=self.ctx.jobs) as pool:
            futures = [pool.submit(self.run_chain, chain) for chain in chains]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:
                self.stop_all()
                raise
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self.stop_all()
                for f in futures:
                    f.cancel()
                raise failed[0].exception()


def table_markdown(table: Table, ctx: Context, compare_out: Path) -> str:
    body = (compare_out / "compare.md").read_text(encoding="utf-8").splitlines()
    body = [l for l in body if not l.startswith("# Comparison")]
    while body and not body[0].strip():
        body.pop(0)
    # the figures lie next to compare.md, not next to tableN.md
    rel = compare_out.relative_to(ctx.out).as_posix()
    body = [re.sub(r"\]\(([^)/]+\.png)\)", lambda m: f"]({rel}/{m.group(1)})", l) for l in body]
    lines = [f"# Table {table.key}: {table.title}" if table.key != "fig5" else f"# {table.title}", ""]
    if ctx.smoke:
        lines += ["**Smoke run**: tiny models, 20 updates, the shipped data slices. The numbers check the "
                  "pipeline and say nothing about the method.", ""]
    lines += ["Runs (`" + ctx.out.as_posix() + "/runs/...`): " + "; ".join(
        f"{name} = `{run.id}` (configs/{run.config}{(' ' + ' '.join(run.options)) if run.options else ''})"
        for name, run in table.rows), "", "## Ours", ""]
    lines += [l.replace("## ", "### ", 1) if l.startswith("## ") else l for l in body]
    lines += ["", "## Paper", "", table.paper.rstrip("\n"), ""]
    return "\n".join(lines)


def unique_runs(tables: Sequence[Table]) -> List[Run]:
    runs: "OrderedDict[str, Run]" = OrderedDict()
    for table in tables:
        for _, run in table.rows:
            if run.id in runs and runs[run.id] != run:
                raise AssertionError(f"two different runs are called {run.id}")
            runs[run.id] = run
    return list(runs.values())


def reproduce(tables: Sequence[Table], ctx: Context) -> List[Path]:
    runs = unique_runs(tables)
    kinds = sorted({run.family.kind for run in runs})
    say(f"{'smoke ' if ctx.smoke else ''}tables {', '.join(t.key for t in tables)}: "
        f"{len(runs)} runs ({', '.join(r.id for r in runs)}) in {ctx.out}")
    smoke_data_bins = [ctx.lm_data if kind == "lm" else ctx.mt_data for kind in kinds] if ctx.smoke else []
    OWNER.refuse_unless_ours(ctx.out, *smoke_data_bins)  # a dry run says so too
    if not ctx.smoke:
        for kind in kinds:
            data, option = (ctx.lm_data, "--lm-data") if kind == "lm" else (ctx.mt_data, "--mt-data")
            problem = data_problem(kind, data, option)
            if problem and not ctx.dry_run:
                raise ReproduceError(problem)
            if problem:
                print(f"# note: {problem}")
    if not ctx.cpu and not ctx.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise ReproduceError("no CUDA GPU here: the full runs need one (--smoke checks the pipeline on CPU; "
                                 "--cpu trains the full models on CPU anyway)")
    if not ctx.dry_run:  # which writes nothing
        OWNER.claim(ctx.out)
    runner = Runner(ctx)
    data_steps = smoke_data_steps(kinds, ctx) if ctx.smoke else []
    if ctx.dry_run:
        for step in data_steps:
            print_step(step)
    else:
        for step in data_steps:
            runner.run(step)
    chains = [run_steps(run, ctx) for run in runs]  # after binarizing: one epoch is counted in the data
    if ctx.dry_run:
        for chain in chains:
            for step in chain:
                print_step(step)
        for table in tables:
            print_step(compare_step(table, ctx))
        return []
    runner.run_parallel(chains)
    written = []
    for table in tables:
        step = compare_step(table, ctx)
        runner.run(step, force=True)
        target = ctx.out / f"table{table.key}.md"
        target.write_text(table_markdown(table, ctx, step.done_when.parent), encoding="utf-8")
        say(f"table {table.key}: wrote {target}")
        written.append(target)
    return written


def print_step(step: Step) -> None:
    print(f"# {step.who}: {step.what}" + (f" ({step.note})" if step.note else "") + f"; log {step.log}")
    print(shlex.join(step.command))


# -- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/reproduce.sh", description=__doc__.split("\n\n")[0],
                                epilog="Options after `--` are appended to every fairseq-train command "
                                "(e.g. `-- --max-tokens 4096 --update-freq 8` on a smaller GPU).",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help=f"one of {', '.join(TABLES)}, alpha (= fig5) or all")
    p.add_argument("--smoke", action="store_true",
                   help="tiny models, 20 updates, the shipped data, on CPU: checks the pipeline in minutes")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder: a new or empty one, or an earlier reproduction's (default: runs/reproduce, "
                   "or runs/reproduce-smoke with --smoke)")
    p.add_argument("--lm-data", type=Path, default=Path("data-bin/wikitext-103"), metavar="DIR",
                   help=f"WikiText-103 data-bin of `{LM_PREPARE}` (default: %(default)s)")
    p.add_argument("--mt-data", type=Path, default=Path("data-bin/wmt14_en_de"), metavar="DIR",
                   help=f"WMT14 En-De data-bin of `{MT_PREPARE}` (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs trained side by side (default: 1, or 2 with --smoke)")
    p.add_argument("--cpu", action="store_true", help="train and evaluate on CPU, without --fp16 (implied by --smoke)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def parse(argv: Sequence[str]) -> Tuple[List[Table], Context]:
    argv = list(argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    key = TABLE_ALIASES.get(args.table, args.table)
    if args.table == "all":
        tables = list(TABLES.values())
    elif key in TABLES:
        tables = [TABLES[key]]
    else:
        extra_note = " (Table 5 is the generation examples: see the eval reports of the Table 3 runs)" if args.table == "5" else ""
        raise ReproduceError(f"unknown table {args.table!r}; choose one of {', '.join(TABLES)}, alpha or all{extra_note}")
    jobs = args.jobs if args.jobs is not None else (2 if args.smoke else 1)
    if jobs < 1:
        raise ReproduceError("--jobs must be positive")
    out = (args.out or Path("runs/reproduce-smoke" if args.smoke else "runs/reproduce")).resolve()
    ctx = Context(out=out, smoke=args.smoke, cpu=args.cpu or args.smoke, dry_run=args.dry_run, jobs=jobs,
                  lm_data=(out / "data-bin" / "wikitext-2") if args.smoke else args.lm_data.resolve(),
                  mt_data=(out / "data-bin" / "wmt14-en-de") if args.smoke else args.mt_data.resolve(),
                  extra_train=extra)
    return tables, ctx


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # so that the running steps are stopped too, as on Ctrl-C


def main(argv: Optional[Sequence[str]] = None) -> int:
    tables, ctx = parse(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        written = reproduce(tables, ctx)
    except AggConfigError as refusal:
        parser = build_parser()
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    except KeyboardInterrupt:
        print("reproduce: interrupted, the running steps were stopped; the same command resumes "
              "(finished steps are kept, trainings go on from checkpoint_last.pt)", file=sys.stderr)
        return 130
    for path in written:
        print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
