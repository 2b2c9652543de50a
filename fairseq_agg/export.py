"""Turn a checkpoint trained with the plug-in into one that stock fairseq loads without it.

    python -m fairseq_agg.export checkpoint_best.pt checkpoint_best.plain.pt

Stock fairseq tools (``fairseq-eval-lm``, ``fairseq-generate``) load the plug-in's checkpoints
as they are; export one for code that rebuilds the task saved in it
(``checkpoint_utils.load_model_ensemble_and_task`` without ``task=``) without the plug-in.
Drops the AGG token counter and renames task and criterion to fairseq's own
(``language_modeling``, ``translation``; ``cross_entropy`` or ``label_smoothed_cross_entropy``).
The model weights are untouched. Use it to share a model, or before tools such as
fairseq's ``scripts/average_checkpoints.py`` that expect tensors only.
"""

import argparse
import sys

import torch

from fairseq_agg.fairseq_fixes import CHECKPOINT_KEY, LEGACY_COUNTER_KEY, saved_counter_state

STOCK_TASKS = {"language_modeling_agg": "language_modeling", "translation_agg": "translation"}
# Config keys the plug-in's tasks add to the stock ones.
PLUGIN_TASK_KEYS = {"language_modeling_agg": ("train_subset", "update_freq", "amp"), "translation_agg": ("update_freq", "amp")}


def export_state(state: dict) -> dict:
    from omegaconf import OmegaConf

    state["model"].pop(LEGACY_COUNTER_KEY, None)
    (state.get("extra_state") or {}).pop(CHECKPOINT_KEY, None)
    cfg = state.get("cfg")
    if cfg is None:
        raise ValueError("this checkpoint has no 'cfg': it was not written by fairseq >= 0.10")
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    # fairseq saves cfg as plain containers (legacy architectures keep an argparse.Namespace
    # under "model"): edit them as such.
    task = cfg.get("task") or {}
    task_name = task.get("_name")
    if task_name in STOCK_TASKS:
        task["_name"] = STOCK_TASKS[task_name]
        for key in PLUGIN_TASK_KEYS[task_name]:
            task.pop(key, None)
    criterion = cfg.get("criterion") or {}
    if str(criterion.get("_name", "")).startswith(("agg_", "unlikelihood_")):
        smoothing = float(criterion.get("label_smoothing", 0.0))
        sentence_avg = bool(criterion.get("sentence_avg", False))
        cfg["criterion"] = (
            {"_name": "label_smoothed_cross_entropy", "label_smoothing": smoothing, "sentence_avg": sentence_avg}
            if smoothing > 0
            else {"_name": "cross_entropy", "sentence_avg": sentence_avg}
        )
    if cfg.get("common"):
        cfg["common"]["user_dir"] = None
    state["cfg"] = cfg
    state.pop("task_state", None)
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint written by fairseq-train with the plug-in")
    parser.add_argument("output", help="where to write the stock-fairseq checkpoint")
    args = parser.parse_args(argv)
    if args.checkpoint == args.output:
        parser.error("write the exported checkpoint to another file")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    if saved_counter_state(state) is None:
        print(f"note: {args.checkpoint} holds no AGG counter", file=sys.stderr)
    torch.save(export_state(state), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
