"""Narrow fixes of fairseq 0.12 that a paper-scale run needs, applied once when the plug-in is
imported (``--user-dir fairseq_agg``, or any import of :mod:`fairseq_agg` with fairseq installed).

Each fix wraps one fairseq function and changes nothing else; stock runs without the plug-in are
untouched. What they fix (docs/fairseq.md, "Long runs"):

* ``--bf16`` is not TPU: ``options.parse_args_and_arch`` sets ``args.tpu = True`` whenever
  ``--bf16`` or ``--memory-efficient-bf16`` is given, which sends a GPU (or CPU) run down the XLA
  path. Under the plug-in ``tpu`` stays what ``--tpu`` says.
* Checkpoints load on every data-parallel rank: fairseq broadcasts the loaded checkpoint, which
  holds omegaconf containers, and torch >= 2.6 unpickles it weights-only. The classes a fairseq
  checkpoint holds are allow-listed (``torch.serialization.add_safe_globals``).
* ``checkpoint_last.pt`` is written atomically: fairseq copies the first checkpoint file of an
  update onto the others with a plain ``shutil.copyfile``; the copy now goes to a temporary file
  that is renamed into place.
* Every checkpoint is sealed with a checksum that resumes verify (:mod:`fairseq_agg.checkpoints`).
  A resume that finds ``checkpoint_last.pt`` damaged (empty, truncated, or failing its checksum)
  resumes from the intact checkpoint of the save directory that has trained the most updates,
  and says so.
* Resumes that cannot go well are refused in one line before anything is written: an explicit
  ``--restore-file`` that does not exist (under the plug-in's tasks; fairseq would start afresh
  and overwrite the save directory), a ``--max-update`` the checkpoint has already reached
  (fairseq would train one more update and rewrite it), another ``--criterion`` than the
  checkpoint's without ``--reset-optimizer`` (fairseq's assertion).
* ``--ddp-backend pytorch_ddp`` (fairseq's default) works on CPU: torch's DDP takes device ids
  for GPU modules only, and fairseq always passed one.
* The AGG token counter travels in the checkpoint's ``extra_state`` (key ``agg``), which stock
  fairseq tools ignore, and is restored on every rank when training resumes; fine-tuning
  (``--finetune-from-model``, ``--reset-optimizer``, ``--reset-dataloader``) starts a fresh one
  unless ``--agg-keep-counter`` is given.
* Start-up refusals (:class:`fairseq_agg.errors.AggConfigError`) and precisions this machine
  cannot run print one line and exit with status 2 instead of a traceback.
"""

import argparse
import collections
import logging
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import List, Optional

import torch

from fairseq_agg.checkpoints import checkpoint_to_resume, seal, training_progress
from fairseq_agg.errors import AggConfigError

logger = logging.getLogger(__name__)

REFUSAL_EXIT_CODE = 2
CHECKPOINT_KEY = "agg"  # under the checkpoint's extra_state
LEGACY_COUNTER_KEY = "agg_counter._extra_state"  # in the model state, up to fairseq-agg 0.1


# -- what a fairseq checkpoint holds, for weights-only unpickling -----------------------------------
def allow_checkpoint_classes() -> None:
    if not hasattr(torch.serialization, "add_safe_globals"):
        return
    import omegaconf
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import base, nodes

    node_classes = [getattr(nodes, name) for name in dir(nodes) if name.endswith("Node")]
    torch.serialization.add_safe_globals([
        argparse.Namespace, typing.Any, collections.defaultdict,
        dict, list, tuple, set, int, float, str, bool,
        omegaconf.DictConfig, omegaconf.ListConfig, base.ContainerMetadata, base.Metadata,
        distributed_utils._TensorPlaceholder,  # stands for each tensor of a broadcast checkpoint
        *[cls for cls in node_classes if isinstance(cls, type)],
    ])


# -- --bf16 is not --tpu ------------------------------------------------------------------------
def _keep_tpu_explicit(parse_args_and_arch):
    def parse(parser, input_args=None, *args, **kwargs):
        parsed = parse_args_and_arch(parser, input_args, *args, **kwargs)
        given = sys.argv[1:] if input_args is None else input_args
        result = parsed[0] if isinstance(parsed, tuple) else parsed
        if getattr(result, "tpu", False) and "--tpu" not in given:
            result.tpu = False
        return parsed

    parse.__wrapped__ = parse_args_and_arch
    return parse


