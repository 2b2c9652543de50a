"""Token-level unlikelihood training (Welleck et al. 2020): the UL baseline
``unlikelihood_cross_entropy`` and its AGG-gated twin ``agg_unlikelihood`` (paper Table 4)."""

from dataclasses import dataclass, field

import torch
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_agg import core
from fairseq_agg.criterions.agg_cross_entropy import AggCriterionBase, AggCrossEntropyConfig


def _unlikelihood_alpha_field():
    return field(default=1.0, metadata={"help": "weight of the unlikelihood term (the paper uses 1.0)"})


def _check_alpha(alpha: float) -> None:
    if alpha < 0:
        raise ValueError(f"--unlikelihood-alpha must be >= 0, got {alpha}")


def mle_and_unlikelihood(logits, target2d, epsilon, padding_idx, alpha):
    """Summed (loss, nll, ul) for logits of shape (B*T, V) and targets (B, T)."""
    lprobs = core.log_probs(logits)
    target = target2d.reshape(-1)
    mle, nll = core.label_smoothed_nll_loss(lprobs, target, epsilon, padding_idx)
    if alpha == 0:
        return mle, nll, torch.zeros_like(nll)
    rows, tokens = core.unlikelihood_candidates(target2d, padding_idx)
    ul = core.unlikelihood_loss(lprobs, rows, tokens)
    return mle + alpha * ul, nll, ul


def _logging_output(loss, nll, ul, sample, sample_size):
    return {
        "loss": loss.data,
        "nll_loss": nll.data,
        "ul_loss": ul.data,
        "ntokens": sample["ntokens"],
        "nsentences": sample["target"].size(0),
        "sample_size": sample_size,
    }


def _reduce_ul(logging_outputs):
    ul_sum = sum(log.get("ul_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    if ntokens > 0:
        # Natural-log units per token, like Welleck et al.'s tables.
        metrics.log_scalar("ul_loss", ul_sum / ntokens, ntokens, round=4)


@dataclass
class UnlikelihoodCrossEntropyConfig(FairseqDataclass):
    unlikelihood_alpha: float = _unlikelihood_alpha_field()
    label_smoothing: float = field(default=0.0, metadata={"help": "epsilon for label smoothing of the MLE term"})
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("unlikelihood_cross_entropy", dataclass=UnlikelihoodCrossEntropyConfig)
class UnlikelihoodCrossEntropyCriterion(FairseqCriterion):
    """MLE plus token-level unlikelihood on earlier targets of the same sequence."""

    def __init__(self, task, unlikelihood_alpha, label_smoothing, sentence_avg):
        super().__init__(task)
        _check_alpha(unlikelihood_alpha)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"--label-smoothing must lie in [0, 1), got {label_smoothing}")
        self.alpha = unlikelihood_alpha
        self.eps = label_smoothing
        self.sentence_avg = sentence_avg

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        logits = net_output[0]
        target2d = model.get_targets(sample, net_output)
        loss, nll, ul = mle_and_unlikelihood(
            logits.reshape(-1, logits.size(-1)), target2d, self.eps, self.padding_idx, self.alpha
        )
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        return loss, sample_size, _logging_output(loss, nll, ul, sample, sample_size)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        AggCriterionBase.reduce_agg_metrics(logging_outputs)
        _reduce_ul(logging_outputs)

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

    def __init__(self, task, cfg: AggUnlikelihoodConfig):
        super().__init__(task, cfg)
        _check_alpha(cfg.unlikelihood_alpha)
        self.alpha = cfg.unlikelihood_alpha

    @classmethod
    def criterion_name(cls):
        return "agg_unlikelihood"

    def forward(self, model, sample, reduce=True):
        if not reduce:
            raise ValueError("agg_unlikelihood only computes summed losses (reduce=True)")
        logits, _ = self.features_and_logits(model, sample)
        target2d = sample["target"]
        loss, nll, ul = mle_and_unlikelihood(logits, target2d, self.eps, self.padding_idx, self.alpha)
        sample_size = self.sample_size(sample)
        logging_output = {**_logging_output(loss, nll, ul, sample, sample_size), **self.logging_extras()}
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        cls.reduce_agg_metrics(logging_outputs)
        _reduce_ul(logging_outputs)
