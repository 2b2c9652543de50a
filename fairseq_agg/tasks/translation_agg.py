"""``translation_agg``: fairseq's ``translation`` feeding the AGG token counter."""

from dataclasses import dataclass, field
from typing import List

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from fairseq_agg.tasks.agg_task import AggTaskMixin


@dataclass
class TranslationAggConfig(TranslationConfig):
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


@register_task("translation_agg", dataclass=TranslationAggConfig)
class TranslationAggTask(AggTaskMixin, TranslationTask):
    def __init__(self, cfg, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._init_agg()
