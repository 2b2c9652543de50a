"""Small helpers shared by tests that build fairseq objects or run fairseq-train."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(REPO / "fairseq_agg")
CORPUS = REPO / "data" / "wikitext-2"


def head(src: Path, dst: Path, n: int) -> str:
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")
    return str(dst)


def binarize_lm(tmp: Path, name: str, nwords: int) -> str:
    train = head(CORPUS / "wiki.train.tokens", tmp / f"{name}.train", 150)
    valid = head(CORPUS / "wiki.valid.tokens", tmp / f"{name}.valid", 30)
    dest = tmp / name
    subprocess.run(
        ["fairseq-preprocess", "--only-source", "--trainpref", train, "--validpref", valid,
         "--destdir", str(dest), "--nwordssrc", str(nwords), "--workers", "1"],
        check=True, capture_output=True,
    )
    return str(dest)


def train_args(data, *extra, task="language_modeling_agg", save_dir=None):
    args = [
        data, "--user-dir", USER_DIR, "--task", task, "--arch", "transformer_lm",
        "--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
        "--decoder-attention-heads", "2", "--share-decoder-input-output-embed",
        "--criterion", "agg_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
        "--tokens-per-sample", "16", "--max-tokens", "256", "--cpu", "--no-progress-bar",
        "--max-update", "1", "--no-epoch-checkpoints", "--disable-validation",
    ]
    if save_dir is not None:
        args += ["--save-dir", str(save_dir)]
    else:
        args += ["--no-save"]
    return args + list(extra)


def build(args):
    """The objects fairseq-train would build, in process."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, args))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def fairseq_train(args):
    return subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


