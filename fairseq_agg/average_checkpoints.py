"""Average the parameters of the last N fairseq checkpoints (as fairseq's
``scripts/average_checkpoints.py``, which fairseq's pip package does not ship).

    python -m fairseq_agg.average_checkpoints --inputs SAVE_DIR --num-update-checkpoints 5 --output avg.pt
    python -m fairseq_agg.average_checkpoints --inputs SAVE_DIR --num-epoch-checkpoints 5 --output avg.pt
    python -m fairseq_agg.average_checkpoints --inputs a.pt b.pt c.pt --output avg.pt

Floating-point entries of the model state are averaged (accumulated in float64; float16 and
bfloat16 entries come out as float32, as in fairseq's script). Every other entry -- integer
buffers, and in checkpoints of fairseq-agg 0.1 the AGG token counter ``agg_counter._extra_state``,
a dict that fairseq's script cannot add up -- is taken from the newest checkpoint, and so is the
rest of the checkpoint (configuration, optimizer history, the counter in ``extra_state``), so the
result loads wherever the newest checkpoint does.
"""

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

EPOCH_PATTERN = re.compile(r"checkpoint(\d+)\.pt")
UPDATE_PATTERN = re.compile(r"checkpoint_\d+_(\d+)\.pt")


class AverageError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"average_checkpoints: {message}")


def last_checkpoints(folder: Path, count: int, by_update: bool) -> List[Path]:
    """The ``count`` newest ``checkpoint_<epoch>_<update>.pt`` (``by_update``) or
    ``checkpoint<epoch>.pt`` files of a save directory, newest first, ordered by number."""
    pattern = UPDATE_PATTERN if by_update else EPOCH_PATTERN
    found = sorted(((int(m.group(1)), path) for path in folder.iterdir()
                    if (m := pattern.fullmatch(path.name))), reverse=True)
    if len(found) < count:
        kind = "checkpoint_<epoch>_<update>.pt (--save-interval-updates)" if by_update else "checkpoint<epoch>.pt"
        raise AverageError(f"{folder} holds {len(found)} {kind} files, fewer than the {count} to average")
    return [path for _, path in found[:count]]


def _load(path: Path) -> Dict:
    if not path.is_file():
        raise AverageError(f"{path} does not exist")
    # our own training output: fairseq checkpoints hold configuration objects, not only tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def average_checkpoints(paths: Sequence[Path]) -> Dict:
    """The newest checkpoint (``paths[0]``) with its model state replaced by the average of all."""
    if not paths:
        raise AverageError("no checkpoints to average")
    newest = _load(Path(paths[0]))
    keys = list(newest["model"])
    sums: Dict[str, torch.Tensor] = {}
    for path in paths:
        state = newest if path == paths[0] else _load(Path(path))
        model = state["model"]
        if list(model) != keys:
            raise AverageError(f"{path} has other model entries than {paths[0]}: "
                               "the checkpoints come from different models")
        for key, value in model.items():
            if torch.is_tensor(value) and value.is_floating_point():
                if key in sums and sums[key].shape != value.shape:
                    raise AverageError(f"{path}: {key} has shape {tuple(value.shape)}, "
                                       f"not {tuple(sums[key].shape)} as in {paths[0]}")
                accumulated = value.detach().to(torch.float64)
                sums[key] = accumulated if key not in sums else sums[key] + accumulated
    averaged = {}
    for key, value in newest["model"].items():
        if key in sums:
            dtype = torch.promote_types(value.dtype, torch.float32)
            averaged[key] = (sums[key] / len(paths)).to(dtype)
        else:
            averaged[key] = value
    newest["model"] = averaged
    return newest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_agg.average_checkpoints",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, type=Path,
                   help="checkpoint files, or one save directory with --num-*-checkpoints")
    p.add_argument("--output", required=True, type=Path, help="where to write the averaged checkpoint")
    last = p.add_mutually_exclusive_group()
    last.add_argument("--num-update-checkpoints", type=int, default=None, metavar="N",
                      help="average the N checkpoint_<epoch>_<update>.pt files with the highest update numbers")
    last.add_argument("--num-epoch-checkpoints", type=int, default=None, metavar="N",
                      help="average the N checkpoint<epoch>.pt files with the highest epoch numbers")
    return p


def resolve_inputs(args) -> List[Path]:
    by_update = args.num_update_checkpoints is not None
    count = args.num_update_checkpoints if by_update else args.num_epoch_checkpoints
    if count is None:
        return list(args.inputs)
    if count < 1:
        option = "--num-update-checkpoints" if by_update else "--num-epoch-checkpoints"
        raise AverageError(f"{option} must be a positive number of checkpoints, got {count}")
    if len(args.inputs) != 1 or not args.inputs[0].is_dir():
        raise AverageError("with --num-update-checkpoints or --num-epoch-checkpoints, --inputs is one save directory")
    return last_checkpoints(args.inputs[0], count, by_update=by_update)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    paths = resolve_inputs(args)
    print("averaging " + ", ".join(str(p) for p in paths), flush=True)
    state = average_checkpoints(paths)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    torch.save(state, partial)
    partial.replace(args.output)  # never a half-written checkpoint under the final name
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
