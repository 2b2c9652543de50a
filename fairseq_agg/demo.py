"""MLE vs AGG in miniature: two tiny Transformer LMs on a slice of WikiText-2, on CPU.

    fairseq-agg-demo                      # or: python -m fairseq_agg.demo
    fairseq-agg-demo --quick              # a shorter run (150 updates per model, for tests)
    fairseq-agg-demo --seeds 1 2 3        # each model once per seed: mean ± sample std (ddof=1)

Binarizes the shipped corpus (``data/wikitext-2`` of this repository, or ``--data DIR`` with
``wiki.{train,valid,test}.tokens``) with fairseq-preprocess, trains the same small
``transformer_lm`` twice with the same seed and hyper-parameters -- once with plain
cross-entropy (MLE), once with ``language_modeling_agg`` + ``agg_cross_entropy`` (AGG) -- and
prints a side-by-side table: perplexity, the AGG rare group's size, and the isotropy of each
model's output embedding, I(W) (over both signs of every eigenvector) and IsoScore, overall and
per frequency group. With ``--seeds`` every model is trained once per seed and the table shows
mean ± sample standard deviation (ddof=1) over the seeds; results.json keeps each seed's values. Everything lands under
``--workdir``; the table also goes to ``<workdir>/results.json``. The workdir must be new, empty or
an earlier demo's: the demo stamps each folder it creates (``.fairseq-agg-owner``) and replaces
only stamped folders; it refuses any other in one line before any work starts. The two trainings run side
by side (``--jobs 2``, one CPU thread each); on two idle cores the default run takes about
4 minutes, the ``--quick`` one under 2.

The claim to see: AGG keeps the output embeddings markedly more isotropic (higher I(W))
while the perplexity stays comparable (paper Table 3: I(W) 0.377 -> 0.813 at equal PPL).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fairseq_agg import metrics
from fairseq_agg.errors import AggConfigError
from fairseq_agg.isotropy import isoscore, isotropy
from fairseq_agg.workdir import Owner

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DATA = PACKAGE_DIR.parent / "data" / "wikitext-2"
SPLITS = ("train", "valid", "test")

# The demo's shape: 2 layers, d=64, tied input/output embeddings, 128-token samples,
# 8 samples (1024 tokens) per update. The shipped train slice holds about 233k tokens
# (with end-of-line symbols), so one epoch is about 228 updates; AGG's window K defaults
# to one epoch, as in the paper.
TOKENS_PER_SAMPLE = 128
MAX_TOKENS = 1024

# Dictionary: words seen at least THRESHOLD times in the train slice (5,386 words + 4
# specials); rarer words become <unk>. This keeps the softmax small enough for CPU while
# keeping thousands of words that appear only a handful of times per epoch.
DEFAULT_THRESHOLD = 5

# alpha is an *average count per update* (paper eq. 5): a token of corpus frequency f
# averages f * T per update of T tokens, so at a fixed f alpha scales with T. The paper's
# alpha = 0.03 at T = 32k tokens makes a token rare below f ~ 1e-6, i.e. below ~95
# occurrences per epoch of WikiText-103's 103M tokens: the long tail of its vocabulary.
# Carrying that f over (alpha ~ 0.03 * 1024 / 32768 ~ 0.001 at our T = 1024) would leave
# the group empty, since our corpus is 450 times smaller and every dictionary word is more
# frequent than that. What we keep is the group's role, the tail of the vocabulary: at
# T = 1024 (K ~ 228 updates per epoch) alpha = 0.03 makes a word rare below 0.03 * 228 ~ 7
# occurrences per epoch, about 1,500 words (~27% of the dictionary, ~3.5% of the training
# tokens). Measured on this demo (600 updates): alpha = 0.03 keeps I(W) near 0.96 against
# 0.77 for MLE at a perplexity 4% higher. Larger alphas are not a safe bet: in the paper's
# alpha sweep (its Figure 5) a group too large hurts isotropy again.
# With another --max-tokens T, scale alpha with T to keep the same group.
DEFAULT_ALPHA = 0.03

DEFAULT_MAX_UPDATE = 600

# The runs --runs can choose: MLE and AGG (the demo), and the other remedies of the toolkit.
RUNS = ("mle", "agg", "coupled_adam", "cosreg", "agg_coupled_adam")
QUICK_MAX_UPDATE = 150

# The demo clears only folders it made: the workdir, its data-bin and its runs' folders.
OWNER = Owner("fairseq-agg-demo", "--workdir")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fairseq-agg-demo",
        description="Train a tiny MLE and an AGG language model on CPU and compare their "
        "perplexity and output-embedding isotropy I(W).",
    )
    p.add_argument("--framework", choices=("fairseq", "hf"), default="fairseq",
                   help="fairseq (default): fairseq-train with the plug-in; hf: a tiny GPT2LMHeadModel with "
                        "transformers' Trainer against AggTrainer (python -m fairseq_agg.hf_demo --help for its options)")
    p.add_argument("--data", type=Path, default=None,
                   help="folder with wiki.{train,valid,test}.tokens (default: the repo's data/wikitext-2)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"),
                   help="where binarized data, checkpoints, logs and results.json go: a new or empty folder, or an "
                   "earlier demo's (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="AGG rare threshold, an average count per update (default: %(default)s; see the comment in demo.py)")
    p.add_argument("--seed", type=int, default=1, help="seed of both runs (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train every model once per seed (replaces --seed); the table shows mean ± sample std "
                   "(ddof=1) over the seeds, results.json each seed's values")
    p.add_argument("--max-update", type=int, default=None,
                   help=f"updates per model (default: {DEFAULT_MAX_UPDATE}, {QUICK_MAX_UPDATE} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"a shorter run ({QUICK_MAX_UPDATE} updates per model), as tests/test_demo.py runs it")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                   help="dictionary keeps words seen at least this often in train (default: %(default)s)")
    p.add_argument("--embed-dim", type=int, default=64, help="model dimension (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-updates", type=int, default=None,
                   help="linear warm-up updates (default: 150, at most a quarter of --max-update)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens per update (default: %(default)s)")
    p.add_argument("--tokens-per-sample", type=int, default=TOKENS_PER_SAMPLE, help="(default: %(default)s)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=["mle", "agg"],
                   help="models to train (default: mle agg); the remedies comparison of docs/results.md is "
                   "--runs " + " ".join(RUNS))
    p.add_argument("--cosreg-gamma", type=float, default=1.0, help="CosReg weight of the cosreg run (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2,
                   help="train this many models at once, splitting the CPU threads between them "
                   "(default: %(default)s; 1 trains them one after the other)")
    p.add_argument("--verbose", action="store_true", help="show every fairseq log line, not only the progress lines")
    p.add_argument("--extra", default="", help="extra fairseq-train arguments for both runs (one string)")
    return p


# -- steps -----------------------------------------------------------------------------------

def resolve_data(data: Optional[Path], tool: str = "fairseq-agg-demo") -> Path:
    folder = (data or REPO_DATA).resolve()
    missing = [s for s in SPLITS if not (folder / f"wiki.{s}.tokens").is_file()]
    if missing:
        where = "--data" if data else "the repository's data/wikitext-2 (pass --data DIR)"
        raise SystemExit(f"{tool}: {where}: {folder} lacks " + ", ".join(f"wiki.{s}.tokens" for s in missing))
    return folder


class LoggedProcess:
    """A subprocess whose output goes to a log file; the lines ``show`` picks are also
    printed, prefixed with ``label`` (two of them may run side by side). ``tool`` names the
    command in the message of a failed run."""

    def __init__(self, cmd: List[str], log_path: Path, show, label: str, threads: Optional[int] = None,
                 tool: str = "fairseq-agg-demo"):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads is not None:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env.setdefault(var, str(threads))
        self.log_path, self.label, self.show, self.tool = log_path, label, show, tool
        self.lines: List[str] = []
        self.start_time = time.time()
        self.end_time: Optional[float] = None
        self.log = open(log_path, "w", encoding="utf-8")
        self.log.write("$ " + shlex.join(cmd) + "\n")  # pasted into a shell, it runs again
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            self.lines.append(line.rstrip("\n"))
            if self.show(line):
                print(f"[{self.label}] {_shorten(line.rstrip())}", flush=True)
        self.end_time = time.time()

    def wait(self) -> List[str]:
        rc = self.proc.wait()
        self.reader.join()
        self.log.close()
        if rc != 0:
            tail = "\n".join(self.lines[-30:])
            raise SystemExit(f"{self.tool}: {self.label} failed (exit {rc}); log: {self.log_path}\n{tail}")
        return self.lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_logged(cmd: List[str], log_path: Path, show, label: str) -> List[str]:
    return LoggedProcess(cmd, log_path, show, label).wait()


def _shorten(line: str) -> str:
    # "2026-01-01 12:00:00 | INFO | train_inner | epoch 001: ..." -> "train_inner | epoch 001: ..."
    line = re.sub(r"^INFO:fairseq_cli\.\w+:(\[None\] )?", "", line)
    parts = line.split(" | ", 2)
    return parts[2] if len(parts) == 3 and parts[1] in ("INFO", "WARNING") else line


def preprocess(data: Path, workdir: Path, threshold: int, verbose: bool, owner: Owner = OWNER) -> Path:
    """``workdir/data-bin``, binarized again unless its demo-stamp.json shows the same data and
    threshold; ``owner`` (the demo, or the study that borrows this step) must have made the folder."""
    dest = workdir / "data-bin"
    stamp = {"data": str(data), "threshold": threshold,
             "sizes": [(data / f"wiki.{s}.tokens").stat().st_size for s in SPLITS]}
    stamp_file = dest / "demo-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        print(f"[preprocess] reusing {dest}", flush=True)
        return dest
    owner.replace(dest)
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
           "--trainpref", str(data / "wiki.train.tokens"),
           "--validpref", str(data / "wiki.valid.tokens"),
           "--testpref", str(data / "wiki.test.tokens"),
           "--destdir", str(dest), "--thresholdsrc", str(threshold),
           # no made-up filler symbols: every dictionary entry is a real word
           "--padding-factor", "1", "--workers", "1"]
    run_logged(cmd, dest / "preprocess.log", lambda line: verbose or "replaced" in line, "preprocess")
    stamp_file.write_text(json.dumps(stamp))
    return dest


def run_options(args, name: str) -> List[str]:
    """Task, criterion and optimizer of each demo run; everything else is shared."""
    agg = ["--criterion", "agg_cross_entropy", "--agg-alpha", str(args.alpha)]
    return {
        "mle": ["--task", "language_modeling", "--criterion", "cross_entropy", "--optimizer", "adam"],
        "agg": ["--task", "language_modeling_agg", *agg, "--optimizer", "adam"],
        # coupled_adam needs the plug-in's task, which marks the embedding matrices
        "coupled_adam": ["--task", "language_modeling_agg", "--criterion", "cross_entropy", "--optimizer", "coupled_adam"],
        "cosreg": ["--task", "language_modeling", "--criterion", "cosreg_cross_entropy",
                   "--cosreg-gamma", str(args.cosreg_gamma), "--optimizer", "adam"],
        "agg_coupled_adam": ["--task", "language_modeling_agg", *agg, "--optimizer", "coupled_adam"],
    }[name]


def train_command(args, data_bin: Path, save_dir: Path, name: str, seed: Optional[int] = None) -> List[str]:
    max_update = args.max_update
    warmup = args.warmup_updates if args.warmup_updates is not None else max(1, min(150, max_update // 4))
    task = run_options(args, name)
    cmd = [
        sys.executable, "-m", "fairseq_cli.train", str(data_bin),
        "--user-dir", str(PACKAGE_DIR), *task,
        "--arch", "transformer_lm", "--share-decoder-input-output-embed",
        "--decoder-layers", str(args.layers), "--decoder-embed-dim", str(args.embed_dim),
        # transformer_lm's input/output dims default to 512 whatever the model dim: without
        # these the embedding would be 512-wide behind a projection
        "--decoder-input-dim", str(args.embed_dim), "--decoder-output-dim", str(args.embed_dim),
        "--decoder-ffn-embed-dim", str(4 * args.embed_dim), "--decoder-attention-heads", "4",
        "--dropout", "0.1",
        "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
        "--max-tokens", str(args.max_tokens), "--required-batch-size-multiple", "1",
        "--adam-betas", "(0.9, 0.98)", "--weight-decay", "0.01",
        "--lr", str(args.lr), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(warmup), "--warmup-init-lr", "1e-07",
        "--max-update", str(max_update), "--seed", str(args.seed if seed is None else seed), "--cpu", "--num-workers", "0",
        # validate (both splits) and save only once, at the end
        "--valid-subset", "valid,test", "--validate-interval", "100000", "--save-interval", "100000",
        "--no-epoch-checkpoints",
        # checkpoints along the way, for fairseq-agg-eval's I(W)-over-training figure (fairseq
        # validates at each, so --quick keeps only one)
        "--save-interval-updates", str(max(1, max_update // (2 if args.quick else 6))),
        "--save-dir", str(save_dir),
        "--log-format", "simple", "--log-interval", str(max(10, max_update // 12)),
    ]
    if args.extra:
        cmd += shlex.split(args.extra)
    return cmd


def _progress_line(line: str) -> bool:
    return any(key in line for key in ("| train_inner |", "| valid |", "| test |", "| train |", "Traceback", "Error"))


def run_key(name: str, seed: int, several_seeds: bool) -> str:
    """The run's folder under the workdir: the model's name, with the seed when there are several."""
    return f"{name}-seed{seed}" if several_seeds else name


def train_all(args, data_bin: Path, names: List[str], seeds: Optional[List[int]] = None) -> Dict[str, Dict]:
    """Train the models (each once per seed), ``args.jobs`` at a time (each with its share of the
    CPU threads); returns run key (see :func:`run_key`) -> what its log says."""
    seeds = seeds or [args.seed]
    plan = [(run_key(name, seed, len(seeds) > 1), name, seed) for seed in seeds for name in names]
    show = (lambda _line: True) if args.verbose else _progress_line

    def start(item, threads):
        key, name, seed = item
        save_dir = OWNER.replace(args.workdir / key)  # never resume a previous demo's checkpoint
        options = run_options(args, name)
        what = " + ".join(options[i + 1] for i, o in enumerate(options) if o in ("--task", "--criterion", "--optimizer"))
        print(f"[{key}] training ({what}, seed {seed}), log: {save_dir / 'train.log'}", flush=True)
        cmd = train_command(args, data_bin, save_dir, name, seed)
        return key, LoggedProcess(cmd, save_dir / "train.log", show, key, threads)

    return {key: summarize_log(lines, seconds, log_path)
            for key, (lines, seconds, log_path) in run_in_batches(plan, args.jobs, start).items()}


def run_in_batches(plan: List, jobs: int, start) -> Dict[str, tuple]:
    """``start(item, threads)`` -> (key, LoggedProcess) for every item of ``plan``, ``jobs`` at a
    time, each with its share of the CPU threads; what still runs is killed on an error.
    Returns key -> (log lines, seconds, log path)."""
    jobs = max(1, min(jobs, len(plan)))
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    done: Dict[str, tuple] = {}
    pending = list(plan)
    while pending:
        batch, pending = pending[:jobs], pending[jobs:]
        started = []
        try:
            for item in batch:
                started.append(start(item, threads))
            for key, proc in started:
                lines = proc.wait()
                done[key] = (lines, proc.end_time - proc.start_time, proc.log_path)
        finally:
            for _, proc in started:
                proc.kill()
    return done


def summarize_log(lines: List[str], seconds: float, log_path: Path) -> Dict:
    result = {"train_seconds": round(seconds, 1), "log": str(log_path)}
    result.update(parse_validation(lines))
    agg_rare = [float(m.group(1)) for m in (re.search(r"\| agg_rare ([\d.]+)", l) for l in lines if "train_inner" in l) if m]
    if agg_rare:
        result["agg_rare_logged_last"] = agg_rare[-1]
    return result


def parse_validation(lines: List[str]) -> Dict:
    out = {}
    for line in lines:
        m = re.search(r"valid on '(\w+)' subset \|.*?\| ppl ([\d.]+|inf)", line)
        if m:
            out[f"{m.group(1)}_ppl"] = float(m.group(2))
    return out


# -- analysis ----------------------------------------------------------------------------------

def frequency_groups(dict_file: Path, nspecial: int = 4) -> Dict[str, torch.Tensor]:
    """Non-special dictionary indices ordered by training count: top 30% frequent, next 50%
    medium, last 20% rare (DESIGN section 4), as ``fairseq-agg-eval`` forms them: fairseq's
    padding symbols (``madeupword0000``, ...) are in no group."""
    entries = metrics.read_dictionary_counts(dict_file)  # dict.txt omits the specials
    counts = [0] * nspecial + [count for _, count in entries]
    symbols = [""] * nspecial + [word for word, _ in entries]
    groups = metrics.frequency_groups(counts, nspecial, exclude=metrics.filler_symbols(symbols, counts))
    return {name: torch.from_numpy(ids) for name, ids in groups.items()}


def load_checkpoint(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def output_embedding(state: Dict) -> torch.Tensor:
    model = state["model"]
    for key in ("decoder.output_projection.weight", "decoder.embed_tokens.weight"):
        if key in model:
            return model[key].float()
    raise KeyError("no output embedding in the checkpoint")


def rare_group_size(state: Dict, alpha: float) -> Optional[int]:
    from fairseq_agg.core import TokenCounter, compute_gates

    from fairseq_agg.fairseq_fixes import saved_counter_state

    counter_state = saved_counter_state(state)
    if counter_state is None:
        return None
    counter = TokenCounter(int(counter_state["vocab_size"]), int(counter_state["nspecial"]))
    counter.load_state_dict(counter_state)
    return compute_gates(counter.average(), alpha, counter.nspecial).num_rare


def embedding_isotropy(w: torch.Tensor, groups: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """I(W) (both signs of every eigenvector) and IsoScore, over all rows and per group."""
    out = {"I(W)": isotropy(w), "IsoScore": isoscore(w)}
    for group, rows in groups.items():
        out[f"I(W) {group}"] = isotropy(w, rows=rows)
    for group, rows in groups.items():
        out[f"IsoScore {group}"] = isoscore(w, rows=rows)
    return out


def analyse(args, data_bin: Path, runs: Dict[str, Dict]) -> Dict:
    groups = frequency_groups(data_bin / "dict.txt")
    for key, result in runs.items():
        state = load_checkpoint(args.workdir / key / "checkpoint_last.pt")
        w = output_embedding(state)
        result["num_updates"] = int(state["optimizer_history"][-1]["num_updates"])
        result["vocab_size"] = int(w.size(0))
        result.update(embedding_isotropy(w, groups))
        if key.startswith("agg"):
            result["rare_group_size"] = rare_group_size(state, args.alpha)
    return runs


def combine_seeds(runs: Dict[str, Dict], names: List[str], seeds: List[int]) -> Dict[str, Dict]:
    """Per model, the runs of every seed: {"seeds": {seed: result}, "n", "mean", "std"} with the
    mean and the sample standard deviation (ddof=1) over the seeds of each number."""
    out: Dict[str, Dict] = {}
    for name in names:
        per_seed = {str(seed): runs[run_key(name, seed, True)] for seed in seeds}
        keys = [k for k, v in next(iter(per_seed.values())).items()
                if metrics._is_number(v) and all(metrics._is_number(r.get(k)) for r in per_seed.values())]
        stats = {k: metrics.Stat([r[k] for r in per_seed.values()]) for k in keys}
        out[name] = {"seeds": per_seed, "n": len(seeds),
                     "mean": {k: float(v) for k, v in stats.items()},
                     "std": {k: v.std for k, v in stats.items()}}
    return out


TABLE_ROWS = (
    ("valid perplexity", "valid_ppl", 2),
    ("test perplexity", "test_ppl", 2),
    ("I(W) all tokens", "I(W)", 3),
    ("I(W) frequent 30%", "I(W) frequent", 3),
    ("I(W) medium 50%", "I(W) medium", 3),
    ("I(W) rare 20%", "I(W) rare", 3),
    ("IsoScore all tokens", "IsoScore", 3),
    ("IsoScore frequent 30%", "IsoScore frequent", 3),
    ("IsoScore medium 50%", "IsoScore medium", 3),
    ("IsoScore rare 20%", "IsoScore rare", 3),
    ("AGG rare group at end", "rare_group_size", 0),
    ("dictionary size", "vocab_size", 0),
    ("updates", "num_updates", 0),
    ("train seconds", "train_seconds", 0),
)


def evaluation_command(data_bin: Path, checkpoint: Path, out: Path) -> str:
    """The ``fairseq-agg-eval lm`` command line of a demo model, quoted for a shell. The demo
    trains on CPU (``--cpu`` in :func:`train_command`), so its evaluation stays there too."""
    return shlex.join(["fairseq-agg-eval", "lm", str(data_bin), "--path", str(checkpoint), "--out", str(out), "--cpu"])


def format_table(runs: Dict[str, Dict], rows=TABLE_ROWS) -> str:
    """One column per model, one line per (label, key, digits) of ``rows``; with several seeds
    (``combine_seeds``) mean ± sample std. Also the HF demo's table."""
    names = list(runs)
    header = ["", *(n.upper() for n in names)]
    body = []
    for label, key, digits in rows:
        cells = [label]
        for n in names:
            run = runs[n]
            if "seeds" in run:
                cells.append("-" if key not in run["mean"] else
                             metrics.Stat([r[key] for r in run["seeds"].values()]).format(digits))
            else:
                v = run.get(key)
                cells.append("-" if v is None else f"{v:.{digits}f}")
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def run_demo(argv: Optional[List[str]] = None) -> Dict:
    """The whole demo; returns what results.json holds."""
    args = build_parser().parse_args(argv)
    if args.max_update is None:
        args.max_update = QUICK_MAX_UPDATE if args.quick else DEFAULT_MAX_UPDATE
    if not 0.0 < args.alpha <= 1.0:
        raise SystemExit("fairseq-agg-demo: --alpha must lie in (0, 1]")
    if args.max_update < 1 or args.jobs < 1:
        raise SystemExit("fairseq-agg-demo: --max-update and --jobs must be positive")
    args.workdir = args.workdir.resolve()
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
    names = list(dict.fromkeys(args.runs))
    data = resolve_data(args.data)
    # every folder the demo writes or replaces, checked before any work starts
    OWNER.refuse_unless_ours(args.workdir, args.workdir / "data-bin",
                             *(args.workdir / run_key(name, seed, len(seeds) > 1) for seed in seeds for name in names))
    OWNER.claim(args.workdir)
    start = time.time()
    print(f"fairseq-agg demo: data {data}, workdir {args.workdir}, {args.max_update} updates per model, "
          f"alpha {args.alpha}, seed{'s' if len(seeds) > 1 else ''} {' '.join(map(str, seeds))}", flush=True)
    data_bin = preprocess(data, args.workdir, args.threshold, args.verbose)
    trained = train_all(args, data_bin, names, seeds)
    analyse(args, data_bin, trained)
    runs = trained if len(seeds) == 1 else combine_seeds(trained, names, seeds)
    table = format_table(runs)
    results = {
        "settings": {"data": str(data), "alpha": args.alpha, "seed": seeds[0], "seeds": seeds,
                     "max_update": args.max_update,
                     "threshold": args.threshold, "embed_dim": args.embed_dim, "layers": args.layers,
                     "lr": args.lr, "max_tokens": args.max_tokens, "tokens_per_sample": args.tokens_per_sample},
        "runs": runs,
        "total_seconds": round(time.time() - start, 1),
    }
    if len(seeds) > 1:
        results["std"] = "sample standard deviation over the seeds (ddof=1)"
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table)
    if len(seeds) > 1:
        print(f"\nmean ± sample standard deviation (ddof=1) over seeds {' '.join(map(str, seeds))}; each seed's values "
              "in results.json")
    if "mle" in runs and "agg" in runs:
        iso = {n: (runs[n]["mean"]["I(W)"] if "seeds" in runs[n] else runs[n]["I(W)"]) for n in ("mle", "agg")}
        print(f"\nI(W) of the output embedding: MLE {iso['mle']:.3f}, AGG {iso['agg']:.3f} "
              f"(paper, Table 3, WikiText-103 at full scale: MLE 0.377, AGG 0.813)")
    print(f"\nresults: {args.workdir / 'results.json'} (total {results['total_seconds']:.0f} s)")
    for key in trained:
        print("full evaluation (tables, figures): "
              + evaluation_command(data_bin, args.workdir / key / "checkpoint_last.pt", args.workdir / "eval" / key))
    return results


def main(argv: Optional[List[str]] = None) -> int:
    framework = argparse.ArgumentParser(add_help=False)
    framework.add_argument("--framework", choices=("fairseq", "hf"), default="fairseq")
    known, _ = framework.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.framework == "hf":
        from fairseq_agg import hf_demo

        return hf_demo.main(sys.argv[1:] if argv is None else argv)
    try:
        run_demo(argv)
    except AggConfigError as refusal:
        parser = build_parser()
        parser.exit(2, f"{parser.prog}: error: {refusal}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
