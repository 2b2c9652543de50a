"""``fairseq_agg.hf.AggTrainer`` (issue 14, criteria 1, 2, 3 and 6) on tiny GPT-2 models built
from a config (no download), float64, dropout 0, on CPU.

1. Every parameter's gradient in every update equals the paper's three-logit formulation
   (``tests/_agg_oracle.py``) with gates recomputed here from the labels of the completed
   updates (window K), for tied and untied heads, with and without label smoothing.
2. Gradient accumulation 2 equals one batch holding the same examples (gates, counter,
   parameters); evaluation and prediction in the middle of training change nothing.
3. Resuming from a Trainer checkpoint is bit-identical to an uninterrupted run, counter included.
6. Models AGG cannot serve and bad options are refused with one line each.

Two processes against one with accumulation: ``tests/test_hf_ddp.py``.
"""

import json
import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from fairseq_agg.hf import AGG_COUNTER_NAME, AggArguments, AggTrainer  # noqa: E402  (before transformers' models)
from fairseq_agg.errors import AggConfigError  # noqa: E402
from fairseq_agg.hf.trainer import MODEL_LOSS_RTOL  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, TrainerCallback, TrainingArguments  # noqa: E402

from _agg_oracle import (  # noqa: E402
    IGNORE, assert_grads_match, named_grads, reference_gates, shifted_targets, three_logit_loss, zipf_tokens,
)

V, T, N_EXAMPLES = 48, 10, 24
ALPHA, WINDOW = 0.9, 3

pytestmark = pytest.mark.usefixtures("one_thread")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return self.ids.size(0)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def dataset(n=N_EXAMPLES, seed=5):
    return ListDataset(*zipf_tokens(n, T, V, seed))


def tiny_config(tied=True, vocab=V, dropout=0.0):
    return GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tied, use_cache=False,
    )


def tiny_gpt2(tied=True, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_config(tied, dropout=dropout)).to(torch.float64)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    return model


def training_args(out, **overrides):
    args = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=6,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
        report_to="none", save_strategy="no", use_cpu=True, seed=1, logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    args.update(overrides)
    return TrainingArguments(**args)


class Recording(AggTrainer):
    """Keeps every training micro-batch, to rebuild each update independently."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


class GradRecorder(TrainerCallback):
    """Each update's gradients and the parameters they were computed at (before the step)."""

    def __init__(self):
        self.updates = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates.append((named_grads(model), params))


def counter_state(trainer):
    return trainer.agg.state_dict()["_extra_state"]


def same_counter(a, b):
    sa, sb = counter_state(a), counter_state(b)
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


# -- 1. gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tied, eps, chunk, layer", [
    (True, 0.0, 0, "auto"), (True, 0.1, 0, "auto"), (False, 0.0, 0, "auto"), (False, 0.1, 0, "auto"),
    (False, 0.1, 5, "auto"), (True, 0.0, 0, "gated"), (False, 0.1, 0, "gated"),
], ids=["tied-ce", "tied-ls0.1", "untied-ce", "untied-ls0.1", "untied-ls0.1-chunked", "tied-ce-gated-layer",
        "untied-ls0.1-gated-layer"])
