"""Coupled Adam (issue 7): the update rule against a direct transcription of the paper's rule
and against fairseq's / torch's AdamW, which embedding matrices are marked, the mark through
fairseq's fp16 wrappers, clear errors, and fairseq-train runs (stop and resume bit-identical,
with AGG and with AGG + unlikelihood)."""

import re

import pytest
import torch

from conftest import USER_DIR, LM_MODEL, lm_train, run_all
from fairseq_agg.remedies import CoupledAdam, coupled_adam_step

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.98), 1e-8, 0.1
STEPS = 6


# -- the update rule -------------------------------------------------------------------------------
def reference_adamw(param, grads, coupled, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD):
    """The rule as the paper states it, in float64: Adam's per-element second moment v,
    averaged over the vocabulary (rows) where it is used; fairseq's adam places eps as
    eps / sqrt(1 - beta2^t) against the bias-corrected moments."""
    beta1, beta2 = betas
    p = param.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        v_used = v.mean(dim=0, keepdim=True).expand_as(v) if coupled else v
        m_hat = m / (1 - beta1**t)
        v_hat = v_used / (1 - beta2**t)
        p = p - lr * weight_decay * p - lr * m_hat / (v_hat.sqrt() + eps / (1 - beta2**t) ** 0.5)
    return p


def random_problem(seed, vocab=11, dim=5):
    g = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    other = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    grads = []
    for _ in range(STEPS):
        # Rows of very different gradient scale: what makes Adam's per-row rates differ.
        scale = torch.logspace(-3, 0, vocab, dtype=torch.float64).unsqueeze(1)
        grad_embedding = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * scale
        grad_embedding[3] = 0  # a row absent from the batch
        grads.append((grad_embedding, torch.randn(3, 4, generator=g, dtype=torch.float64),
                      torch.randn(4, generator=g, dtype=torch.float64)))
    return (embedding, other, bias), grads


