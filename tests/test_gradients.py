"""Gradients of AGG (issue acceptance criterion 1).

With real fairseq tasks, models and criteria (tiny ``transformer_lm`` / ``transformer`` in
float64, dropout 0) the gradient of every parameter under ``agg_cross_entropy`` must equal

(a) the paper's three-logit formulation (eqs. 9-10), written out here as the oracle:
    z0 = h W~^T,  z_l = g_l * (h~ W^T) + (1 - g_l) * (h~ W~^T)  (l = 1, 2),
    L  = CE(z0) + 1(y not rare) CE(z1) + 1(y rare) CE(z2)
    (~ = detached; the gate is 1 for non-rare k and for k == y_i; the same, possibly
    label-smoothed, loss is applied to z0, z1 and z2), and
(b) the closed form of eq. 23 for the output-path gradient of W:
    grad_W = ((P - Q) * Gate)^T H.

The loss value and the gradient of every parameter other than W must be those of fairseq's
own ``cross_entropy`` / ``label_smoothed_cross_entropy`` on the same model and sample.
The rare group and gates of the oracle are recomputed here from the batches fed to the
counter (DESIGN.md section 2), never read back from ``fairseq_agg``.
"""

from functools import lru_cache
from pathlib import Path

import pytest
import torch

fairseq = pytest.importorskip("fairseq")

from fairseq import options, tasks, utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from fairseq_agg import core  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
USER_DIR = REPO / "fairseq_agg"
N_LINES = 200
ALPHA = 1.0  # rare = fewer than one occurrence per update on average: a good mix here
WINDOW = 4  # K
# One completed update per entry, fed through task.agg_counter.add / commit: real batches by
# index, and "sweep", an update in which each non-special token with id % 3 != 0 occurs twice
# (it gives rare tokens with 0 < a < mean, i.e. 0 < g2 < 1). Batch 1 drops out of the window.
HISTORY = [1, "sweep", 2, 3, 4]
# Against the float64 oracles: float64 rounding, relative to each tensor's scale (max(1, max |x|)).
# The gates are float64 in a float64 run, so W's gated gradient meets it too (observed: 2e-15).
TOL = 1e-14
# fairseq's own criteria take the log-softmax with fairseq.utils.log_softmax, in float32
# whatever the model's dtype, while agg_cross_entropy keeps float64 (core.log_probs). The
# oracle is float64 throughout; comparisons with fairseq's criteria allow for fairseq's
# float32 rounding: REL_FAIRSEQ of each tensor's scale (observed: up to ~9e-7 with label
# smoothing, whose smoothing term sums N float32 log-probabilities; the tests also check
# that the gate moves W's gradient by far more than that).
REL_FAIRSEQ = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------
# data, tasks and models
# ------------------------------------------------------------------------------------------
def _write_slice(src: Path, dst: Path, n: int = N_LINES) -> None:
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dst.write_text("".join(lines), encoding="utf-8")


def _preprocess(argv):
    from fairseq_cli import preprocess

    args = options.get_preprocessing_parser().parse_args(argv)
    preprocess.main(args)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("agg_grad_data")
    raw = root / "raw"
    raw.mkdir()
    _write_slice(REPO / "data/wikitext-2/wiki.train.tokens", raw / "lm.train.txt")
    _write_slice(REPO / "data/wmt14-en-de-sample/train.en", raw / "mt.train.en")
    _write_slice(REPO / "data/wmt14-en-de-sample/train.de", raw / "mt.train.de")
    _preprocess(
        ["--only-source", "--trainpref", str(raw / "lm.train.txt"), "--destdir", str(root / "lm"),
         "--nwordssrc", "500", "--workers", "1"]
    )
    _preprocess(
        ["--source-lang", "en", "--target-lang", "de", "--trainpref", str(raw / "mt.train"),
         "--destdir", str(root / "mt"), "--joined-dictionary", "--nwordssrc", "500",
         "--nwordstgt", "500", "--workers", "1"]
    )
    return {"lm": str(root / "lm"), "mt": str(root / "mt")}


COMMON = ["--user-dir", str(USER_DIR), "--cpu", "--seed", "1", "--dropout", "0",
          "--attention-dropout", "0", "--activation-dropout", "0", "--optimizer", "adam",
          "--lr", "1e-3", "--criterion", "agg_cross_entropy"]
LM_ARGS = ["--task", "language_modeling_agg", "--arch", "transformer_lm", "--decoder-layers", "2",
           "--decoder-embed-dim", "16", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
           "--tokens-per-sample", "128", "--sample-break-mode", "complete", "--max-tokens", "256"]
