"""``language_modeling_agg``: fairseq's ``language_modeling`` feeding the AGG token counter."""

from dataclasses import dataclass, field
from typing import List

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from fairseq_agg.tasks.agg_task import AggTaskMixin


@dataclass
class LanguageModelingAggConfig(LanguageModelingConfig):
    train_subset: str = II("dataset.train_subset")
    update_freq: List[int] = II("optimization.update_freq")
    amp: bool = II("common.amp")
    no_valid_isotropy: bool = field(
        default=False, metadata={"help": "do not log I(W) of the output embedding at each validation"}
    )
    agg_keep_counter: bool = field(
        default=False,
        metadata={"help": "fine-tuning (--finetune-from-model, --reset-optimizer, --reset-dataloader): continue "
                          "the checkpoint's AGG token counter instead of starting a fresh one"},
    )


@register_task("language_modeling_agg", dataclass=LanguageModelingAggConfig)
class LanguageModelingAggTask(AggTaskMixin, LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self._init_agg()
