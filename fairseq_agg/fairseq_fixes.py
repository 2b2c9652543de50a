"""Narrow fixes of fairseq 0.12 that a paper-scale run needs, applied once when the plug-in is
imported (``--user-dir fairseq_agg``, or any import of :mod:`fairseq_agg` with fairseq installed).

Each fix wraps one fairseq function and changes nothing else; stock runs without the plug-in are
untouched. What they fix (README, "Long runs: precision, interruptions, resumes"):

* ``--bf16`` is not TPU: ``options.parse_args_and_arch`` sets ``args.tpu = True`` whenever
  ``--bf16`` or ``--memory-efficient-bf16`` is given, which sends a GPU (or CPU) run down the XLA
  path. Under the plug-in ``tpu`` stays what ``--tpu`` says.
* Checkpoints load on every data-parallel rank: fairseq broadcasts the loaded checkpoint, which
  holds omegaconf containers, and torch >= 2.6 unpickles it weights-only. The classes a fairseq
  checkpoint holds are allow-listed (``torch.serialization.add_safe_globals``).
* ``checkpoint_last.pt`` is written atomically: fairseq copies the first checkpoint file of an
  update onto the others with a plain ``shutil.copyfile``; the copy now goes to a temporary file
  that is renamed into place. A resume that still finds ``checkpoint_last.pt`` unreadable (empty
  or truncated, written by a run without the plug-in) resumes from the newest intact checkpoint
  of the save directory and says so.
* The AGG token counter travels in the checkpoint's ``extra_state`` (key ``agg``), which stock
  fairseq tools ignore, and is restored on every rank when training resumes.
* Start-up refusals (:class:`fairseq_agg.errors.AggConfigError`) and precisions this machine
  cannot run print one line and exit with status 2 instead of a traceback.
"""

import argparse
import collections
import logging
import os
import sys
import typing
import zipfile
from pathlib import Path
from typing import List, Optional

import torch

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


def is_intact_checkpoint(path) -> bool:
    """Whether ``path`` is a complete ``torch.save`` archive; reads only its directory.

    A copy interrupted part-way is empty or ends before the zip directory that ``torch.save``
    writes last. Files in torch's legacy (non-zip) format are taken as intact.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    if head != b"PK\x03\x04":
        return len(head) == 4
    try:
        with zipfile.ZipFile(path) as archive:
            return len(archive.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def newest_intact_checkpoint(save_dir, exclude: Path) -> Optional[Path]:
    candidates: List[Path] = [p for p in Path(save_dir).glob("checkpoint*.pt") if p != exclude]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if is_intact_checkpoint(path):
            return path
    return None


def checkpoint_to_resume(filename: str) -> str:
    """``filename``, or when it is an unreadable ``checkpoint_last.pt`` the newest intact
    checkpoint beside it; any other unreadable checkpoint is refused in one line."""
    path = Path(filename)
    if not path.is_file() or is_intact_checkpoint(path):
        return filename
    state = "empty" if path.stat().st_size == 0 else "truncated"
    fallback = newest_intact_checkpoint(path.parent, exclude=path)
    if path.name != "checkpoint_last.pt" or fallback is None:
        hint = f"the newest intact checkpoint there is {fallback}" if fallback else "no other checkpoint there is intact"
        raise AggConfigError(
            f"{path} is {state} (a copy interrupted while it was written) and cannot be loaded; "
            f"{hint}: pass --restore-file with an intact one, or remove {path.name} to start afresh"
        )
    logger.warning(
        f"{path} is {state} (interrupted while it was being written); resuming from {fallback}, "
        f"the newest intact checkpoint of {path.parent}"
    )
    return str(fallback)


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
        if restore is not None:
            agg_state = (extra_state or {}).get(CHECKPOINT_KEY)
            restore(agg_state, self.get_criterion())
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
    from fairseq import options, trainer
    from fairseq.distributed import utils as distributed_utils
    from fairseq.file_io import PathManager

    allow_checkpoint_classes()
    _patch(options, "parse_args_and_arch", _keep_tpu_explicit)
    _patch(PathManager, "copy", _atomic_local_copy)
    _patch(trainer.Trainer, "state_dict", _with_agg_state)
    _patch(trainer.Trainer, "load_checkpoint", _restoring_agg_state)
    _patch(distributed_utils, "call_main", _refusing_in_one_line)


def saved_counter_state(checkpoint: dict) -> Optional[dict]:
    """The AGG token counter saved in a loaded checkpoint, wherever its version kept it."""
    saved = (checkpoint.get("extra_state") or {}).get(CHECKPOINT_KEY)
    if saved is not None:
        return saved.get("counter")
    return (checkpoint.get("model") or {}).get(LEGACY_COUNTER_KEY)