def test_gradients_equal_three_logit_formulation(tmp_path, tied, eps, chunk, layer):
    recorder = GradRecorder()
    trainer = Recording(
        model=tiny_gpt2(tied), args=training_args(tmp_path, label_smoothing_factor=eps), train_dataset=dataset(),
        callbacks=[recorder], agg_alpha=ALPHA, agg_window=WINDOW, agg_chunk_size=chunk, agg_output_layer=layer,
    )
    trainer.train()
    assert trainer.agg_output_layer == ("fused" if layer == "auto" else layer)
    assert len(recorder.updates) == 6 and len(trainer.micro_batches) == 6

    history, gated_somewhere = [], False
    for u, (grads, params) in enumerate(recorder.updates):
        micro = [trainer.micro_batches[u]]
        rare, g1, g2 = reference_gates(history, V, ALPHA, WINDOW)
        oracle = tiny_gpt2(tied)
        oracle.load_state_dict(params)
        n = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        for b in micro:
            h = oracle.transformer(input_ids=b["input_ids"]).last_hidden_state[:, :-1].reshape(-1, 16)
            y = b["labels"][:, 1:].reshape(-1)
            (three_logit_loss(h, oracle.lm_head.weight, y, rare, g1, g2, eps) / n).backward()
        if layer == "gated":
            # The model's own loss: transformers computes a causal LM's loss on logits.float(),
            # so float64 logits are rounded to float32 on the way.
            assert_grads_match(grads, named_grads(oracle), f"update {u + 1}", rtol=1e-5, atol=1e-7)
        else:
            assert_grads_match(grads, named_grads(oracle), f"update {u + 1}")
        if 0 < int(rare.sum()) < V:
            plain = tiny_gpt2(tied)
            plain.load_state_dict(params)
            for b in micro:
                logits = plain(input_ids=b["input_ids"]).logits[:, :-1]
                F.cross_entropy(logits.reshape(-1, V), b["labels"][:, 1:].reshape(-1), label_smoothing=eps,
                                reduction="sum").div(n).backward()
            gated_somewhere |= bool((plain.lm_head.weight.grad - oracle.lm_head.weight.grad).abs().max() > 1e-4)
        history.append(shifted_targets([b["labels"] for b in micro]))
    assert gated_somewhere
    rare, _, _ = reference_gates(history, V, ALPHA, WINDOW)
    assert torch.equal(trainer.agg.gates().rare.cpu(), rare)
    assert trainer.agg.num_updates == 6
    # agg_rare reaches the Trainer's logs (what TensorBoard / W&B receive).
    logged = [entry["agg_rare"] for entry in trainer.state.log_history if "agg_rare" in entry]
    assert len(logged) == 6 and logged[0] == V  # before any completed update every token is rare


def test_loss_value_is_the_stock_trainer_loss(tmp_path):
    """Label-smoothed with the Trainer's own definition; the model's own loss without smoothing."""
    data = dataset(4)
    batch = {"input_ids": data.ids, "labels": data.labels}
    for eps in (0.0, 0.1):
        model = tiny_gpt2(tied=False)
        trainer = AggTrainer(model=model, args=training_args(tmp_path, label_smoothing_factor=eps), agg_alpha=ALPHA)
        got = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=data.ids).logits[:, :-1]
        want = F.cross_entropy(logits.reshape(-1, V), data.labels[:, 1:].reshape(-1), label_smoothing=eps)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if eps == 0.0:  # transformers' own loss runs in float32 whatever the model's dtype
            torch.testing.assert_close(got, model(**batch).loss.double(), rtol=1e-6, atol=1e-6)


# -- 2. accumulation and evaluation ---------------------------------------------------------------
class EvalEveryStep(TrainerCallback):
    """predict() (with logits) after every update, besides the Trainer's evaluation."""

    def __init__(self):
        self.trainer = None
        self.predictions = 0

    def on_step_end(self, args, state, control, **kwargs):
        out = self.trainer.predict(dataset(4, seed=9))
        assert out.predictions.shape == (4, T, V)
        self.predictions += 1


def test_accumulation_equals_one_batch_and_evaluation_changes_nothing(tmp_path):
    data = dataset()
    one = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path / "one"), train_dataset=data,
                     agg_alpha=ALPHA, agg_window=WINDOW)
    one.train()
    two = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path / "two", per_device_train_batch_size=2,
                     gradient_accumulation_steps=2), train_dataset=data, agg_alpha=ALPHA, agg_window=WINDOW)
    two.train()
    predictor = EvalEveryStep()
    evaluated = AggTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "eval", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=3),
        train_dataset=data, eval_dataset=dataset(6, seed=7), callbacks=[predictor],
        agg_args=AggArguments(agg_alpha=ALPHA, agg_window=WINDOW),
    )
    predictor.trainer = evaluated
    evaluated.train()
    assert predictor.predictions == 6
    assert sum("eval_loss" in e for e in evaluated.state.log_history) == 6

    assert same_counter(one, two) and same_counter(two, evaluated)
    assert two.agg.num_updates == evaluated.agg.num_updates == 6
    assert torch.equal(one.agg.gates().g1, two.agg.gates().g1) and torch.equal(one.agg.gates().g2, two.agg.gates().g2)
    for (name, p1), (_, p2), (_, p3) in zip(one.model.named_parameters(), two.model.named_parameters(),
                                             evaluated.model.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
        assert torch.equal(p2, p3), name
    evaluated.evaluate()
    assert same_counter(two, evaluated) and int(evaluated.agg.counter.pending.sum()) == 0


def test_default_window_is_one_epoch(tmp_path):
    trainer = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path, max_steps=-1, num_train_epochs=1,
                         gradient_accumulation_steps=2, per_device_train_batch_size=2), train_dataset=dataset(),
                         agg_alpha=ALPHA)
    trainer.train()
    assert trainer.agg.window == 6  # 24 examples / (2 x 2) per optimizer step
    assert trainer.agg.num_updates == 6