MT_ARGS = ["--task", "translation_agg", "--arch", "transformer", "--source-lang", "en",
           "--target-lang", "de", "--encoder-layers", "2", "--decoder-layers", "2",
           "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
           "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
           "--decoder-attention-heads", "2", "--max-source-positions", "128",
           "--max-target-positions", "128", "--max-tokens", "300"]
CONFIGS = {
    "lm": ("lm", LM_ARGS),
    "lm_tied": ("lm", LM_ARGS + ["--share-decoder-input-output-embed"]),
    "mt": ("mt", MT_ARGS),
    "mt_tied": ("mt", MT_ARGS + ["--share-decoder-input-output-embed"]),
    "mt_shared": ("mt", MT_ARGS + ["--share-all-embeddings"]),
}
TIED = {"lm_tied", "mt_tied", "mt_shared"}


@pytest.fixture(scope="module")
def fairseq_cfg(data_dirs):
    @lru_cache(maxsize=None)
    def get(name):
        kind, extra = CONFIGS[name]
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, [data_dirs[kind]] + COMMON + extra)
        cfg = convert_namespace_to_omegaconf(args)
        utils.import_user_module(cfg.common)
        return cfg

    return get


class Setup:
    """A task, a seeded model and real batches of one configuration. Built once per module
    and configuration (the model is never stepped); ``reset`` empties the task's counter."""

    def __init__(self, cfg, dtype=torch.float64):
        self.cfg = cfg
        self.task = tasks.setup_task(cfg.task)
        self.task.load_dataset("train")
        torch.manual_seed(0)
        self.model = self.task.build_model(cfg.model).to(dtype)
        self.model.train()
        dictionary = self.task.target_dictionary
        self.pad = dictionary.pad()
        self.nspecial = dictionary.nspecial
        self.N = len(dictionary)
        itr = self.task.get_batch_iterator(
            self.task.dataset("train"),
            max_tokens=cfg.dataset.max_tokens,
            max_positions=utils.resolve_max_positions(self.task.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=True,
            seed=1,
        )
        self.batches = list(itr.next_epoch_itr(shuffle=False))
        assert len(self.batches) > max(b for b in HISTORY if isinstance(b, int)) + 1
        for batch in self.batches:
            batch["net_input"] = {
                k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in batch["net_input"].items()
            }

    def reset(self):
        empty = core.TokenCounter(self.N, self.nspecial).state_dict()
        self.task.agg_counter.load_state_dict(empty)
        assert self.task.agg_counter.num_updates == 0 and self.task.agg_counter.updates_in_window() == 0
        return self

    @property
    def W(self) -> torch.Tensor:
        return self.model.decoder.output_projection.weight

    @property
    def tied(self) -> bool:
        return self.W is self.model.decoder.embed_tokens.weight

    def param_names_other_than_W(self):
        return [n for n, p in self.model.named_parameters() if p is not self.W]

    def agg_criterion(self, **overrides):
        conf = {"_name": "agg_cross_entropy", "sentence_avg": False, "agg_alpha": ALPHA,
                "agg_window": WINDOW, "label_smoothing": 0.0}
        conf.update(overrides)
        crit = self.task.build_criterion(OmegaConf.create(conf))
        crit.train()
        return crit

    def fairseq_criterion(self, eps):
        if eps == 0.0:
            conf = {"_name": "cross_entropy", "sentence_avg": False}
        else:
            conf = {"_name": "label_smoothed_cross_entropy", "sentence_avg": False, "label_smoothing": eps}
        crit = self.task.build_criterion(OmegaConf.create(conf))
        crit.train()
        return crit

    def sweep(self):
        ids = torch.arange(self.nspecial, self.N)
        return ids[ids % 3 != 0].repeat(2)

    def feed_counter(self, history=HISTORY):
        """One completed update per entry, through the task's counter; returns the targets."""
        targets = [self.sweep() if b == "sweep" else self.batches[b]["target"] for b in history]
        for target in targets:
            self.task.agg_counter.add(target, self.pad)
            self.task.agg_counter.commit()
        return targets

    def grads(self, loss_fn):
        self.model.zero_grad(set_to_none=True)
        out = loss_fn()
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        grads = {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in self.model.named_parameters()
        }
        self.model.zero_grad(set_to_none=True)
        return grads, out



@pytest.fixture(scope="module")
def make_setup(fairseq_cfg):
    cache = {}

    def make(name, dtype=torch.float64):
        if (name, dtype) not in cache:
            cache[name, dtype] = Setup(fairseq_cfg(name), dtype)
        return cache[name, dtype].reset()

    return make


# ------------------------------------------------------------------------------------------
# the oracle: gates from the contract, the three-logit loss, eq. 23
# ------------------------------------------------------------------------------------------
class RefGates:
    def __init__(self, rare, g1, g2):
        self.rare = rare.clone()
        self.g1 = g1.to(torch.float64)  # over the vocabulary, 1 where not rare
        self.g2 = g2.to(torch.float64)


def ref_dynamic_gates(history, N, nspecial, pad, alpha=ALPHA, K=WINDOW, use_g1=True, use_g2=True):
    """DESIGN.md 2.1-2.4 from the list of per-update target tensors, written independently."""
    window = history[-K:] if K is not None else history
    S = torch.zeros(N, dtype=torch.float64)
    for target in window:
        t = target.reshape(-1)
        t = t[t != pad]
        S += torch.bincount(t, minlength=N).to(torch.float64)
    a = S / len(window) if window else torch.zeros(N, dtype=torch.float64)
    rare = a < alpha
    rare[:nspecial] = False
    ones = torch.ones(N, dtype=torch.float64)
    g1 = torch.where(rare, a, ones) if use_g1 else ones
    if use_g2 and rare.any():
        mean = a[rare].mean()
        g2 = torch.where(rare, torch.clamp(a / mean, max=1.0) if mean > 0 else torch.zeros_like(a), ones)
    else:
        g2 = ones
    return RefGates(rare, g1, g2)


def ref_static_rare(dictionary, fraction=0.2):
    """The 20% least frequent non-special tokens of the training dictionary (ties: index),
    leaving out fairseq-preprocess's padding symbols madeupword*."""
    nspecial = dictionary.nspecial
    tokens = [k for k in range(nspecial, len(dictionary)) if not dictionary[k].startswith("madeupword")]
    ids = sorted(tokens, key=lambda k: (dictionary.count[k], k))
    rare = torch.zeros(len(dictionary), dtype=torch.bool)
    rare[ids[: int(fraction * len(tokens))]] = True
    return rare


STUDY_VALUES = {"detach_b": (0.0, 1.0), "detach_c": (1.0, 0.0), "detach_bc": (0.0, 0.0)}


def ref_study_gates(dictionary, mode):
    rare = ref_static_rare(dictionary)
    v1, v2 = STUDY_VALUES[mode]
    ones = torch.ones(len(dictionary), dtype=torch.float64)
    return RefGates(rare, torch.where(rare, v1 * ones, ones), torch.where(rare, v2 * ones, ones))


def row_gates(g, rare, target):
    """(M, N): g[k] where k is rare and k != y_i, else 1 (eqs. 7 and 8)."""
    N = rare.numel()
    cols = torch.arange(N).unsqueeze(0)
    apply = rare.unsqueeze(0) & (cols != target.unsqueeze(1))
    return torch.where(apply, g.unsqueeze(0).expand(target.numel(), N), torch.ones((), dtype=torch.float64))


def ls_rows(logits, target, eps, pad):
    """Per-position (label-smoothed) cross-entropy in float64; 0 on padding."""
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    nll = -lp.gather(1, target.unsqueeze(1)).squeeze(1)
    smooth = -lp.sum(-1)
    eps_i = eps / (lp.size(-1) - 1)
    loss = (1.0 - eps - eps_i) * nll + eps_i * smooth
    keep = target != pad
    zero = torch.zeros((), dtype=loss.dtype)
    return torch.where(keep, loss, zero), torch.where(keep, nll, zero)


def flat_features(setup, sample):
    features, _ = setup.model(**sample["net_input"], features_only=True)
    return features.reshape(-1, features.size(-1)), sample["target"].reshape(-1)


def paper_three_logit_loss(setup, sample, gates, eps):
    """Eqs. 9-10. Returns (L, CE(z0), NLL(z0))."""
    h, y = flat_features(setup, sample)
    W = setup.W
    h_, W_ = h.detach(), W.detach()
    z0 = h @ W_.t()
    G1 = row_gates(gates.g1, gates.rare, y)
    G2 = row_gates(gates.g2, gates.rare, y)
    z1 = G1 * (h_ @ W.t()) + (1 - G1) * (h_ @ W_.t())
    z2 = G2 * (h_ @ W.t()) + (1 - G2) * (h_ @ W_.t())
    L0, nll0 = ls_rows(z0, y, eps, setup.pad)
    L1, _ = ls_rows(z1, y, eps, setup.pad)
    L2, _ = ls_rows(z2, y, eps, setup.pad)
    row_rare = gates.rare[y]
    L = L0.sum() + torch.where(row_rare, 0.0, L1).sum() + torch.where(row_rare, L2, 0.0).sum()
    return L, L0.sum().detach(), nll0.sum().detach()


def plain_loss(setup, sample, eps):
    """Ordinary (label-smoothed) cross-entropy of the model in float64: the ungated oracle."""
    h, y = flat_features(setup, sample)
    loss, nll = ls_rows(h @ setup.W.t(), y, eps, setup.pad)
    return loss.sum(), nll.sum().detach()


def eq23_output_grads(setup, sample, gates, eps):
    """Closed form of eq. 23: (plain, gated) output-path gradients of W,
    (D^T H, (D * Gate)^T H), with D = dLoss/dlogits = P - Q (Q: one-hot or label-smoothed
    targets, zero rows on padding), all in float64."""
    with torch.no_grad():
        H, y = flat_features(setup, sample)
        H = H.to(torch.float64)
        W = setup.W.to(torch.float64)
        N = W.size(0)
        P = torch.softmax(H @ W.t(), dim=-1)
        eps_i = eps / (N - 1)
        Q = torch.full_like(P, eps_i)
        Q.scatter_(1, y.unsqueeze(1), 1.0 - eps)  # (1 - eps - eps_i) + eps_i on the target
        D = (P - Q) * (y != setup.pad).to(P.dtype).unsqueeze(1)
        # eq. 23 case by case: gate 1 on k == y_i, g1 on rows with a non-rare target and
        # g2 on rows with a rare target (both 1 on non-rare k).
        row_rare = gates.rare[y].unsqueeze(1)
        gate = torch.where(row_rare, row_gates(gates.g2, gates.rare, y), row_gates(gates.g1, gates.rare, y))
        return D.t() @ H, (D * gate).t() @ H


# ------------------------------------------------------------------------------------------
# helpers for the cases
# ------------------------------------------------------------------------------------------
MODES = {
    "agg": {},
    "no_g1": {"agg_no_g1": True},
    "no_g2": {"agg_no_g2": True},
    "detach_b": {"agg_study": "detach_b"},
    "detach_c": {"agg_study": "detach_c"},
    "detach_bc": {"agg_study": "detach_bc"},
}


def pick_sample(setup, gates, exclude=()):
    """The first batch with both rare and non-rare targets, preferring ones outside HISTORY."""
    order = [i for i in range(len(setup.batches)) if i not in exclude] + list(exclude)
    for i in order:
        y = setup.batches[i]["target"].reshape(-1)
        y = y[y != setup.pad]
        n_rare = int(gates.rare[y].sum())
        if n_rare >= 2 and n_rare < y.numel():
            return setup.batches[i]
    raise AssertionError("no batch has both rare and non-rare targets")


def prepare(setup, mode, eps, loss_chunk_size=0):
    """Counter state with rare and non-rare tokens (dynamic modes); returns crit, gates, sample."""
    history = setup.feed_counter()
    crit = setup.agg_criterion(label_smoothing=eps, loss_chunk_size=loss_chunk_size, **MODES[mode])
    if mode.startswith("detach"):
        gates = ref_study_gates(setup.task.target_dictionary, mode)
    else:
        gates = ref_dynamic_gates(
            history, setup.N, setup.nspecial, setup.pad,
            use_g1=mode != "no_g1", use_g2=mode != "no_g2",
        )
        # the state is informative: rare tokens with 0 < a < mean (g2 < 1) and a >= mean
        ref_a = ref_dynamic_gates(history, setup.N, setup.nspecial, setup.pad).g1
        rare_a = ref_a[gates.rare]
        assert 0 < int(gates.rare.sum()) < setup.N - setup.nspecial
        assert (rare_a > 0).any() and (rare_a == 0).any()
        assert (rare_a > rare_a.mean()).any() and ((rare_a > 0) & (rare_a < rare_a.mean())).any()
    sample = pick_sample(setup, gates, exclude=[b for b in HISTORY if isinstance(b, int)])
    return crit, gates, sample


def max_diff(a, b):
    return (a - b).abs().max().item()


def scale_of(t) -> float:
    return max(1.0, t.abs().max().item())


def assert_grads_equal(got, want, names=None, tol=TOL):
    """Equal up to ``tol`` relative to each parameter's gradient scale."""
    names = list(got) if names is None else names
    assert names
    bad = {n: max_diff(got[n], want[n]) for n in names if max_diff(got[n], want[n]) > tol * scale_of(want[n])}
    assert not bad, f"gradients differ (max abs diff per parameter): {bad}"


def assert_close_to_fairseq(got, fs, names, rel=REL_FAIRSEQ):
    """Equal up to the float32 rounding of fairseq's own criteria (relative to each scale)."""
    assert names
    bad = {}
    for n in names:
        scale = max(1.0, fs[n].abs().max().item())
        if max_diff(got[n], fs[n]) > rel * scale:
            bad[n] = (max_diff(got[n], fs[n]), scale)
    assert not bad, f"differ from fairseq's criterion (max abs diff, scale): {bad}"


def close_value(a, b, rel=REL_FAIRSEQ):
    a, b = float(a), float(b)
    return abs(a - b) <= rel * max(1.0, abs(b))


def wname_of(setup):
    return next(n for n, p in setup.model.named_parameters() if p is setup.W)


def agg_loss_fn(setup, crit, sample):
    return lambda: crit(setup.model, sample)


# ------------------------------------------------------------------------------------------
# every parameter's gradient: (a) the paper's three logits, (b) eq. 23 for W's output path
# ------------------------------------------------------------------------------------------
def check_against_oracles(setup, crit, gates, sample, eps):
    """The criterion's gradients of every parameter against (a) eqs. 9-10 and (b) eq. 23
    (with the tied-embedding rule); returns the criterion's gradients."""
    got, (loss, _, log) = setup.grads(agg_loss_fn(setup, crit, sample))
    wname = wname_of(setup)

    # (a) eqs. 9-10, every parameter
    paper, (_, L0, nll0) = setup.grads(lambda: paper_three_logit_loss(setup, sample, gates, eps))
    assert_grads_equal(got, paper)
    # the loss value is plain (label-smoothed) CE, i.e. the z0 term, not the 2x-CE objective
    assert abs(loss.item() - L0.item()) <= TOL * max(1.0, abs(L0.item()))
    assert abs(float(log["nll_loss"]) - nll0.item()) <= TOL * max(1.0, abs(nll0.item()))

    # (b) eq. 23 for the output path of W; every other parameter gets the ungated gradient
    plain, _ = setup.grads(lambda: plain_loss(setup, sample, eps))
    out_plain, out_gated = eq23_output_grads(setup, sample, gates, eps)
    if setup.tied:
        # DESIGN 2.5: the part of W's gradient arriving through the input embedding lookup
        # (the plain gradient minus its output-path part) is left untouched.
        through_lookup = plain[wname] - out_plain
        assert through_lookup.abs().max() > 1e-3  # the lookup path really contributes
        want_W = through_lookup + out_gated
    else:
        assert max_diff(plain[wname], out_plain) <= TOL * scale_of(out_plain)  # eq. 23 with Gate = 1 is plain CE
        want_W = out_gated
    assert max_diff(got[wname], want_W) <= TOL * scale_of(want_W)
    assert_grads_equal(got, plain, setup.param_names_other_than_W())
    # not a tautology: the gate changes W's gradient far beyond the tolerance
    assert max_diff(got[wname], plain[wname]) > 1e-3
    return got


# Both output-layer paths of the criterion: one logits tensor, and chunks of 7 positions.
PATHS = pytest.mark.parametrize("loss_chunk_size", [0, 7], ids=["single", "chunked"])


@PATHS
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["ce", "ls0.1"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_equal_paper_formulation_and_eq23(make_setup, config, mode, eps, loss_chunk_size):
    setup = make_setup(config)
    assert setup.tied == (config in TIED)
    crit, gates, sample = prepare(setup, mode, eps, loss_chunk_size)
    check_against_oracles(setup, crit, gates, sample, eps)


# ------------------------------------------------------------------------------------------
# loss value and ungated feature path equal fairseq's own criteria
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["cross_entropy", "label_smoothed_cross_entropy"])
@PATHS
@pytest.mark.parametrize("config", list(CONFIGS))
def test_loss_value_and_feature_gradients_equal_fairseq_criterion(make_setup, config, eps, loss_chunk_size):
    setup = make_setup(config)
    crit, _, sample = prepare(setup, "agg", eps, loss_chunk_size)
    fs_crit = setup.fairseq_criterion(eps)
    got, (loss, sample_size, log) = setup.grads(agg_loss_fn(setup, crit, sample))
    want, (fs_loss, fs_sample_size, fs_log) = setup.grads(lambda: fs_crit(setup.model, sample))
    assert sample_size == fs_sample_size
    assert log["ntokens"] == fs_log["ntokens"] and log["nsentences"] == fs_log["nsentences"]
    assert close_value(loss, fs_loss)
    assert close_value(log["loss"], fs_log["loss"])
    assert close_value(log["nll_loss"], fs_log.get("nll_loss", fs_log["loss"]))
    assert_close_to_fairseq(got, want, setup.param_names_other_than_W())
    # not a tautology: W's gradient is not fairseq's
    wname = wname_of(setup)
    assert max_diff(got[wname], want[wname]) > 1e-3
    # evaluation mode: the same value, no gates involved
    crit.eval()
    fs_crit.eval()
    with torch.no_grad():
        ev_loss, _, _ = crit(setup.model, sample)
        fs_ev_loss, _, _ = fs_crit(setup.model, sample)
    assert close_value(ev_loss, fs_ev_loss)


# ------------------------------------------------------------------------------------------
# edge cases of the counter state
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["ce", "ls0.1"])
@pytest.mark.parametrize("config", ["lm", "lm_tied", "mt_shared"])
def test_empty_rare_set_gives_exactly_the_plain_gradient(make_setup, config, eps):
    setup = make_setup(config)
    every_token = torch.arange(setup.N).repeat(2)  # each token twice per update: a = 2 >= alpha
    setup.task.agg_counter.add(every_token, setup.pad)
    setup.task.agg_counter.commit()
    assert not ref_dynamic_gates([every_token], setup.N, setup.nspecial, setup.pad).rare.any()
    crit = setup.agg_criterion(label_smoothing=eps)
    assert crit.current_gates().num_rare == 0
    sample = setup.batches[0]
    got, _ = setup.grads(agg_loss_fn(setup, crit, sample))
    want, _ = setup.grads(lambda: plain_loss(setup, sample, eps))
    assert_grads_equal(got, want, tol=1e-10)
    fs, _ = setup.grads(lambda: setup.fairseq_criterion(eps)(setup.model, sample))
    assert_close_to_fairseq(got, fs, list(got))


