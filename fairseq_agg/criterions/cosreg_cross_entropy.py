"""``cosreg_cross_entropy``: cross-entropy plus the cosine regulariser of Gao et al. (2019),
"Representation Degeneration Problem in Training Natural Language Generation Models".

Objective per update: mean (label-smoothed) cross-entropy per token + gamma * C(W), with C(W)
the mean cosine similarity over pairs of distinct rows of the output embedding W
(:func:`fairseq_agg.remedies.mean_pairwise_cosine`). ``--unlikelihood-alpha A`` > 0 adds
token-level unlikelihood (the objective of ``unlikelihood_cross_entropy``): UL + CosReg.

fairseq criteria return a *sum* over the micro-batch, and the trainer divides the gradients
of all micro-batches of an update (and all workers) by their total ``sample_size``. So each
micro-batch adds ``gamma * C(W) * sample_size``: over the update these add up to
``gamma * C(W) * total sample_size``, which the division turns into gamma * C(W), whatever
``--update-freq``, the number of workers, or ``--sentence-avg`` (then sample_size counts
sentences). W does not change between the micro-batches of an update, so C(W) is the same in
each. Gao et al. divide their sum over pairs by N^2 instead of N (N - 1): their gamma is this
one times N / (N - 1).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from fairseq_agg import core
from fairseq_agg.criterions.unlikelihood import log_unlikelihood_metric
from fairseq_agg.remedies import mean_pairwise_cosine
from fairseq_agg.errors import AggConfigError
from fairseq_agg.modeling import output_projection_weight


@dataclass
class CosRegCrossEntropyConfig(FairseqDataclass):
    cosreg_gamma: float = field(
        default=1.0,
        metadata={"help": "weight gamma of the mean pairwise cosine of the output embedding rows, per token; >= 0"},
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    unlikelihood_alpha: float = field(
        default=0.0,
        metadata={"help": "weight of a token-level unlikelihood term as in unlikelihood_cross_entropy "
                  "(UL + CosReg); 0: none"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("cosreg_cross_entropy", dataclass=CosRegCrossEntropyConfig)
class CosRegCrossEntropyCriterion(FairseqCriterion):
    """fairseq's ``cross_entropy`` (``label_smoothed_cross_entropy`` with
    ``--label-smoothing``) plus gamma times the mean pairwise cosine of the output embedding
    rows. Any task whose model has a bias-free ``decoder.output_projection`` (fairseq's
    transformer language and translation models)."""

    def __init__(self, task, cfg: CosRegCrossEntropyConfig):
        super().__init__(task)
        if not cfg.cosreg_gamma >= 0.0:
            raise AggConfigError(f"--cosreg-gamma must be >= 0 (0: plain cross-entropy), got {cfg.cosreg_gamma}")
        if not 0.0 <= cfg.label_smoothing < 1.0:
            raise AggConfigError(f"--label-smoothing must lie in [0, 1), got {cfg.label_smoothing}")
        if not cfg.unlikelihood_alpha >= 0.0:
            raise AggConfigError(f"--unlikelihood-alpha must be >= 0, got {cfg.unlikelihood_alpha}")
        self.gamma = cfg.cosreg_gamma
        self.eps = cfg.label_smoothing
        self.unlikelihood_alpha = cfg.unlikelihood_alpha
        self.sentence_avg = cfg.sentence_avg

    def forward(self, model, sample, reduce=True):
        if not reduce:
            raise AggConfigError("cosreg_cross_entropy only computes summed losses (reduce=True)")
        net_output = model(**sample["net_input"])
        loss, nll_loss, ul_loss = self.compute_loss(model, net_output, sample)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        # With gamma 0 the cosine is only logged: no graph for it.
        with torch.set_grad_enabled(self.gamma > 0 and torch.is_grad_enabled()):
            cosine = mean_pairwise_cosine(self.output_embedding(model))
        if self.gamma > 0:
            loss = loss + (self.gamma * sample_size) * cosine
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            # Summed over micro-batches and workers, divided by cosreg_logs when reduced.
            "cosreg": cosine.detach().float(),
            "cosreg_logs": 1,
        }
        if ul_loss is not None:
            logging_output["ul_loss"] = ul_loss.data
        return loss, sample_size, logging_output

    @staticmethod
    def output_embedding(model) -> torch.Tensor:
        try:
            return output_projection_weight(model)
        except ValueError as error:
            raise AggConfigError(f"cosreg_cross_entropy regularises the output embedding W, so: {error}") from error

    def compute_loss(self, model, net_output, sample):
        """Summed (loss, nll, ul) of the cross-entropy part; ul is None without unlikelihood."""
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        lprobs = lprobs.view(-1, lprobs.size(-1))
        targets = model.get_targets(sample, net_output)
        target = targets.view(-1)
        if self.eps == 0:
            # fairseq's cross_entropy, operation for operation.
            loss = nll_loss = F.nll_loss(lprobs, target, ignore_index=self.padding_idx, reduction="sum")
        else:
            loss, nll_loss = label_smoothed_nll_loss(lprobs, target, self.eps, ignore_index=self.padding_idx, reduce=True)
        if self.unlikelihood_alpha == 0:
            return loss, nll_loss, None
        ul_loss = core.unlikelihood_loss(lprobs, *core.unlikelihood_candidates(targets, self.padding_idx))
        return loss + self.unlikelihood_alpha * ul_loss, nll_loss, ul_loss

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", nll_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        n_logs = sum(log.get("cosreg_logs", 0) for log in logging_outputs)
        if n_logs > 0:
            cosine = sum(log.get("cosreg", 0) for log in logging_outputs)
            metrics.log_scalar("cosreg", cosine / n_logs, n_logs, round=4)
        if any("ul_loss" in log for log in logging_outputs):
            log_unlikelihood_metric(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