# -- 3. resume -----------------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
    data = dataset()
    # 8 steps over 2 epochs of 6: the default window (one epoch) trims, the resume is mid-epoch.
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, learning_rate=5e-3, lr_scheduler_type="linear")
    full = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path / "full", **common), train_dataset=data,
                      agg_alpha=ALPHA)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / AGG_COUNTER_NAME).is_file()
    saved = torch.load(checkpoint / AGG_COUNTER_NAME, weights_only=True)["_extra_state"]
    assert saved["num_updates"] == 4 and saved["window"] == 6

    resumed = AggTrainer(model=tiny_gpt2(seed=123), args=training_args(tmp_path / "resumed", **common),
                         train_dataset=data, agg_alpha=ALPHA)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.agg.window == 6
    assert same_counter(full, resumed)
    for (name, p1), (_, p2) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p1, p2), name
    # resume_from_checkpoint=True finds the last checkpoint of output_dir.
    shutil.copytree(checkpoint, tmp_path / "auto" / "checkpoint-4")
    again = AggTrainer(model=tiny_gpt2(seed=7), args=training_args(tmp_path / "auto", **common), train_dataset=data,
                       agg_alpha=ALPHA)
    again.train(resume_from_checkpoint=True)
    assert same_counter(full, again)


def test_resume_takes_the_current_options_and_logs_the_changed_ones(tmp_path, caplog):
    data = dataset()
    first = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path / "first", max_steps=2, save_strategy="steps",
                       save_steps=2), train_dataset=data, agg_alpha=ALPHA, agg_window=3, agg_static_after=10)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    saved = torch.load(checkpoint / AGG_COUNTER_NAME, weights_only=True)
    assert saved["agg_options"]["agg_window"] == 3 and saved["agg_options"]["agg_alpha"] == ALPHA

    def resume(name, folder, **options):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fairseq_agg.hf.trainer"):
            trainer = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path / name, max_steps=3),
                                 train_dataset=data, **options)
            trainer.train(resume_from_checkpoint=str(folder))
        logged = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
        assert len(logged) <= 1, logged
        return trainer, logged[0] if logged else ""

    # Defaults now: the window is one epoch of this run (6 steps), no static group; alpha changed.
    resumed, logged = resume("resumed", checkpoint, agg_alpha=0.5)
    assert resumed.agg.window == 6 and resumed.agg.counter.freeze_after is None and resumed.agg.alpha == 0.5
    assert resumed.agg.num_updates == 3
    for change in ("agg_window 3 -> 6", "agg_alpha 0.9 -> 0.5", "agg_static_after 10 -> None"):
        assert change in logged, logged
    assert "agg_nspecial" not in logged and "agg_no_g1" not in logged  # unchanged: not logged
    _, logged = resume("same", checkpoint, agg_alpha=ALPHA, agg_window=3, agg_static_after=10)
    assert logged == ""
    # agg_counter.pt of an earlier version (counter only) still loads; the window it kept is compared.
    older = tmp_path / "older" / "checkpoint-2"
    shutil.copytree(checkpoint, older)
    torch.save({"_extra_state": saved["_extra_state"]}, older / AGG_COUNTER_NAME)
    resumed, logged = resume("from-older", older, agg_alpha=ALPHA)
    assert resumed.agg.window == 6 and resumed.agg.num_updates == 3
    assert "agg_window 3 -> 6" in logged and "agg_alpha" not in logged


# -- other architectures ---------------------------------------------------------------------------
SMALL = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=None)


def _other_models():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return [
        ("llama-untied", LlamaForCausalLM, LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=False)),
        ("qwen2-tied", Qwen2ForCausalLM, Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True)),
        ("gpt-neox", GPTNeoXForCausalLM, GPTNeoXConfig(**SMALL, tie_word_embeddings=False)),
    ]