@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["ce", "ls0.1"])
@pytest.mark.parametrize("config", ["lm", "lm_tied", "mt_shared"])
def test_mean_rare_average_zero_gives_g2_zero(make_setup, config, eps):
    setup = make_setup(config)
    # even ids: twice per update (a = 2, not rare); odd ids never seen (rare, a = 0, mean 0)
    seen = torch.arange(0, setup.N, 2).repeat(2)
    setup.task.agg_counter.add(seen, setup.pad)
    setup.task.agg_counter.commit()
    gates = ref_dynamic_gates([seen], setup.N, setup.nspecial, setup.pad)
    assert gates.rare.any() and not gates.rare[0::2].any()
    assert (gates.g2[gates.rare] == 0).all() and (gates.g1[gates.rare] == 0).all()
    crit = setup.agg_criterion(label_smoothing=eps)
    assert torch.equal(crit.current_gates().rare, gates.rare)
    assert (crit.current_gates().g2[gates.rare] == 0).all()
    sample = pick_sample(setup, gates)
    got = check_against_oracles(setup, crit, gates, sample, eps)
    if not setup.tied:
        # a rare row that is no target in the sample gets no output-path gradient at all
        y = sample["target"].reshape(-1)
        never_target = gates.rare.clone()
        never_target[y] = False
        assert never_target.any()
        assert got[wname_of(setup)][never_target].abs().max() == 0


