"""``agg_cross_entropy``: (label-smoothed) cross-entropy with Adaptive Gradient Gating."""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_agg import core
from fairseq_agg.errors import AggConfigError
from fairseq_agg.modeling import output_projection_weight

STUDY_MODES = ["none", "freeze", "detach_b", "detach_c", "detach_bc"]
# (g1, g2) on the static rare group: part (b) is gated by g1, part (c) by g2.
# Changing one of these between a run and its resume changes the gates: the resume logs it.
RESUME_CHECKED_OPTIONS = (
    "agg_alpha", "agg_window", "agg_no_g1", "agg_no_g2", "agg_static_after", "agg_study",
    "agg_study_rare_fraction", "label_smoothing", "unlikelihood_alpha",
)
STUDY_GATE_VALUES = {"freeze": (0.0, 0.0), "detach_b": (0.0, 1.0), "detach_c": (1.0, 0.0), "detach_bc": (0.0, 0.0)}


@dataclass
class AggCrossEntropyConfig(FairseqDataclass):
    agg_alpha: float = field(
        default=0.03,
        metadata={"help": "token k is rare when its average count per update over the window is below alpha; in (0, 1]"},
    )
    agg_window: Optional[int] = field(
        default=None,
        metadata={"help": "K, the number of past updates the token counter remembers (default: the updates of one epoch)"},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    agg_no_g1: bool = field(default=False, metadata={"help": "ablation: do not gate part (b) (gate g1 = 1)"})
    agg_no_g2: bool = field(default=False, metadata={"help": "ablation: do not gate part (c) (gate g2 = 1)"})
    agg_static_after: Optional[int] = field(
        default=None,
        metadata={"help": "ablation: freeze the rare group and its gates after this many updates"},
    )
    agg_study: ChoiceEnum(STUDY_MODES) = field(
        default="none",
        metadata={
            "help": "empirical study of paper Tables 1-2 on a static rare group instead of AGG: "
            "freeze (rare embeddings not trained), detach_b, detach_c, detach_bc (detach gradient parts)"
        },
    )
    agg_study_rare_fraction: float = field(
        default=0.2, metadata={"help": "size of the static rare group of --agg-study, as a fraction of the non-special tokens"}
    )
    loss_chunk_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "compute the output layer and loss in chunks of this many positions, so that the "
            "(positions x vocabulary) logits are never held at once; 0: one logits tensor; "
            "default: chunks of 256 positions or more, picked by shape (leaner and not slower: docs/performance.md)"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")


def check_loss_options(label_smoothing: float, loss_chunk_size: Optional[int]) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise AggConfigError(f"--label-smoothing must lie in [0, 1), got {label_smoothing}")
    if loss_chunk_size is not None and loss_chunk_size < 0:
        raise AggConfigError(
            f"--loss-chunk-size must be >= 0 (0: one logits tensor; leave it out to pick by shape), got {loss_chunk_size}"
        )


def objective(criterion, model, sample, gates, label_smoothing, unlikelihood_alpha, loss_chunk_size,
              sentence_avg, log_unlikelihood):
    """One decoder pass and ``core.gated_loss``: what every criterion of the plug-in returns."""
    # Before the forward: a decoder without the output layer AGG needs (lstm_lm) is refused in
    # one line instead of failing on features_only.
    weight = output_projection_weight(model)
    features, extra = model(**sample["net_input"], features_only=True)
    loss, nll, ul = core.gated_loss(
        features.reshape(-1, features.size(-1)),
        weight,
        model.get_targets(sample, (features, extra)),
        gates,
        ignore_index=criterion.padding_idx,
        label_smoothing=label_smoothing,
        unlikelihood_alpha=unlikelihood_alpha,
        chunk_rows=loss_chunk_size,
    )
    sample_size = sample["target"].size(0) if sentence_avg else sample["ntokens"]
    logging_output = {
        "loss": loss.data,
        "nll_loss": nll.data,
        "ntokens": sample["ntokens"],
        "nsentences": sample["target"].size(0),
        "sample_size": sample_size,
    }
    if log_unlikelihood:
        logging_output["ul_loss"] = ul.data
    return loss, sample_size, logging_output


class AggCriterionBase(FairseqCriterion):
    """Shared by the AGG criteria: validation, gates and the single logits pass."""

    def __init__(self, task, cfg: AggCrossEntropyConfig):
        super().__init__(task)
        if not hasattr(task, "configure_agg"):  # the AGG tasks' mixin, without importing the tasks
            raise AggConfigError(
                f"criterion {self.criterion_name()} needs a task that feeds its token counter: use "
                f"--task language_modeling_agg for language modelling or --task translation_agg for "
                f"translation (got {type(task).__name__})"
            )
        if not 0.0 < cfg.agg_alpha <= 1.0:
            raise AggConfigError(f"--agg-alpha must lie in (0, 1], got {cfg.agg_alpha}")
        if cfg.agg_window is not None and cfg.agg_window < 1:
            raise AggConfigError(f"--agg-window must be a positive number of updates, got {cfg.agg_window}")
        check_loss_options(cfg.label_smoothing, cfg.loss_chunk_size)
        if cfg.agg_static_after is not None and cfg.agg_static_after < 1:
            raise AggConfigError(f"--agg-static-after must be a positive number of updates, got {cfg.agg_static_after}")
        study = str(cfg.agg_study)
        if study not in STUDY_MODES:
            raise AggConfigError(f"unknown --agg-study mode {study!r}; choose one of {', '.join(STUDY_MODES)}")
        if not 0.0 < cfg.agg_study_rare_fraction < 1.0:
            raise AggConfigError(
                f"--agg-study-rare-fraction must lie in (0, 1) (the share of non-special tokens in the "
                f"static rare group of --agg-study), got {cfg.agg_study_rare_fraction}"
            )
        self.cfg = cfg
        self.sentence_avg = cfg.sentence_avg
        self.eps = cfg.label_smoothing
        self.counter = task.configure_agg(window=cfg.agg_window, static_after=cfg.agg_static_after)
        self.study = study
        self.static_gates = None
        if study != "none":
            dictionary = task.target_dictionary
            counts = torch.tensor(dictionary.count, dtype=torch.float64)
            padding_words = torch.tensor([sym.startswith("madeupword") for sym in dictionary.symbols])
            rare = core.static_rare_mask(counts, dictionary.nspecial, cfg.agg_study_rare_fraction, padding_words)
            self.static_gates = core.constant_gates(rare, *STUDY_GATE_VALUES[study])
            if study == "freeze":
                task.freeze_rows(rare)
        self._gates_cache = (None, None)

    @classmethod
    def criterion_name(cls):
        return "agg_cross_entropy"

    def agg_options(self) -> dict:
        """The options that shape the gates, saved with every checkpoint to flag a changed resume."""
        options = {name: getattr(self.cfg, name) for name in RESUME_CHECKED_OPTIONS if hasattr(self.cfg, name)}
        return {name: str(value) if name == "agg_study" else value for name, value in options.items()}

    def current_gates(self, device=None) -> core.Gates:
        if self.static_gates is not None:
            if device is not None:
                self.static_gates = self.static_gates.to(device)
            return self.static_gates
        key, gates = self._gates_cache
        if key != self.counter.version:
            gates = core.compute_gates(
                self.counter.average(),
                self.cfg.agg_alpha,
                self.counter.nspecial,
                use_g1=not self.cfg.agg_no_g1,
                use_g2=not self.cfg.agg_no_g2,
            )
            self._gates_cache = (self.counter.version, gates)
        return gates

    unlikelihood_alpha = 0.0
    logs_unlikelihood = False

    def forward(self, model, sample, reduce=True):
        if not reduce:
            raise AggConfigError(f"{self.criterion_name()} only computes summed losses (reduce=True)")
        training = self.training and torch.is_grad_enabled()
        gates = self.current_gates(sample["target"].device) if training else None
        loss, sample_size, logging_output = objective(
            self, model, sample, gates, self.eps, self.unlikelihood_alpha, self.cfg.loss_chunk_size,
            self.sentence_avg, self.logs_unlikelihood,
        )
        logging_output.update(self.logging_extras())
        return loss, sample_size, logging_output

    def logging_extras(self) -> dict:
        # Summable so that fairseq can all-reduce logs on CPU workers.
        return {"agg_rare": self.current_gates().num_rare, "agg_logs": 1}

    @staticmethod
    def reduce_agg_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        n_logs = sum(log.get("agg_logs", 0) for log in logging_outputs)
        if n_logs > 0:
            rare = sum(log.get("agg_rare", 0) for log in logging_outputs)
            metrics.log_scalar("agg_rare", rare / n_logs, n_logs, round=1)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@register_criterion("agg_cross_entropy", dataclass=AggCrossEntropyConfig)
class AggCrossEntropyCriterion(AggCriterionBase):
    """Cross-entropy (optionally label-smoothed) whose output-embedding gradient is gated
    by AGG. Loss values and feature gradients are exactly those of fairseq's
    ``cross_entropy`` / ``label_smoothed_cross_entropy``."""

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        cls.reduce_agg_metrics(logging_outputs)