def test_llama_qwen2_and_gpt_neox(tmp_path):
    data = dataset(8)
    for name, cls, config in _other_models():
        torch.manual_seed(0)
        model = cls(config).to(torch.float64)
        trainer = AggTrainer(model=model, args=training_args(tmp_path / name, max_steps=2), train_dataset=data,
                             agg_alpha=ALPHA)
        batch = {"input_ids": data.ids[:4], "labels": data.labels[:4]}
        with torch.no_grad():
            torch.testing.assert_close(trainer.compute_loss(model.eval(), dict(batch)), model(**batch).loss.double(),
                                       rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        model.train()
        trainer.train()
        assert trainer.agg.num_updates == 2, name


# -- the model's own loss ---------------------------------------------------------------------------
def _tiny_mixtral():
    """Router loss on, at its default weight (0.001). float32: its experts' grouped matmul has no float64."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**SMALL, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                            output_router_logits=True))


def _tiny_falcon_h1():
    """Logits scaled by 0.25 after the head."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    torch.manual_seed(0)
    return FalconH1ForCausalLM(FalconH1Config(**SMALL, num_key_value_heads=1, lm_head_multiplier=0.25, mamba_d_ssm=16,
                                              mamba_d_state=4, mamba_n_heads=2, mamba_d_head=8, mamba_n_groups=1,
                                              mamba_d_conv=2, mamba_chunk_size=16))


def _own_loss_reference(model, example, rare, g1, g2):
    """The model's own loss with its logits' part replaced by the paper's three-logit formulation:
    a Mixtral's cross-entropy plus its router loss, a Falcon-H1's cross-entropy of logits scaled
    after the head. What the gated output layer must train with."""
    labels = example["labels"]
    y = labels[:, 1:].reshape(-1)
    n = int((y != IGNORE).sum())
    if type(model).__name__ == "MixtralForCausalLM":
        out = model.model(input_ids=example["input_ids"], output_router_logits=True)
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        aux = load_balancing_loss_func(out.router_logits, model.num_experts, model.num_experts_per_tok)
        h = out.last_hidden_state[:, :-1].reshape(-1, 16)
        return three_logit_loss(h, model.lm_head.weight, y, rare, g1, g2) / n + model.router_aux_loss_coef * aux
    h = model.model(input_ids=example["input_ids"]).last_hidden_state[:, :-1].reshape(-1, 16)
    return three_logit_loss(h * model.model.lm_head_multiplier, model.lm_head.weight, y, rare, g1, g2) / n


@pytest.mark.parametrize("build", [_tiny_mixtral, _tiny_falcon_h1], ids=["mixtral-router-loss", "falcon-h1-multiplier"])
def test_a_model_whose_own_loss_is_not_head_cross_entropy_keeps_it_under_the_gated_layer(tmp_path, build):
    """agg_output_layer 'auto': the first-step check finds the model's own loss differs from
    cross-entropy on its head, so the model keeps computing it (router loss, logit multiplier)
    and AGG gates W's gradient through the logits; every gradient of the first two updates equals
    the model's own loss with its logits' part in the three-logit formulation."""
    model = build()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = dataset(8)
    recorder = GradRecorder()
    trainer = Recording(model=model, args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                        train_dataset=data, callbacks=[recorder], agg_alpha=ALPHA, agg_window=WINDOW)
    trainer.train()
    assert trainer.agg_output_layer == "gated" and trainer.agg.num_updates == 2
    own, head = trainer.model_loss_check
    assert not math.isclose(own, head, rel_tol=MODEL_LOSS_RTOL)
    history, gated_somewhere = [], False
    for u, (grads, params) in enumerate(recorder.updates):
        example = trainer.micro_batches[u]
        rare, g1, g2 = reference_gates(history, V, ALPHA, WINDOW)
        oracle = build()
        oracle.load_state_dict(params)
        _own_loss_reference(oracle, example, rare, g1, g2).backward()
        assert_grads_match(grads, named_grads(oracle), f"update {u + 1}", rtol=1e-5, atol=1e-6)  # float32 models
        gated_somewhere |= bool(rare.any())
        history.append(shifted_targets([example["labels"]]))
    assert gated_somewhere
    assert not torch.equal(initial["lm_head.weight"], trainer.model.lm_head.weight.detach())


@pytest.mark.parametrize("build", [_tiny_mixtral, _tiny_falcon_h1], ids=["mixtral-router-loss", "falcon-h1-multiplier"])
def test_the_fused_loss_refuses_a_model_whose_own_loss_is_more(tmp_path, build):
    model = build()
    data = dataset(8)
    trainer = AggTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=data, agg_alpha=ALPHA,
                         agg_output_layer="fused")
    with pytest.raises(AggConfigError) as excinfo:
        trainer.train()
    own, head = trainer.model_loss_check
    _one_line(excinfo, type(model).__name__, f"{own:.6g}", f"{head:.6g}", "agg_output_layer='gated'")
    assert not math.isclose(own, head, rel_tol=MODEL_LOSS_RTOL)
    assert trainer.agg.num_updates == 0 and trainer.state.global_step == 0  # refused at the first step
    # The two values are what they say, measured here on one example without the trainer.
    example = {"input_ids": data.ids[:1], "labels": data.labels[:1]}
    assert not trainer.model_loss_is_head_cross_entropy(model, example)
    with torch.no_grad():
        hidden = model.model(input_ids=example["input_ids"]).last_hidden_state
        head_logits = hidden[0, :-1] @ model.lm_head.weight.t()
        want = (float(model(**example).loss), float(F.cross_entropy(head_logits, example["labels"][0, 1:])))
    assert all(math.isclose(got, ref, rel_tol=1e-5) for got, ref in zip(trainer.model_loss_check, want))


