"""``coupled_adam``: fairseq's ``adam`` (AdamW) with Coupled Adam on the embedding matrices.

An optimizer receives parameter tensors only, not their names, so the embedding matrices are
marked on the model when it is built: :func:`mark_embedding_parameters`, which the plug-in's
tasks (``language_modeling_agg``, ``translation_agg``) call in ``build_model``. The mark is kept
in the parameter's ``optim_overrides`` dict (key :data:`TAG_KEY`) because that attribute is one
of the few that fairseq's ``FP16Optimizer`` copies onto its fp32 master parameters
(``build_fp32_params``, non-flat); ``MemoryEfficientFP16Optimizer`` (``--memory-efficient-fp16``
/ ``-bf16``) hands the model's own parameters to the optimizer.
"""

import ast
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II, OmegaConf

from fairseq_agg.errors import AggConfigError
from fairseq_agg.modeling import unwrap
from fairseq_agg.remedies import CoupledAdam

logger = logging.getLogger(__name__)

TAG_KEY = "coupled_adam_embedding"
ROLES = ("input", "output")
SELECTIONS = ("all", "none") + ROLES
# --coupled-adam-weight-decay: "all" decays every parameter (fairseq's adam); "reference" as
# the Coupled Adam authors' runs: no weight decay on the embedding matrices nor on 1-D
# parameters (biases, layer norms), the other matrices decayed.
WEIGHT_DECAY_CHOICES = ("all", "reference")

# Where fairseq's language and translation models keep their token embeddings.
_EMBEDDING_MODULES = (
    ("encoder.embed_tokens", torch.nn.Embedding, "input"),
    ("decoder.embed_tokens", torch.nn.Embedding, "input"),
    ("decoder.output_projection", torch.nn.Linear, "output"),
)

_HOW_TO_MARK = (
    "the plug-in's tasks (--task language_modeling_agg, --task translation_agg) mark the token "
    "embeddings when they build the model; with another task, call "
    "fairseq_agg.optim.mark_embedding_parameters(model) in its build_model"
)


