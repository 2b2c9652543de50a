"""Token-level unlikelihood training (Welleck et al. 2020): the UL baseline
``unlikelihood_cross_entropy`` and its AGG-gated twin ``agg_unlikelihood`` (paper Table 4).

The candidates of position t are the distinct earlier targets of the same sequence, without the
current target and without padding (``core.unlikelihood_candidates``). This departs from the
original code (``candidate_penalty_cross_entropy`` of Welleck et al.) in three ways, each a fix:
its candidates come from the whole flattened batch (earlier sequences leak into later ones), its
padding positions get the unlikelihood term too, and its candidate matrix holds the padding index
in every row, which adds -log(1 - p_pad) at every position (tests/test_unlikelihood.py,
tests/test_unlikelihood_original.py)."""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_agg.criterions.agg_cross_entropy import (
    AggCriterionBase,
    AggCrossEntropyConfig,
    check_loss_options,
    objective,
)
from fairseq_agg.errors import AggConfigError


def _unlikelihood_alpha_field():
    return field(default=1.0, metadata={"help": "weight of the unlikelihood term (the paper uses 1.0)"})


def _check_alpha(alpha: float) -> None:
    if alpha < 0:
        raise AggConfigError(f"--unlikelihood-alpha must be >= 0, got {alpha}")


def log_unlikelihood_metric(logging_outputs) -> None:
    """``ul_loss``: the summed unlikelihood term per target token, in natural-log units as in
    Welleck et al."""
    ul_sum = sum(log.get("ul_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    if ntokens > 0:
        metrics.log_scalar("ul_loss", ul_sum / ntokens, ntokens, round=4)


def _reduce_metrics(logging_outputs) -> None:
    AggCriterionBase.reduce_agg_metrics(logging_outputs)
    log_unlikelihood_metric(logging_outputs)


@dataclass
class UnlikelihoodCrossEntropyConfig(FairseqDataclass):
    unlikelihood_alpha: float = _unlikelihood_alpha_field()
    label_smoothing: float = field(default=0.0, metadata={"help": "epsilon for label smoothing of the MLE term"})
    loss_chunk_size: Optional[int] = field(
        default=None,
        metadata={"help": "as for agg_cross_entropy: positions per output-layer chunk, 0 for one logits tensor, "
                          "default picked by shape"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("unlikelihood_cross_entropy", dataclass=UnlikelihoodCrossEntropyConfig)
class UnlikelihoodCrossEntropyCriterion(FairseqCriterion):
    """MLE plus token-level unlikelihood on the earlier targets of the same sequence. Works
    with any language-modelling or translation task."""

    def __init__(self, task, cfg: UnlikelihoodCrossEntropyConfig):
        super().__init__(task)
        _check_alpha(cfg.unlikelihood_alpha)
        check_loss_options(cfg.label_smoothing, cfg.loss_chunk_size)
        self.cfg = cfg

    def forward(self, model, sample, reduce=True):
        if not reduce:
            raise AggConfigError("unlikelihood_cross_entropy only computes summed losses (reduce=True)")
        cfg = self.cfg
        return objective(self, model, sample, None, cfg.label_smoothing, cfg.unlikelihood_alpha,
                         cfg.loss_chunk_size, cfg.sentence_avg, log_unlikelihood=True)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        _reduce_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@dataclass
class AggUnlikelihoodConfig(AggCrossEntropyConfig):
    unlikelihood_alpha: float = _unlikelihood_alpha_field()


@register_criterion("agg_unlikelihood", dataclass=AggUnlikelihoodConfig)
class AggUnlikelihoodCriterion(AggCriterionBase):
    """Unlikelihood training with AGG. The gate applies to the output-embedding gradient of
    the whole objective (MLE and UL terms alike); the feature path stays ungated."""

    logs_unlikelihood = True

    def __init__(self, task, cfg: AggUnlikelihoodConfig):
        super().__init__(task, cfg)
        _check_alpha(cfg.unlikelihood_alpha)
        self.unlikelihood_alpha = cfg.unlikelihood_alpha

    @classmethod
    def criterion_name(cls):
        return "agg_unlikelihood"

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        _reduce_metrics(logging_outputs)