def run_optimizer(make, params, grads):
    params = [torch.nn.Parameter(p.clone()) for p in params]
    optimizer = make(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype).clone()
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("seed", [0, 1])
def test_coupled_adam_equals_the_direct_rule(seed):
    params, grads = random_problem(seed)
    ours, optimizer = run_optimizer(
        lambda ps: CoupledAdam([{"params": ps[:1], "coupled": True}, {"params": ps[1:]}],
                               lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        params, grads,
    )
    for i, (p, coupled) in enumerate(zip(params, (True, False, False))):
        ref = reference_adamw(p, [g[i] for g in grads], coupled)
        assert torch.allclose(ours[i].data, ref, rtol=1e-12, atol=1e-14), i
    # Stored as one row per matrix: the mean of the per-element moments (linear in g^2).
    assert optimizer.state[ours[0]]["exp_avg_sq"].shape == (1, 5)
    assert optimizer.state[ours[1]]["exp_avg_sq"].shape == (3, 4)
    # Coupling changes the embedding's update, and every row's step now has the same scale.
    uncoupled = reference_adamw(params[0], [g[0] for g in grads], coupled=False)
    assert not torch.allclose(ours[0].data, uncoupled)


def test_uncoupled_parameters_get_fairseq_adam_exactly_and_torch_adamw_up_to_eps():
    from fairseq.optim.adam import Adam as FairseqAdam

    params, grads = random_problem(2)
    params = [p.float() for p in params]
    grads = [[g.float() for g in step] for step in grads]
    ours, _ = run_optimizer(
        lambda ps: CoupledAdam([{"params": ps[:1], "coupled": True}, {"params": ps[1:]}],
                               lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
        params, grads,
    )
    fairseq, _ = run_optimizer(lambda ps: FairseqAdam(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD), params, grads)
    for i in (1, 2):
        assert torch.equal(ours[i].data, fairseq[i].data), i
    # torch's AdamW adds eps after bias correction; with eps = 0 it is the same update.
    params, grads = random_problem(3)
    grads = [[g + (g == 0) * 1e-3 for g in step] for step in grads]  # eps 0: no 0 / 0
    ours, _ = run_optimizer(lambda ps: CoupledAdam(ps, lr=LR, betas=BETAS, eps=0.0, weight_decay=WD), params, grads)
    adamw, _ = run_optimizer(
        lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=0.0, weight_decay=WD, foreach=False), params, grads)
    for a, b in zip(ours, adamw):
        assert torch.allclose(a.data, b.data, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("torch_optimizer", ["Adam", "AdamW"])
def test_uncoupled_parameters_track_torch_adam_at_the_default_eps(torch_optimizer):
    """Beside a coupled embedding, the other parameters follow torch's own optimizer (Adam
    without weight decay, AdamW with it) to the eps-placement difference, far below any real
    change of the rule (a wrong rule moves them by about lr per step)."""
    params, grads = random_problem(4)
    weight_decay = WD if torch_optimizer == "AdamW" else 0.0
    ours, _ = run_optimizer(
        lambda ps: CoupledAdam([{"params": ps[:1], "coupled": True}, {"params": ps[1:]}],
                               lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay),
        params, grads,
    )
    make = getattr(torch.optim, torch_optimizer)
    reference, _ = run_optimizer(
        lambda ps: make(ps[1:], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, foreach=False), params, grads)
    for i in (1, 2):
        assert not torch.allclose(reference[i].data, params[i], atol=LR)  # they did move
        assert torch.allclose(ours[i].data, reference[i].data, rtol=0, atol=1e-6), i  # measured: 5e-8


def test_functional_step_refuses_a_mismatched_second_moment():
    p = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"second moment of a coupled \(4, 3\) matrix has shape \(1, 3\)"):
        coupled_adam_step(p, p.clone(), torch.zeros(4, 3), torch.zeros(4, 3), 1, lr=1.0, betas=BETAS,
                          eps=EPS, weight_decay=0.0, coupled=True)
    with pytest.raises(ValueError, match="counts updates from 1"):
        coupled_adam_step(p, p.clone(), torch.zeros(4, 3), torch.zeros(1, 3), 0, lr=1.0, betas=BETAS,
                          eps=EPS, weight_decay=0.0, coupled=True)


def test_optimizer_refuses_bad_options():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="coupled parameter must be a \\(vocabulary, dim\\) matrix"):
        CoupledAdam([{"params": [torch.nn.Parameter(torch.zeros(4))], "coupled": True}])
    with pytest.raises(ValueError, match="does not implement amsgrad"):
        CoupledAdam([{"params": [w], "amsgrad": True}])
    with pytest.raises(ValueError, match="betas must be two numbers in \\[0, 1\\)"):
        CoupledAdam([w], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight decay must be >= 0"):
        CoupledAdam([w], weight_decay=-1.0)
    assert CoupledAdam.supports_flat_params is False


# -- fairseq: which parameters are embedding matrices ----------------------------------------------------
def build(args):
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [str(a) for a in args]))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    return cfg, task.build_model(cfg.model)


def lm_args(data, *extra, task="language_modeling_agg", tied=True):
    model = [a for a in LM_MODEL if tied or a != "--share-decoder-input-output-embed"]
    return [data, "--user-dir", USER_DIR, "--task", task, *model, "--criterion", "cross_entropy",
            "--optimizer", "coupled_adam", "--lr", "1e-3", "--weight-decay", "0.01", "--cpu",
            "--tokens-per-sample", "32", *extra]


def mt_args(data, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "translation_agg", "--source-lang", "en", "--target-lang", "de",
            "--arch", "transformer_wmt_en_de", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
            "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
            "--criterion", "cross_entropy", "--optimizer", "coupled_adam", "--lr", "1e-3", "--cpu", *extra]


def coupled_groups(cfg, model):
    from fairseq import optim

    optimizer = optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    groups = {g["coupled"]: g["params"] for g in optimizer.optimizer.param_groups}
    return optimizer, groups.get(True, []), groups.get(False, [])


def names_of(model, tensors):
    found = []
    for t in tensors:
        found.append(sorted(n for n, p in model.named_parameters(remove_duplicate=False) if p is t))
    return sorted(found)


def test_detection_language_models(lm_data):
    cfg, model = build(lm_args(lm_data))
    _, coupled, plain = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.embed_tokens.weight", "decoder.output_projection.weight"]]
    assert len(coupled) + len(plain) == len(list(model.parameters()))

    cfg, model = build(lm_args(lm_data, "--decoder-learned-pos", tied=False))
    _, coupled, _ = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.embed_tokens.weight"], ["decoder.output_projection.weight"]]
    assert all(p is not model.decoder.embed_positions.weight for p in coupled)  # positions are not vocabulary rows
    cfg, model = build(lm_args(lm_data, "--coupled-adam-embeddings", "output", tied=False))
    _, coupled, _ = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.output_projection.weight"]]