def test_before_the_first_update_every_non_special_token_is_rare(make_setup):
    """u = 0: a = 0 for all tokens, so g1 = g2 = 0 on every non-special token."""
    setup = make_setup("lm")
    crit = setup.agg_criterion()
    gates = ref_dynamic_gates([], setup.N, setup.nspecial, setup.pad)
    assert int(gates.rare.sum()) == setup.N - setup.nspecial
    assert crit.current_gates().num_rare == setup.N - setup.nspecial
    check_against_oracles(setup, crit, gates, setup.batches[0], 0.0)


# ------------------------------------------------------------------------------------------
# fp32 path, loosely, against float64
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["lm_tied", "mt_shared"])
def test_float32_gradients_close_to_float64(make_setup, config):
    runs = {}
    for dtype in (torch.float32, torch.float64):
        setup = make_setup(config, dtype)
        crit, _, sample = prepare(setup, "agg", 0.1)
        runs[dtype] = setup.grads(agg_loss_fn(setup, crit, sample))
        if dtype == torch.float32:
            # in float32, loss and feature path are fairseq's own, up to summation order
            fs, (fs_loss, _, _) = setup.grads(lambda: setup.fairseq_criterion(0.1)(setup.model, sample))
            assert runs[dtype][1][0].dtype == torch.float32
            assert close_value(runs[dtype][1][0], fs_loss, rel=1e-5)
            assert_close_to_fairseq(runs[dtype][0], fs, setup.param_names_other_than_W(), rel=1e-4)
    (g32, (l32, _, _)), (g64, (l64, _, _)) = runs[torch.float32], runs[torch.float64]
    assert abs(l32.item() - l64.item()) <= 1e-5 * abs(l64.item())
    for name in g64:
        assert g32[name].dtype == torch.float32
        scale = g64[name].abs().max().item()
        assert max_diff(g32[name].double(), g64[name]) <= 1e-4 * max(scale, 1.0), name