# -- atomic copies of checkpoint files -------------------------------------------------------------
def _atomic_local_copy(copy):
    def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        from fairseq.file_io import PathManager

        if PathManager.path_requires_pathmanager(dst_path):
            return copy(src_path, dst_path, overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        tmp = f"{dst_path}.tmp{os.getpid()}"
        try:
            copy(src_path, tmp, True)
            os.replace(tmp, dst_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True

    atomic_copy.__wrapped__ = copy
    return staticmethod(atomic_copy)


# -- sealed checkpoints -----------------------------------------------------------------------------
def _sealed_save(save):
    def torch_persistent_save(obj, filename, async_write: bool = False):
        from fairseq.file_io import PathManager

        if async_write or not isinstance(filename, str) or PathManager.path_requires_pathmanager(filename):
            return save(obj, filename, async_write)
        # Sealed before it takes its name, so that no crash leaves a file and a seal that disagree.
        # One name per checkpoint (as fairseq's own ".tmp"): what a crash leaves is reused, not piled up.
        unsealed = f"{filename}.unsealed"
        try:
            save(obj, unsealed)
            seal(unsealed)
            os.replace(unsealed, filename)
        finally:
            if os.path.exists(unsealed):
                os.remove(unsealed)

    torch_persistent_save.__wrapped__ = save
    return torch_persistent_save


# -- data parallel on CPU -------------------------------------------------------------------------
def _cpu_modules_without_device_ids(ddp_class):
    def distributed_data_parallel(module, device_ids=None, output_device=None, **kwargs):
        if all(p.device.type == "cpu" for p in module.parameters()):
            # torch's DDP takes device ids for GPU modules only; fairseq passes --device-id always.
            device_ids = output_device = None
        return ddp_class(module, device_ids=device_ids, output_device=output_device, **kwargs)

    distributed_data_parallel.__wrapped__ = ddp_class
    return distributed_data_parallel


# -- the AGG state in the trainer's checkpoints ---------------------------------------------------
def _fp32_master_params(optimizer) -> Optional[List[torch.Tensor]]:
    """The float32 master copy that fairseq's --fp16/--bf16 optimizer (not the memory-efficient
    one) keeps of the parameters, in a fixed order; None for other optimizers."""
    fp32 = getattr(optimizer, "fp32_params", None)
    if isinstance(fp32, dict):
        return [fp32[key].data for key in sorted(fp32)]
    if isinstance(fp32, list):
        return [p.data for p in fp32]
    return None


def _with_agg_state(state_dict):
    def trainer_state_dict(self):
        state = state_dict(self)
        save = getattr(self.task, "agg_checkpoint_state", None)
        if save is not None:
            agg_state = save(self.get_criterion())
            # fairseq saves the model in its training precision and rebuilds the float32 master
            # weights from it on resume, so a resumed --fp16/--bf16 run would continue from
            # rounded weights; the master copy is saved beside the counter.
            master = _fp32_master_params(self._optimizer)
            if master is not None:
                agg_state["fp32_master_params"] = master
            state["extra_state"][CHECKPOINT_KEY] = agg_state
        return state

    trainer_state_dict.__wrapped__ = state_dict
    return trainer_state_dict


def _restoring_agg_state(load_checkpoint):
    def trainer_load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        filename = checkpoint_to_resume(filename)
        if not reset_optimizer and os.path.isfile(filename):
            check_resumable(filename, self.cfg, type(self.get_criterion()).__name__)
        try:
            extra_state = load_checkpoint(self, filename, reset_optimizer, *args, **kwargs)
        except Exception as error:
            # fairseq replaces torch's account of the mismatch with "ensure that the architectures
            # match"; the first mismatch torch found is what the user needs.
            cause = error.__context__
            if "Cannot load model parameters" not in str(error) or not isinstance(cause, RuntimeError):
                raise
            details = [line.strip() for line in str(cause).splitlines()[1:] if line.strip()]
            first = details[0] if details else str(cause).splitlines()[0]
            raise AggConfigError(
                f"cannot resume from {filename}: {first} The model options or the dictionary differ from "
                f"the checkpoint's: resume with the same ones, or train into a new --save-dir"
            ) from error
        restore = getattr(self.task, "restore_agg_checkpoint_state", None)
        if restore is not None and extra_state is not None:
            agg_state = extra_state.get(CHECKPOINT_KEY)
            restore(agg_state, self.get_criterion(), fine_tuning=fine_tuning_option(self.cfg.checkpoint, reset_optimizer),
                    next_update=self.get_num_updates() + 1)
            if agg_state and "fp32_master_params" in agg_state and not reset_optimizer:
                _restore_fp32_master_params(self._optimizer, agg_state["fp32_master_params"])
        return extra_state

    trainer_load_checkpoint.__wrapped__ = load_checkpoint
    return trainer_load_checkpoint


def _restore_fp32_master_params(optimizer, saved: List[torch.Tensor]) -> None:
    current = _fp32_master_params(optimizer)
    if current is None or [t.shape for t in current] != [t.shape for t in saved]:
        logger.warning("the checkpoint's float32 master weights do not fit this run's optimizer; "
                       "continuing from the model weights in their training precision")
        return
    for target, value in zip(current, saved):
        target.copy_(value.to(target.device))


# -- resumes that cannot go well ---------------------------------------------------------------------
def fine_tuning_option(checkpoint_cfg, reset_optimizer: bool) -> Optional[str]:
    """The option that makes loading a checkpoint a fresh start from its weights, if any
    (``--finetune-from-model`` reaches the trainer as a reset optimizer)."""
    if reset_optimizer:
        return "--reset-optimizer" if checkpoint_cfg.reset_optimizer else "--finetune-from-model"
    if checkpoint_cfg.reset_dataloader:
        return "--reset-dataloader"
    return None


def check_resumable(filename: str, cfg, criterion_class: str) -> None:
    """Refuse, before fairseq loads ``filename`` to resume its training, what fairseq would
    refuse with an assertion (another criterion) or get wrong (train past --max-update)."""
    progress = training_progress(filename)
    if progress is None or not progress.has_optimizer_state:
        return  # fairseq resumes neither its optimizer nor its update count
    if progress.criterion_class and progress.criterion_class != criterion_class:
        old = progress.criterion or progress.criterion_class
        raise AggConfigError(
            f"{filename} was trained with --criterion {old} and this run has --criterion {cfg.criterion._name}: "
            f"its optimizer state cannot resume under another criterion; pass --reset-optimizer to "
            f"continue from its weights with a fresh optimizer, or resume with --criterion {old}"
        )
    max_update = cfg.optimization.max_update
    if 0 < max_update <= progress.num_updates:
        raise AggConfigError(
            f"{filename} has trained {progress.num_updates} updates, and --max-update is {max_update}: there "
            f"is nothing left to train; raise --max-update above {progress.num_updates} to go on, or pass "
            f"--reset-optimizer to train {max_update} updates from its weights"
        )


def _is_agg_task(task_name) -> bool:
    from fairseq.tasks import TASK_REGISTRY

    from fairseq_agg.tasks.agg_task import AggTaskMixin

    task = TASK_REGISTRY.get(task_name)
    return isinstance(task, type) and issubclass(task, AggTaskMixin)


def check_restore_file(cfg) -> None:
    """Under the plug-in's tasks, an explicit --restore-file must exist: fairseq would log "No
    existing checkpoint found", train from scratch and overwrite the save directory."""
    from fairseq.file_io import PathManager

    checkpoint = cfg.checkpoint
    given = checkpoint.restore_file
    if given == "checkpoint_last.pt" or not _is_agg_task(cfg.task._name):
        return
    path = given.replace(".pt", checkpoint.checkpoint_suffix + ".pt") if checkpoint.checkpoint_suffix else given
    if PathManager.path_requires_pathmanager(path) or os.path.isfile(path):
        return
    save_dir = Path(checkpoint.save_dir)
    if not Path(path).is_absolute() and (save_dir / path).is_file():
        fix = (f"fairseq reads it from the current folder ({os.getcwd()}), not from --save-dir: pass "
               f"--restore-file {shlex.quote(str((save_dir / path).resolve()))}")
    else:
        names = sorted(p.name for p in save_dir.glob("checkpoint*.pt"))
        fix = f"give an existing checkpoint file ({save_dir} holds {', '.join(names) if names else 'none'})"
    raise AggConfigError(f"--restore-file {given} does not exist; {fix}")


# -- one line instead of a traceback ----------------------------------------------------------------
def refuse(message: str) -> typing.NoReturn:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] not in ("", "-c") else "fairseq"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(REFUSAL_EXIT_CODE)


def check_precision(cfg) -> None:
    """``--fp16``/``--bf16`` on a machine that cannot run them, named before any work starts."""
    common = cfg.common
    if getattr(common, "tpu", False):
        return
    cuda = torch.cuda.is_available() and not common.cpu
    fp16 = common.fp16 or common.memory_efficient_fp16
    bf16 = common.bf16 or common.memory_efficient_bf16
    if fp16 and not cuda:
        where = "--cpu was given" if common.cpu else "this machine has no CUDA GPU"
        raise AggConfigError(
            f"--fp16 needs a CUDA GPU and {where}; train in float32 (drop --fp16) or in bfloat16 (--bf16)"
        )
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise AggConfigError(
            f"--bf16 needs a GPU with bfloat16 support and {torch.cuda.get_device_name()} has none; use --fp16"
        )


PLUGIN_CRITERIA = ("agg_cross_entropy", "agg_unlikelihood", "unlikelihood_cross_entropy", "cosreg_cross_entropy")


def check_ddp_backend(cfg) -> None:
    """``--ddp-backend fully_sharded`` (fairscale's FSDP) under the plug-in's criteria, refused
    before any work: they read the output embedding after the model's forward, when that FSDP has
    already freed its gathered copy, and fairscale's FSDP runs on CUDA devices only."""
    backend = str(getattr(cfg.distributed_training, "ddp_backend", ""))
    criterion = getattr(cfg.criterion, "_name", None) if cfg.criterion is not None else None
    if backend == "fully_sharded" and criterion in PLUGIN_CRITERIA:
        raise AggConfigError(
            f"--criterion {criterion} cannot train under --ddp-backend fully_sharded: the criterion reads the "
            f"output embedding after the model's forward, when fairscale's FSDP has already freed its gathered "
            f"weights (and that FSDP runs on CUDA only); use --ddp-backend pytorch_ddp (or legacy_ddp), or "
            f"torch's FSDP2 with fairseq_agg.training (docs: Scaling out)"
        )


class _GuardedMain:
    """fairseq's ``main`` printing the plug-in's refusals in one line; a class, not a closure,
    so that ``torch.multiprocessing.spawn`` can pickle it for the workers it starts."""

    def __init__(self, main):
        self.main = main

    def __call__(self, cfg, **kwargs):
        try:
            return self.main(cfg, **kwargs)
        except AggConfigError as error:
            refuse(str(error))


def _refusing_in_one_line(call_main):
    def checked_call_main(cfg, main, **kwargs):
        try:
            check_precision(cfg)
            check_ddp_backend(cfg)
            check_restore_file(cfg)
            return call_main(cfg, _GuardedMain(main), **kwargs)
        except AggConfigError as error:
            refuse(str(error))
        except torch.multiprocessing.ProcessExitedException as error:
            if error.exit_code != REFUSAL_EXIT_CODE:
                raise
            sys.exit(REFUSAL_EXIT_CODE)  # the worker has printed its one line

    checked_call_main.__wrapped__ = call_main
    return checked_call_main


def _patch(owner, name: str, wrap) -> None:
    current = owner.__dict__[name]
    function = current.__func__ if isinstance(current, staticmethod) else current
    if getattr(function, "_fairseq_agg_fix", False):
        return
    wrapped = wrap(function)
    (wrapped.__func__ if isinstance(wrapped, staticmethod) else wrapped)._fairseq_agg_fix = True
    setattr(owner, name, wrapped)


def apply() -> None:
    """Install every fix once (idempotent)."""
    from fairseq import checkpoint_utils, options, trainer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager
    from fairseq.models import distributed_fairseq_model

    allow_checkpoint_classes()
    _patch(options, "parse_args_and_arch", _keep_tpu_explicit)
    _patch(PathManager, "copy", _atomic_local_copy)
    _patch(checkpoint_utils, "torch_persistent_save", _sealed_save)
    _patch(distributed_fairseq_model, "DistributedDataParallel", _cpu_modules_without_device_ids)
    _patch(trainer.Trainer, "state_dict", _with_agg_state)
    _patch(trainer.Trainer, "load_checkpoint", _restoring_agg_state)
    _patch(distributed_utils, "call_main", _refusing_in_one_line)


def saved_counter_state(checkpoint: dict) -> Optional[dict]:
    """The AGG token counter saved in a loaded checkpoint, wherever its version kept it."""
    saved = (checkpoint.get("extra_state") or {}).get(CHECKPOINT_KEY)
    if saved is not None:
        return saved.get("counter")
    return (checkpoint.get("model") or {}).get(LEGACY_COUNTER_KEY)