@pytest.mark.parametrize(
    "sharing, expected",
    [
        (["--share-all-embeddings"],
         [["decoder.embed_tokens.weight", "decoder.output_projection.weight", "encoder.embed_tokens.weight"]]),
        (["--share-decoder-input-output-embed"],
         [["decoder.embed_tokens.weight", "decoder.output_projection.weight"], ["encoder.embed_tokens.weight"]]),
        ([], [["decoder.embed_tokens.weight"], ["decoder.output_projection.weight"], ["encoder.embed_tokens.weight"]]),
    ],
)
def test_detection_translation_models(mt_data, sharing, expected):
    cfg, model = build(mt_args(mt_data, *sharing))
    _, coupled, plain = coupled_groups(cfg, model)
    assert names_of(model, coupled) == expected
    assert len({id(p) for p in coupled}) == len(coupled)  # each distinct tensor once
    assert not any(p.dim() == 2 and p.size(0) == coupled[0].size(0) for p in plain)


def test_override_by_names(mt_data):
    from fairseq_agg.optim import mark_embedding_parameters

    cfg, model = build(mt_args(mt_data))
    # A command-line choice among the marked matrices ...
    cfg.optimizer.coupled_adam_embeddings = "encoder.embed_tokens.weight,decoder.output_projection.weight"
    _, coupled, _ = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.output_projection.weight"], ["encoder.embed_tokens.weight"]]
    cfg.optimizer.coupled_adam_embeddings = "input"
    _, coupled, _ = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.embed_tokens.weight"], ["encoder.embed_tokens.weight"]]
    cfg.optimizer.coupled_adam_embeddings = "decoder.layers.0.fc1.weight"
    with pytest.raises(ValueError, match="not among the marked embedding matrices .*mark_embedding_parameters"):
        coupled_groups(cfg, model)
    # ... and in code, any matrix, replacing the detected marks.
    marked = mark_embedding_parameters(model, names=["decoder.layers.0.fc1.weight"])
    assert marked == {"decoder.layers.0.fc1.weight": {"names": ["decoder.layers.0.fc1.weight"], "roles": ["named"]}}
    cfg.optimizer.coupled_adam_embeddings = "all"
    _, coupled, _ = coupled_groups(cfg, model)
    assert names_of(model, coupled) == [["decoder.layers.0.fc1.weight"]]
    with pytest.raises(ValueError, match="no parameter named decoder.nope"):
        mark_embedding_parameters(model, names=["decoder.nope"])
    with pytest.raises(ValueError, match="only \\(vocabulary, dim\\) matrices"):
        mark_embedding_parameters(model, names=["decoder.layers.0.fc1.bias"])
    # "none": plain AdamW (fairseq's adam) everywhere.
    cfg.optimizer.coupled_adam_embeddings = "none"
    _, coupled, plain = coupled_groups(cfg, model)
    assert coupled == [] and len(plain) == len(list(model.parameters()))


def test_mark_keeps_other_optim_overrides(lm_data):
    from fairseq_agg.optim import mark_embedding_parameters
    from fairseq_agg.optim.coupled_adam import TAG_KEY

    _, model = build(lm_args(lm_data))
    weight = model.decoder.embed_tokens.weight
    weight.optim_overrides = {"optimizer": {"lr_scale": 0.5}, TAG_KEY: {"names": ["x"], "roles": ["input"]}}
    fc = model.decoder.layers[0].fc1.weight
    fc.optim_overrides = {"optimizer": {"lr_scale": 2.0}}
    mark_embedding_parameters(model)
    assert weight.optim_overrides["optimizer"] == {"lr_scale": 0.5}
    assert weight.optim_overrides[TAG_KEY]["roles"] == ["input", "output"]
    assert fc.optim_overrides == {"optimizer": {"lr_scale": 2.0}}
    other = model.decoder.layers[0].fc2.weight
    assert not hasattr(other, "optim_overrides")


# -- fairseq: the mark through the fp16 / bf16 wrappers -----------------------------------------------
@pytest.mark.parametrize("precision", [["--fp16", "--fp16-no-flatten-grads"], ["--memory-efficient-fp16"], ["--bf16"],
                                       ["--memory-efficient-bf16"]])
