"""AGG with Hugging Face ``transformers``: ``AggTrainer`` in place of ``Trainer``.

A tiny GPT-2 built from a config (no download), the shipped GPT-2 BPE files (``data/gpt2_bpe``)
through ``GPT2TokenizerFast``, a few steps on the shipped WikiText-2 slice, on CPU:

    pip install -e ".[hf]"
    python examples/hf_agg.py --max-steps 20

Multi-process: ``torchrun --nproc_per_node 2 examples/hf_agg.py`` (the counter is summed over
processes once per optimizer step). What changes against a stock ``Trainer`` script is marked
``# AGG``.
"""
import json
import sys
from pathlib import Path

import torch

from fairseq_agg.hf import AggArguments, AggTrainer  # AGG (import before transformers' models)
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, HfArgumentParser, TrainingArguments

REPO = Path(__file__).resolve().parents[1]


class Blocks(torch.utils.data.Dataset):
    def __init__(self, ids, size):
        self.blocks = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        block = torch.tensor(self.blocks[i])
        return {"input_ids": block, "labels": block}  # the model (and AggTrainer) shift the labels


def main(argv=None):
    parser = HfArgumentParser((TrainingArguments, AggArguments))  # AGG: its options next to the Trainer's
    parser.add_argument("--lines", type=int, default=400, help="first N lines of the WikiText-2 train slice")
    parser.add_argument("--block-size", type=int, default=64)
    defaults = ["--output_dir", "runs/hf_agg", "--max_steps", "50", "--per_device_train_batch_size", "8",
                "--learning_rate", "1e-3", "--logging_steps", "5", "--use_cpu", "true", "--report_to", "none",
                "--save_strategy", "no", "--agg_alpha", "0.03", "--disable_tqdm", "true"]
    argv = sys.argv[1:] if argv is None else argv
    training_args, agg_args, extra = parser.parse_args_into_dataclasses(defaults + list(argv))

    bpe = REPO / "data" / "gpt2_bpe"
    vocab = json.loads((bpe / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (bpe / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if m.strip()]
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    text = (REPO / "data" / "wikitext-2" / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()[: extra.lines]
    train = Blocks(tokenizer("\n".join(text))["input_ids"], extra.block_size)

    torch.manual_seed(training_args.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=extra.block_size, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)

    trainer = AggTrainer(model=model, args=training_args, train_dataset=train, agg_args=agg_args)  # AGG
    result = trainer.train()
    print(f"trained {result.global_step} steps, loss {result.training_loss:.3f}; AGG window {trainer.agg.window} "
          f"steps, rare group {trainer.agg.num_rare} of {len(tokenizer)} tokens")
    return trainer


if __name__ == "__main__":
    main()