def _submodule(model: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def embedding_tag(param: torch.Tensor) -> Optional[dict]:
    """The mark :func:`mark_embedding_parameters` left on ``param`` (names and roles), or None."""
    overrides = getattr(param, "optim_overrides", None)
    if isinstance(overrides, dict):
        return overrides.get(TAG_KEY)
    return None


def _set_tag(param: torch.Tensor, tag: Optional[dict]) -> None:
    # A new dict each time: fairseq's fp32 copies share the dict object with the model's
    # parameter, and other code may have set optim_overrides of its own.
    overrides = dict(getattr(param, "optim_overrides", None) or {})
    overrides.pop(TAG_KEY, None)
    if tag is not None:
        overrides[TAG_KEY] = tag
    if overrides:
        param.optim_overrides = overrides
    elif hasattr(param, "optim_overrides"):
        del param.optim_overrides


def mark_embedding_parameters(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    """Mark the token-embedding matrices of ``model`` for ``--optimizer coupled_adam``.

    ``names=None`` detects them: the ``nn.Embedding`` ``encoder.embed_tokens`` and
    ``decoder.embed_tokens`` (role "input") and the ``nn.Linear`` ``decoder.output_projection``
    (role "output") of fairseq's language and translation models, whichever exist. Tied
    matrices (``--share-decoder-input-output-embed``, ``--share-all-embeddings``) are one
    tensor and get one mark with all their names and roles. Positional embeddings, adaptive
    input and adaptive softmax are not marked.

    ``names`` overrides detection: exactly the named parameters (as in ``named_parameters()``;
    any name of a tied tensor) are marked, each a (V, d) matrix; roles are those detection
    would give, "named" for the rest. Marks from an earlier call are cleared first.

    Returns {primary name: {"names": [...], "roles": [...]}} for the marked tensors.
    """
    model = unwrap(model)
    all_names: Dict[int, List[str]] = {}
    by_name: Dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(param), []).append(name)
        by_name[name] = param
    detected_roles: Dict[int, set] = {}
    for path, kind, role in _EMBEDDING_MODULES:
        module = _submodule(model, path)
        if isinstance(module, kind) and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            detected_roles.setdefault(id(module.weight), set()).add(role)

    if names is None:
        chosen = {id(p): p for p in by_name.values() if id(p) in detected_roles}
    else:
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise AggConfigError(
                f"mark_embedding_parameters: no parameter named {', '.join(unknown)}; the model has: "
                f"{', '.join(by_name)}"
            )
        chosen = {id(by_name[n]): by_name[n] for n in names}
        for param in chosen.values():
            if param.dim() != 2:
                raise AggConfigError(
                    f"mark_embedding_parameters: {all_names[id(param)][0]} has shape "
                    f"{tuple(param.shape)}; only (vocabulary, dim) matrices can share a second moment"
                )

    for param in by_name.values():
        _set_tag(param, None)
    marked = {}
    for key, param in chosen.items():
        tag = {
            "names": list(all_names[key]),
            "roles": sorted(detected_roles.get(key, {"named"})),
        }
        _set_tag(param, tag)
        marked[all_names[key][0]] = tag
    return marked


@dataclass
class CoupledAdamConfig(FairseqDataclass):
    adam_betas: Any = field(default=(0.9, 0.999), metadata={"help": "betas for Adam optimizer"})
    adam_eps: float = field(default=1e-8, metadata={"help": "epsilon for Adam optimizer"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    coupled_adam_embeddings: str = field(
        default="all",
        metadata={
            "help": "which marked embedding matrices share one second moment per column: all (default), "
            "input, output (by role), none (plain AdamW everywhere: fairseq's adam), or a comma-separated "
            "list of parameter names among the marked ones"
        },
    )
    coupled_adam_weight_decay: str = field(
        default="all",
        metadata={
            "help": "which parameters --weight-decay applies to: all (default, as fairseq's adam) or reference (as "
            "the Coupled Adam reference runs: not the marked embedding matrices, not 1-D parameters such as "
            "biases and layer norms)"
        },
    )
    lr: List[float] = II("optimization.lr")


def _selected(tag: dict, selection: str, names: Optional[set]) -> bool:
    if names is not None:
        return bool(names.intersection(tag["names"]))
    return selection == "all" or selection in tag["roles"]


@register_optimizer("coupled_adam", dataclass=CoupledAdamConfig)
class FairseqCoupledAdam(FairseqOptimizer):
    """fairseq's ``adam`` (an AdamW, same options and update) in which the marked (V, d)
    embedding matrices keep one second moment per column, shared by all V rows."""

    def __init__(self, cfg: CoupledAdamConfig, params):
        super().__init__(cfg)
        params = list(params)
        selection = str(cfg.coupled_adam_embeddings).strip()
        names = None
        if selection not in SELECTIONS:
            names = {n.strip() for n in selection.split(",") if n.strip()}
            if not names:
                raise AggConfigError(f"--coupled-adam-embeddings: choose one of {', '.join(SELECTIONS)} or parameter names")
        tags = [embedding_tag(p) for p in params]
        marked = [tag for tag in tags if tag is not None]
        if not marked and selection != "none":
            if params and all(p.dim() == 1 for p in params):
                raise AggConfigError(
                    "coupled_adam got the parameters flattened into vectors, which have no embedding rows "
                    "to share a second moment: --fp16 flattens them unless you add --fp16-no-flatten-grads "
                    "(or use --memory-efficient-fp16); --ddp-backend fully_sharded is not supported"
                )
            raise AggConfigError(
                "coupled_adam found no parameter marked as an embedding matrix: " + _HOW_TO_MARK
                + ". Use --coupled-adam-embeddings none for plain AdamW."
            )
        if names is not None:
            known = {n for tag in marked for n in tag["names"]}
            unknown = sorted(names - known)
            if unknown:
                raise AggConfigError(
                    f"--coupled-adam-embeddings names {', '.join(unknown)}, which are not among the marked "
                    f"embedding matrices ({', '.join(sorted(known)) or 'none'}); to couple other parameters, "
                    f"mark them with fairseq_agg.optim.mark_embedding_parameters(model, names=[...])"
                )
        decay_choice = str(cfg.coupled_adam_weight_decay).strip()
        if decay_choice not in WEIGHT_DECAY_CHOICES:
            raise AggConfigError(f"--coupled-adam-weight-decay: choose one of {', '.join(WEIGHT_DECAY_CHOICES)}, "
                                 f"got {decay_choice!r}")
        reference = decay_choice == "reference"
        coupled, plain, plain_no_decay = [], [], []
        for param, tag in zip(params, tags):
            if tag is not None and selection != "none" and _selected(tag, selection, names):
                coupled.append(param)
                logger.info(
                    f"coupled_adam: {' = '.join(tag['names'])} {tuple(param.shape)} shares one second moment per column"
                )
            elif reference and (tag is not None or param.dim() < 2):
                plain_no_decay.append(param)
            else:
                plain.append(param)
        if selection != "none" and not coupled:
            raise AggConfigError(
                f"--coupled-adam-embeddings {selection} selects none of the marked embedding matrices "
                f"({'; '.join(' = '.join(t['names']) + ' [' + ', '.join(t['roles']) + ']' for t in marked)})"
            )
        groups = [{"params": coupled, "coupled": True}, {"params": plain, "coupled": False},
                  {"params": plain_no_decay, "coupled": False}]
        if reference:
            # the marked embeddings (coupled or not) and the 1-D parameters are not decayed
            for group in (groups[0], groups[2]):
                group.update(weight_decay=0.0, no_decay=True)
            logger.info(f"coupled_adam: --coupled-adam-weight-decay reference: no weight decay on "
                        f"{len(coupled) + len(plain_no_decay)} tensors (embedding matrices, 1-D parameters), "
                        f"{cfg.weight_decay} on {len(plain)} other matrices")
        self._optimizer = CoupledAdam([g for g in groups if g["params"]], **self.optimizer_config)

    @property
    def optimizer_config(self):
        """Overrides the optimizer settings stored in checkpoints, as fairseq's ``adam``."""
        cfg = self.cfg
        betas = cfg.adam_betas
        if isinstance(betas, str):
            betas = ast.literal_eval(betas)  # "(0.9, 0.98)" on the command line
        elif OmegaConf.is_config(betas):
            betas = OmegaConf.to_container(betas)
        return {
            "lr": cfg.lr[0] if isinstance(cfg.lr, Collection) else cfg.lr,
            "betas": tuple(betas),
            "eps": cfg.adam_eps,
            "weight_decay": cfg.weight_decay,
        }

    @property
    def supports_flat_params(self):
        return False

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        saved = [(bool(g.get("coupled", False)), bool(g.get("no_decay", False)), len(g["params"]))
                 for g in state_dict["param_groups"]]
        current = [(g["coupled"], bool(g.get("no_decay", False)), len(g["params"])) for g in self.optimizer.param_groups]
        if saved != current:

            def describe(groups):
                return ", ".join(f"{n} {'coupled' if flag else 'plain'}{' undecayed' if no_decay else ''}"
                                 for flag, no_decay, n in groups) or "nothing"

            raise AggConfigError(
                f"the checkpoint's optimizer state ({describe(saved)} parameters) does not fit this "
                f"coupled_adam ({describe(current)}): it comes from another optimizer or another "
                f"--coupled-adam-embeddings or --coupled-adam-weight-decay; resume with the same settings or add "
                f"--reset-optimizer"
            )
        super().load_state_dict(state_dict, optimizer_overrides)
        for group in self.optimizer.param_groups:
            if group.get("no_decay"):
                group["weight_decay"] = 0.0  # fairseq's overrides set --weight-decay on every group