def test_mark_survives_the_mixed_precision_wrappers(lm_data, precision):
    """FP16Optimizer (--fp16 without flattening, and --bf16, which never flattens) hands the
    optimizer fp32 copies; MemoryEfficientFP16Optimizer the model's own low-precision
    parameters. Either way the embedding is coupled and one step equals the fp32 rule."""
    from fairseq import optim

    cfg, model = build(lm_args(lm_data, *precision))
    dtype = torch.bfloat16 if "bf16" in precision[0] else torch.float16
    model = model.to(dtype)
    params = list(model.parameters())
    if "memory-efficient" in precision[0]:
        wrapper = optim.MemoryEfficientFP16Optimizer.build_optimizer(cfg, params)
    else:
        wrapper = optim.FP16Optimizer.build_optimizer(cfg, params)
    groups = {g["coupled"]: g["params"] for g in wrapper.optimizer.param_groups}
    assert len(groups[True]) == 1 and groups[True][0].shape == model.decoder.embed_tokens.weight.shape
    assert groups[True][0].dtype == (dtype if "memory-efficient" in precision[0] else torch.float32)

    weight = model.decoder.embed_tokens.weight
    before = weight.detach().float().clone()
    grad = (torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-2).to(dtype)
    wrapper.zero_grad()
    wrapper.backward((weight.float() * grad.float()).sum())  # d/dW = grad, times fp16's power-of-2 loss scale
    wrapper.step()
    expected = before.clone()
    coupled_adam_step(expected, grad.float(), torch.zeros_like(expected), torch.zeros(1, expected.size(1)), 1,
                      lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, coupled=True)
    assert torch.equal(weight.detach(), expected.to(dtype))


def test_flat_parameters_are_refused(lm_data):
    """Flat fp16 (fairseq's default --fp16) needs CUDA to build, so the optimizer is handed
    the flat vector directly here."""
    from fairseq import optim

    cfg, model = build(lm_args(lm_data))
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    with pytest.raises(ValueError, match="add --fp16-no-flatten-grads"):
        optim.build_optimizer(cfg.optimizer, [flat])
    optimizer, _, _ = coupled_groups(cfg, model)
    assert optimizer.supports_flat_params is False


def test_no_marked_embedding_names_the_fix(lm_data):
    from fairseq import optim

    cfg, model = build(lm_args(lm_data, task="language_modeling"))  # fairseq's task marks nothing
    with pytest.raises(ValueError, match="no parameter marked as an embedding matrix: .*--task language_modeling_agg.*"
                                         "mark_embedding_parameters\\(model\\)"):
        optim.build_optimizer(cfg.optimizer, list(model.parameters()))
    from fairseq_agg.optim import mark_embedding_parameters

    mark_embedding_parameters(model)
    _, coupled, _ = coupled_groups(cfg, model)
    assert len(coupled) == 1


def test_reference_weight_decay_spares_embeddings_and_1d_parameters(lm_data):
    """--coupled-adam-weight-decay reference: no decay on the embedding matrices and on 1-D
    parameters (the Coupled Adam reference runs); every other matrix decays. The default, all,
    decays everything as fairseq's adam. The choice survives fairseq's optimizer overrides on
    resume, and a state of the other choice is refused."""
    cfg, model = build(lm_args(lm_data, "--coupled-adam-weight-decay", "reference", "--weight-decay", "0.1"))
    optimizer, _, _ = coupled_groups(cfg, model)
    groups = optimizer.optimizer.param_groups
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    embedding = model.decoder.embed_tokens.weight
    assert decay[id(embedding)] == 0.0
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if p.dim() < 2 or p is embedding else 0.1), name
    assert [(g["coupled"], bool(g.get("no_decay"))) for g in groups] == [(True, True), (False, False), (False, True)]
    # one step with a zero gradient: only the decayed matrices move
    params = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    fc = model.decoder.layers[0].fc1
    assert torch.equal(embedding.detach(), params[id(embedding)])
    assert torch.equal(fc.bias.detach(), params[id(fc.bias)])
    ratio = fc.weight.detach() / params[id(fc.weight)]
    assert torch.allclose(ratio, torch.full_like(ratio, 1 - 1e-3 * 0.1), rtol=0, atol=1e-6), ratio.flatten()[:4]
    # resume: fairseq's overrides put --weight-decay on every group; the undecayed stay undecayed
    state = optimizer.state_dict()
    again, _, _ = coupled_groups(cfg, model)
    again.load_state_dict(state, optimizer_overrides=again.optimizer_config)
    assert [g["weight_decay"] for g in again.optimizer.param_groups] == [0.0, 0.1, 0.0]
    cfg_all, _ = build(lm_args(lm_data, "--weight-decay", "0.1"))
    default, _, _ = coupled_groups(cfg_all, model)
    assert [g["weight_decay"] for g in default.optimizer.param_groups] == [0.1, 0.1]
    with pytest.raises(ValueError, match="--coupled-adam-weight-decay; resume with the same settings or add --reset-optimizer"):
        default.load_state_dict(state)