def test_the_loss_check_holds_under_dropout_and_leaves_the_rng_alone(tmp_path):
    """GPT-2 with dropout 0.1: both values come from one forward pass (the same dropout draws), and
    the RNG is forked, so the run equals one whose check is skipped, bit for bit."""
    trainers = {}
    for name in ("checked", "unchecked"):
        trainer = AggTrainer(model=tiny_gpt2(dropout=0.1), args=training_args(tmp_path / name, max_steps=3),
                             train_dataset=dataset(), agg_alpha=ALPHA)
        if name == "unchecked":
            trainer.model_loss_is_head_cross_entropy = lambda model, inputs: True
        trainer.train()
        trainers[name] = trainer
    own, head = trainers["checked"].model_loss_check
    assert math.isclose(own, head, rel_tol=1e-6), (own, head)
    for (name, p1), (_, p2) in zip(trainers["checked"].model.named_parameters(),
                                   trainers["unchecked"].model.named_parameters()):
        assert torch.equal(p1, p2), name


# -- 6. refusals ---------------------------------------------------------------------------------
def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip(), message
    for word in words:
        assert word in message, message


def test_a_head_resized_after_the_trainer_was_built_is_refused(tmp_path):
    model = tiny_gpt2()
    trainer = AggTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(8), agg_alpha=ALPHA)
    model.resize_token_embeddings(V + 8, mean_resizing=False)
    with pytest.raises(AggConfigError) as excinfo:
        trainer.train()
    _one_line(excinfo, "resized", "resize_token_embeddings", str(V + 8), str(V), "then build AggTrainer")
    assert trainer.state.global_step == 0


