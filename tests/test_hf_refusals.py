"""What docs/huggingface.md says ``AggTrainer`` refuses or warns about beyond ``tests/test_hf.py``:
an output head that is not an ``nn.Linear``, an encoder-decoder model, a batch without labels and
a ``compute_loss_func`` are refused in one line; a checkpoint folder without ``agg_counter.pt`` (a
stock ``Trainer``'s) resumes with an empty counter and says so."""

import logging

import pytest
import torch

from fairseq_agg.hf import AggTrainer  # noqa: E402  (before transformers' models)
from fairseq_agg.errors import AggConfigError  # noqa: E402

from test_hf import ALPHA, _one_line, dataset, tiny_gpt2, training_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_head_that_is_not_linear_and_an_encoder_decoder_are_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    model = tiny_gpt2(tied=False)
    model.lm_head = torch.nn.Identity()
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=model, args=training_args(tmp_path))
    _one_line(excinfo, "nn.Linear", "Identity")
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=48, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=t5, args=training_args(tmp_path))
    _one_line(excinfo, "encoder-decoder", "T5ForConditionalGeneration")


def test_a_batch_without_labels_is_refused(tmp_path):
    model = tiny_gpt2()
    trainer = AggTrainer(model=model, args=training_args(tmp_path), agg_alpha=ALPHA)
    with pytest.raises(AggConfigError) as excinfo:
        trainer.compute_loss(model, {"input_ids": dataset(2).ids})
    _one_line(excinfo, "labels", "DataCollatorForLanguageModeling")


def test_a_loss_function_of_ones_own_is_refused(tmp_path):
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path), compute_loss_func=lambda *a, **k: None)
    _one_line(excinfo, "compute_loss_func")


def test_a_checkpoint_without_a_counter_resumes_with_an_empty_one(tmp_path, caplog):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    trainer = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path), agg_alpha=ALPHA)
    with caplog.at_level(logging.WARNING, logger="fairseq_agg.hf.trainer"):
        trainer.load_agg_counter(str(checkpoint))
    assert any("agg_counter.pt" in r.getMessage() and "starts empty" in r.getMessage() for r in caplog.records)
    assert trainer.agg.num_updates == 0 and int(trainer.agg.counter.window_sum.sum()) == 0
    assert torch.equal(trainer.agg.counter.pending, torch.zeros_like(trainer.agg.counter.pending))