def test_state_of_another_optimizer_is_refused(lm_data):
    from fairseq.optim.adam import Adam as FairseqAdam

    cfg, model = build(lm_args(lm_data))
    adam_state = FairseqAdam(list(model.parameters())).state_dict()
    optimizer, _, _ = coupled_groups(cfg, model)
    with pytest.raises(ValueError, match="does not fit this coupled_adam .* --reset-optimizer"):
        optimizer.load_state_dict(adam_state)


# -- fairseq-train ----------------------------------------------------------------------------------------
N = 2  # updates before the stop
COUPLED = ["--optimizer", "coupled_adam", "--agg-alpha", "0.5", "--agg-window", "4"]


@pytest.fixture(scope="module")
def runs(lm_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("coupled_runs")
    full = lm_train(lm_data, root / "full", *COUPLED, "--max-update", 2 * N, "--save-interval-updates", N,
                    name="coupled full")
    first = lm_train(lm_data, root / "resumed", *COUPLED, "--max-update", N, name="coupled first half")
    unlikelihood = lm_train(lm_data, root / "ul", *COUPLED, "--max-update", 2, "--disable-validation",
                            criterion="agg_unlikelihood", name="coupled agg_unlikelihood")
    # the UL baseline (no AGG) with Coupled Adam: the plug-in's task marks the embeddings
    ul_baseline = lm_train(lm_data, root / "ul_baseline", "--optimizer", "coupled_adam", "--max-update", 2,
                           "--disable-validation", criterion="unlikelihood_cross_entropy",
                           name="coupled unlikelihood_cross_entropy")
    run_all([full, first, unlikelihood, ul_baseline])
    resumed = lm_train(lm_data, root / "resumed", *COUPLED, "--max-update", 2 * N, name="coupled resumed")
    resumed.wait()
    return {"full": full, "resumed": resumed, "unlikelihood": unlikelihood, "ul_baseline": ul_baseline}


def test_agg_with_coupled_adam_trains_and_resumes_bit_identically(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert "coupled_adam: decoder.embed_tokens.weight = decoder.output_projection.weight" in full.log
    assert re.search(rf"Loaded checkpoint \S+checkpoint_last.pt \(epoch 1 @ {N} updates\)", resumed.log)
    a, b = full.checkpoint(), resumed.checkpoint()
    assert a["optimizer_history"][-1]["optimizer_name"] == "FairseqCoupledAdam"
    assert b["optimizer_history"][-1]["num_updates"] == 2 * N
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    state_a, state_b = a["last_optimizer_state"], b["last_optimizer_state"]
    assert [g["coupled"] for g in state_a["param_groups"]] == [True, False]
    embedding_state = state_a["state"][0]
    assert embedding_state["step"] == 2 * N
    assert embedding_state["exp_avg_sq"].shape == (1, a["model"]["decoder.embed_tokens.weight"].size(1))
    for index, state in state_a["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], state_b["state"][index][name]), (index, name)
    losses = [(r["num_updates"], r["loss"]) for r in full.records["train_inner"][N:]]
    assert [(r["num_updates"], r["loss"]) for r in resumed.records["train_inner"]] == losses


@pytest.mark.parametrize("run", ["unlikelihood", "ul_baseline"])
def test_unlikelihood_with_coupled_adam_trains(runs, run):
    records = runs[run].records["train_inner"]
    assert [int(r["num_updates"]) for r in records] == [1, 2]
    assert all(float(r["ul_loss"]) >= 0 for r in records)
    assert "coupled_adam: decoder.embed_tokens.weight" in runs[run].log