# ------------------------------------------------------------------------------------------
# core.gated_linear on plain tensors
# ------------------------------------------------------------------------------------------
def _plain_gates(N, nspecial, seed):
    gen = torch.Generator().manual_seed(seed)
    rare = torch.rand(N, generator=gen) < 0.5
    rare[:nspecial] = False
    a = torch.rand(N, generator=gen) * 0.5
    g1 = torch.where(rare, a, torch.ones(N))
    g2 = torch.where(rare, torch.clamp(a / a[rare].mean(), max=1.0), torch.ones(N))
    return core.Gates(rare, g1, g2)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_gated_linear_on_plain_tensors_matches_eq23(eps):
    torch.manual_seed(0)
    M, d, N, nspecial, pad = 40, 8, 30, 4, 1
    H = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    gates = _plain_gates(N, nspecial, 1)
    y = torch.randint(nspecial, N, (M,))
    y[::7] = pad
    y[1::5] = torch.nonzero(gates.rare).squeeze(1)[: len(y[1::5])]  # rare targets present
    logits = core.gated_linear(H, W, y, gates)
    assert torch.equal(logits.detach(), (H @ W.t()).detach())
    loss, _ = ls_rows(logits, y, eps, pad)
    loss.sum().backward()
    ref = RefGates(gates.rare, gates.g1, gates.g2)
    with torch.no_grad():
        P = torch.softmax(H @ W.t(), -1)
        Q = torch.full_like(P, eps / (N - 1))
        Q.scatter_(1, y.unsqueeze(1), 1.0 - eps)
        D = (P - Q) * (y != pad).double().unsqueeze(1)
        row_rare = ref.rare[y].unsqueeze(1)
        gate = torch.where(row_rare, row_gates(ref.g2, ref.rare, y), row_gates(ref.g1, ref.rare, y))
        want_W = (D * gate).t() @ H
        want_H = D @ W
    assert max_diff(W.grad, want_W) <= 1e-12
    assert max_diff(H.grad, want_H) <= 1e-12
    assert max_diff(want_W, D.t() @ H) > 1e-3  # gating matters here
    # core.gated_cross_entropy: the same, with the summed loss of plain (label-smoothed) CE
    H2 = H.detach().clone().requires_grad_(True)
    W2 = W.detach().clone().requires_grad_(True)
    ce, nll = core.gated_cross_entropy(H2, W2, y, gates, ignore_index=pad, label_smoothing=eps)
    ce.backward()
    ref_loss, ref_nll = ls_rows(H.detach() @ W.detach().t(), y, eps, pad)
    assert abs(ce.item() - ref_loss.sum().item()) <= 1e-10 and abs(nll.item() - ref_nll.sum().item()) <= 1e-10
    assert max_diff(W2.grad, want_W) <= 1e-12
    assert max_diff(H2.grad, want_H) <= 1e-12


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [7, 1024])
def test_chunked_gated_loss_matches_eq23(eps, chunk_rows):
    """The memory-saving chunked pass: same values and gradients."""
    torch.manual_seed(3)
    M, d, N, nspecial, pad = 40, 8, 30, 4, 1
    H = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    gates = _plain_gates(N, nspecial, 4)
    y = torch.randint(nspecial, N, (M,))
    y[::6] = pad
    y[1::5] = torch.nonzero(gates.rare).squeeze(1)[: len(y[1::5])]
    loss, nll, _ = core.chunked_gated_loss(H, W, y, gates, ignore_index=pad, label_smoothing=eps,
                                           chunk_rows=chunk_rows)
    loss.backward()
    ref = RefGates(gates.rare, gates.g1, gates.g2)
    with torch.no_grad():
        ref_loss, ref_nll = ls_rows(H @ W.t(), y, eps, pad)
        P = torch.softmax(H @ W.t(), -1)
        Q = torch.full_like(P, eps / (N - 1))
        Q.scatter_(1, y.unsqueeze(1), 1.0 - eps)
        D = (P - Q) * (y != pad).double().unsqueeze(1)
        row_rare = ref.rare[y].unsqueeze(1)
        gate = torch.where(row_rare, row_gates(ref.g2, ref.rare, y), row_gates(ref.g1, ref.rare, y))
    assert abs(loss.item() - ref_loss.sum().item()) <= 1e-10
    assert abs(nll.item() - ref_nll.sum().item()) <= 1e-10
    assert max_diff(W.grad, (D * gate).t() @ H.detach()) <= 1e-12
    assert max_diff(H.grad, D @ W.detach()) <= 1e-12