def test_a_model_that_soft_caps_its_logits_is_served_by_the_gated_layer_from_the_start(tmp_path):
    """Soft-capping hardly moves a fresh model's small logits, so the first-step check could miss it:
    the config decides, before training (gated under 'auto', refused under 'fused')."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(**SMALL, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0)
    trainer = AggTrainer(model=Gemma2ForCausalLM(config), args=training_args(tmp_path, max_steps=2),
                         train_dataset=dataset(8), agg_alpha=ALPHA)
    assert trainer.agg_output_layer == "gated"
    trainer.train()
    assert trainer.agg.num_updates == 2 and trainer.model_loss_check is None  # no check was needed
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=Gemma2ForCausalLM(config), args=training_args(tmp_path), agg_output_layer="fused")
    _one_line(excinfo, "Gemma2ForCausalLM", "final_logit_softcapping = 30.0", "agg_output_layer='gated'")


def test_models_it_cannot_serve_are_refused(tmp_path):
    biased = tiny_gpt2(tied=False)
    biased.lm_head = torch.nn.Linear(16, V, bias=True)
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=biased, args=training_args(tmp_path))
    _one_line(excinfo, "bias", "GPT2LMHeadModel")
    torch.manual_seed(0)
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=GPT2Model(tiny_config()), args=training_args(tmp_path))
    _one_line(excinfo, "GPT2Model", "output head")


@pytest.mark.parametrize("options, words", [
    ({"agg_alpha": 0.0}, ("alpha", "(0, 1]")),
    ({"agg_alpha": 1.01}, ("alpha", "(0, 1]")),
    ({"agg_window": 0}, ("window",)),
    ({"agg_window": -2}, ("window",)),
    ({"agg_output_layer": "full"}, ("output_layer", "auto, fused, gated")),
])
def test_bad_options_are_refused(tmp_path, options, words):
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path), **options)
    _one_line(excinfo, *words)
    with pytest.raises(AggConfigError) as excinfo:
        AggArguments(**options)
    _one_line(excinfo, *words)


def test_counter_of_another_vocabulary_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save({"_extra_state": {**counter_state(AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path))),
                                 "vocab_size": V + 2}}, checkpoint / AGG_COUNTER_NAME)
    trainer = AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path))
    with pytest.raises(AggConfigError) as excinfo:
        trainer.load_agg_counter(str(checkpoint))
    _one_line(excinfo, str(V + 2), str(V), "vocabulary")
    with pytest.raises(AggConfigError) as excinfo:
        AggTrainer(model=tiny_gpt2(), args=training_args(tmp_path), agg_args=AggArguments(), agg_alpha=0.1)
    _one_line(excinfo, "agg_args")


def test_hf_arguments_parse_next_to_training_arguments(tmp_path):
    from transformers import HfArgumentParser

    training, agg = HfArgumentParser((TrainingArguments, AggArguments)).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--agg_alpha", "0.05", "--agg_window", "7", "--use_cpu", "true"]
    )
    assert agg.agg_alpha == 0.05 and agg.agg_window == 7
    json.dumps(agg.__dict__)


# -- the logits ----------------------------------------------------------------------------------
def _vocab_tensor_shapes(trainer, model, batch, vocab):
    """Shapes of every tensor with a last dimension ``vocab`` that forward and backward produce."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dim() >= 2 and t.shape[-1] == vocab:
                    shapes.append(tuple(t.shape))
            return out

    with Spy():
        trainer.compute_loss(model, dict(batch)).backward()
    return shapes


def test_full_logits_are_never_built(tmp_path):
    data = dataset(4)
    batch = {"input_ids": data.ids, "labels": data.labels}
    rows = int((data.labels[:, 1:] != IGNORE).sum())
    vocab = 53  # no other dimension of the model has this size
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(tied=False, vocab=vocab)).to(torch.float64)
    trainer = AggTrainer(model=model, args=training_args(tmp_path), agg_alpha=ALPHA)
    first = _vocab_tensor_shapes(trainer, model, batch, vocab)
    # The first training batch: the model's own loss is compared with AGG's once, on one example.
    assert [s for s in first if len(s) == 3] and all(s[0] == 1 for s in first if len(s) == 3)
    one_pass = _vocab_tensor_shapes(trainer, model, batch, vocab)
    assert (rows, vocab) in one_pass  # the spy sees the loss's one logits tensor...
    assert not [s for s in one_pass if len(s) == 3]  # ...and never the model's (batch, length, V) logits
    chunked_trainer = AggTrainer(model=model, args=training_args(tmp_path), agg_alpha=ALPHA, agg_chunk_size=5)
    chunked_trainer.compute_loss(model, dict(batch))  # its first batch, with the one-example check
    chunked = _vocab_tensor_shapes(chunked_trainer, model, batch, vocab)
    rows_of_logits = [s[0] for s in chunked if s != (16, vocab)]  # (d, V): W^T, not logits
    assert rows_of_logits and max(rows_of_logits) <= 5, chunked  # chunks of 5 positions only
    # The stock loss, for contrast: the spy does see the model's logits there.
    class Stock(AggTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            return model(**inputs).loss

    stock = _vocab_tensor_shapes(Stock(model=model, args=training_args(tmp_path), agg_alpha=ALPHA), model, batch, vocab)
    assert (4, T, vocab) in stock