def _tail_gates(N, first_rare, seed):
    """Rare tokens as one range, as in a dictionary sorted by frequency."""
    gen = torch.Generator().manual_seed(seed)
    rare = torch.arange(N) >= first_rare
    a = torch.rand(N, generator=gen) * 0.5
    return core.Gates(rare, torch.where(rare, a, torch.ones(N)), torch.where(rare, 2 * a, torch.ones(N)))


def _spread_gates(N, seed):
    """Few rare tokens spread over the whole vocabulary (every fifth)."""
    gen = torch.Generator().manual_seed(seed)
    rare = torch.arange(N) % 5 == 1
    a = torch.rand(N, generator=gen) * 0.5
    return core.Gates(rare, torch.where(rare, a, torch.ones(N)), torch.where(rare, 2 * a, torch.ones(N)))


@pytest.mark.parametrize("rare_columns", ["scattered", "one range", "few, spread"])
@pytest.mark.parametrize("rare_rows", ["few", "most"])
def test_gated_linear_arbitrary_upstream_gradient(rare_columns, rare_rows):
    """Not tied to softmax: for any upstream R, grad_W = (R * Gate)^T H and grad_H = R W, whichever
    side (rare-target rows or the others) the correction runs over, and whether the gated
    columns fill most of their span (corrected in place there) or are few and spread (gathered)."""
    torch.manual_seed(1)
    M, d, N = 25, 6, 17
    H = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    gates = {"scattered": lambda: _plain_gates(N, 4, 2), "one range": lambda: _tail_gates(N, 9, 2),
             "few, spread": lambda: _spread_gates(N, 2)}[rare_columns]()
    rare_ids, other_ids = gates.rare.nonzero().squeeze(1), (~gates.rare).nonzero().squeeze(1)
    mostly, seldom = (rare_ids, other_ids) if rare_rows == "most" else (other_ids, rare_ids)
    y = mostly[torch.randint(0, len(mostly), (M,))]
    y[::6] = seldom[torch.randint(0, len(seldom), (len(y[::6]),))]
    R = torch.randn(M, N, dtype=torch.float64)
    (core.gated_linear(H, W, y, gates) * R).sum().backward()
    ref = RefGates(gates.rare, gates.g1, gates.g2)
    row_rare = ref.rare[y].unsqueeze(1)
    gate = torch.where(row_rare, row_gates(ref.g2, ref.rare, y), row_gates(ref.g1, ref.rare, y))
    assert max_diff(W.grad, (R * gate).t() @ H.detach()) <= 1e-12
    assert max_diff(H.grad, R @ W.detach()) <= 1e-12


def test_gated_linear_without_rare_tokens_is_plain():
    torch.manual_seed(2)
    H = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (5,))
    R = torch.randn(5, 9, dtype=torch.float64)
    empty = core.Gates(torch.zeros(9, dtype=torch.bool), torch.ones(9), torch.ones(9))
    for gates in (None, empty):
        H.grad = W.grad = None
        (core.gated_linear(H, W, y, gates) * R).sum().backward()
        assert max_diff(W.grad, R.t() @ H.detach()) <= 1e-12
        assert max_diff(H.grad, R @ W.detach()) <= 1e-12
    with pytest.raises(ValueError):
        core.gated_linear(H, W, y, core.Gates(torch.ones(4, dtype=torch.bool), torch.ones(4), torch.ones(4)))
