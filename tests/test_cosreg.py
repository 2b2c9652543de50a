"""CosReg (Gao et al. 2019; issue 7): the mean pairwise cosine against its O(N^2) definition,
the criterion's objective on fairseq's own tasks and ours (gamma x mean cosine per token on
top of fairseq's cross-entropy / label-smoothed cross-entropy), its errors, and fairseq-train
runs (with Coupled Adam, and on fairseq's translation task)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import LM_MODEL, USER_DIR, lm_train, mt_train, run_all
from fairseq_agg.remedies import mean_pairwise_cosine


def reference_mean_cosine(weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The definition: all N x N cosines, diagonal excluded, averaged (float64). Rows of no
    direction (norm at most eps, such as fairseq's zero padding row) have cosine 0 with every
    row and get no gradient."""
    w = weight.double()
    has_direction = w.norm(dim=1) > eps
    unit = torch.zeros_like(w)
    unit[has_direction] = w[has_direction] / w[has_direction].norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    n = w.size(0)
    return (cosines.sum() - cosines.diagonal().sum()) / (n * (n - 1))


# -- the regulariser -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, offset", [((2, 3), 0.0), ((37, 8), 0.0), ((200, 16), 0.7), ((50, 4), -2.0)])
def test_mean_pairwise_cosine_equals_the_definition(shape, offset):
    g = torch.Generator().manual_seed(shape[0])
    weight = (torch.randn(*shape, generator=g, dtype=torch.float64) + offset).requires_grad_()
    if shape[0] > 3:
        with torch.no_grad():
            weight[1] = 0  # a zero row: cosine 0 with every row
            weight[2] *= 1e-3
    ours = mean_pairwise_cosine(weight)
    ref = reference_mean_cosine(weight)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(ours, weight)
    (grad_ref,) = torch.autograd.grad(ref, weight)
    assert torch.allclose(grad, grad_ref, rtol=1e-10, atol=1e-13)
    if shape[0] > 3:
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and grad[2].abs().max() > 0
    if offset != 0:
        assert abs(float(ref)) > 0.1  # a common direction is what the term measures


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mean_pairwise_cosine_accumulates_in_float32_at_least(dtype):
    weight = (torch.randn(500, 32, generator=torch.Generator().manual_seed(1)) + 0.3).to(dtype)
    value = mean_pairwise_cosine(weight)
    assert value.dtype == torch.float32
    assert abs(float(value) - float(reference_mean_cosine(weight))) < 1e-5


def test_mean_pairwise_cosine_refuses_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 rows"):
        mean_pairwise_cosine(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"expected an \(N, d\) matrix"):
        mean_pairwise_cosine(torch.ones(4))


# -- the criterion on fairseq's tasks and ours ----------------------------------------------------------------
def build(args):
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [str(a) for a in args]))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("train")
    batches = task.get_batch_iterator(task.dataset("train"), max_tokens=256).next_epoch_itr(shuffle=False)
    iterator = iter(batches)
    return task, model, criterion, [next(iterator), next(iterator)]


def lm_args(data, *extra, task="language_modeling"):
    return [data, "--user-dir", USER_DIR, "--task", task, *LM_MODEL, "--tokens-per-sample", "32",
            "--criterion", "cosreg_cross_entropy", "--optimizer", "adam", "--lr", "1e-3", "--cpu", *extra]


def mt_args(data, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "translation", "--source-lang", "en", "--target-lang", "de",
            "--arch", "transformer_wmt_en_de", "--encoder-layers", "1", "--decoder-layers", "1",
            "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
            "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
            "--share-all-embeddings", "--dropout", "0", "--criterion", "cosreg_cross_entropy",
            "--optimizer", "adam", "--lr", "1e-3", "--cpu", *extra]


def loss_and_grads(criterion, model, sample):
    model.zero_grad()
    loss, sample_size, log = criterion(model, sample)
    loss.backward()
    return loss.detach(), sample_size, log, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("setting", ["lm", "lm_agg", "mt", "mt_smoothed"])
def test_objective_is_cross_entropy_plus_gamma_mean_cosine_per_token(setting, lm_data, mt_data):
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion
    from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion

    gamma, eps = 0.7, (0.1 if setting == "mt_smoothed" else 0.0)
    extra = ["--cosreg-gamma", gamma, "--label-smoothing", eps]
    if setting.startswith("lm"):
        args = lm_args(lm_data, *extra, task="language_modeling_agg" if setting == "lm_agg" else "language_modeling")
    else:
        args = mt_args(mt_data, *extra)
    task, model, criterion, samples = build(args)
    model.eval()  # no dropout: both criteria see the same network
    if eps > 0:
        plain = LabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=eps)
    else:
        plain = CrossEntropyCriterion(task, sentence_avg=False)
    weight = model.decoder.output_projection.weight
    w_name = next(n for n, p in model.named_parameters() if p is weight)  # tied: the first of its names
    w64 = weight.detach().double().requires_grad_()
    cosine = reference_mean_cosine(w64)
    (cosine_grad,) = torch.autograd.grad(cosine, w64)

    total_loss, total_plain, total_size = 0.0, 0.0, 0
    for sample in samples:  # two micro-batches of one update
        loss, sample_size, log, grads = loss_and_grads(criterion, model, sample)
        plain_loss, plain_size, plain_log, plain_grads = loss_and_grads(plain, model, sample)
        assert sample_size == plain_size == sample["ntokens"]
        # The term is gamma * C(W) per unit of sample_size, added to fairseq's summed loss.
        # Both losses are float32 sums of a few thousand nats: their difference is exact only
        # to a few units in the last place of that sum (the term itself is also checked through
        # the logged cosine below and through the gradients).
        rounding = 4 * torch.finfo(torch.float32).eps * abs(float(plain_loss))
        assert float(loss - plain_loss) == pytest.approx(gamma * sample_size * float(cosine), rel=1e-4,
                                                          abs=max(1e-4, rounding))
        assert torch.equal(log["nll_loss"], plain_log.get("nll_loss", plain_log["loss"]))
        assert float(log["cosreg"]) == pytest.approx(float(cosine), abs=1e-6)
        expected = plain_grads[w_name] + gamma * sample_size * cosine_grad.float()
        assert torch.allclose(grads[w_name], expected, rtol=1e-4, atol=1e-5)
        for name, grad in grads.items():
            if name != w_name:
                assert torch.allclose(grad, plain_grads[name], rtol=1e-5, atol=1e-7), name
        total_loss += float(loss)
        total_plain += float(plain_loss)
        total_size += sample_size
    # What fairseq optimises after dividing the update's summed loss by its sample_size.
    per_token = (total_loss - total_plain) / total_size
    assert per_token == pytest.approx(gamma * float(cosine), rel=1e-4, abs=1e-6)


def test_gamma_zero_is_fairseq_cross_entropy_exactly(lm_data):
    from fairseq.criterions.cross_entropy import CrossEntropyCriterion

    task, model, criterion, samples = build(lm_args(lm_data, "--cosreg-gamma", "0"))
    loss, _, log, grads = loss_and_grads(criterion, model, samples[0])
    plain_loss, _, _, plain_grads = loss_and_grads(CrossEntropyCriterion(task, sentence_avg=False), model, samples[0])
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
    assert math.isfinite(float(log["cosreg"]))  # still logged


def test_sentence_avg_scales_by_sentences(lm_data):
    _, model, criterion, samples = build(lm_args(lm_data, "--cosreg-gamma", "2", "--sentence-avg"))
    sample = samples[0]
    model.eval()
    loss, sample_size, log = criterion(model, sample)
    assert sample_size == sample["target"].size(0)
    lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    nll = F.nll_loss(lprobs.view(-1, lprobs.size(-1)), sample["target"].view(-1), ignore_index=1, reduction="sum")
    cosine = reference_mean_cosine(model.decoder.output_projection.weight.detach())
    assert float(loss) == pytest.approx(float(nll) + 2 * sample_size * float(cosine), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.7])
def test_unlikelihood_alpha_adds_the_unlikelihood_criterions_objective(lm_data, gamma):
    """UL + CosReg: with --unlikelihood-alpha, the objective is unlikelihood_cross_entropy's
    (tested against a dense reference in test_unlikelihood.py) plus gamma x C(W) per token."""
    from fairseq_agg.criterions.unlikelihood import UnlikelihoodCrossEntropyConfig, UnlikelihoodCrossEntropyCriterion

    task, model, criterion, samples = build(lm_args(lm_data, "--cosreg-gamma", gamma, "--unlikelihood-alpha", "0.5"))
    model.eval()
    ul_criterion = UnlikelihoodCrossEntropyCriterion(task, UnlikelihoodCrossEntropyConfig(unlikelihood_alpha=0.5, sentence_avg=False))
    weight = model.decoder.output_projection.weight
    w_name = next(n for n, p in model.named_parameters() if p is weight)
    w64 = weight.detach().double().requires_grad_()
    cosine = reference_mean_cosine(w64)
    (cosine_grad,) = torch.autograd.grad(cosine, w64)
    loss, sample_size, log, grads = loss_and_grads(criterion, model, samples[0])
    ul_loss, ul_size, ul_log, ul_grads = loss_and_grads(ul_criterion, model, samples[0])
    assert sample_size == ul_size and float(ul_log["ul_loss"]) > 0
    assert float(log["ul_loss"]) == pytest.approx(float(ul_log["ul_loss"]), rel=1e-5)
    assert float(log["nll_loss"]) == pytest.approx(float(ul_log["nll_loss"]), rel=1e-5)
    assert float(loss) == pytest.approx(float(ul_loss) + gamma * sample_size * float(cosine), rel=1e-5)
    expected = ul_grads[w_name] + gamma * sample_size * cosine_grad.float()
    assert torch.allclose(grads[w_name], expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        if name != w_name:
            assert torch.allclose(grad, ul_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("gamma", ["-0.1", "nan"])
def test_negative_gamma_is_refused(lm_data, gamma):
    with pytest.raises(ValueError, match="--cosreg-gamma must be >= 0"):
        build(lm_args(lm_data, "--cosreg-gamma", gamma))


def test_adaptive_softmax_is_refused_naming_cosreg(lm_data):
    args = [a for a in lm_args(lm_data, "--adaptive-softmax-cutoff", "100,200")
            if a != "--share-decoder-input-output-embed"]
    _, model, criterion, samples = build(args)
    with pytest.raises(ValueError, match="cosreg_cross_entropy regularises the output embedding .*adaptive-softmax"):
        criterion(model, samples[0])


# -- fairseq-train ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(lm_data, mt_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cosreg_runs")
    coupled = lm_train(lm_data, root / "coupled", "--optimizer", "coupled_adam", "--cosreg-gamma", "5",
                       "--max-update", 2, criterion="cosreg_cross_entropy", name="cosreg + coupled_adam")
    translation = mt_train(mt_data, root / "mt", "--task", "translation", "--label-smoothing", "0.1",
                           "--cosreg-gamma", "5", "--max-update", 2, "--update-freq", 2,
                           criterion="cosreg_cross_entropy", name="cosreg on fairseq's translation")
    unlikelihood = lm_train(lm_data, root / "ul", "--unlikelihood-alpha", "1", "--cosreg-gamma", "5",
                            "--max-update", 2, criterion="cosreg_cross_entropy", name="ul + cosreg")
    return {run.name: run for run in run_all([coupled, translation, unlikelihood])}


def check_logged_objective(run):
    records = run.records
    inner = records["train_inner"]
    assert [int(r["num_updates"]) for r in inner] == [1, 2]
    for r in inner + [{k[len("valid_"):]: v for k, v in records["valid"][-1].items()}]:
        cosine = float(r["cosreg"])
        assert -1 <= cosine <= 1
        assert math.isfinite(float(r["nll_loss"]))
        assert "ppl" in r


def test_cosreg_with_coupled_adam_trains(runs):
    run = runs["cosreg + coupled_adam"]
    assert "coupled_adam: decoder.embed_tokens.weight = decoder.output_projection.weight" in run.log
    check_logged_objective(run)
    # No label smoothing: the logged loss is the NLL plus gamma * cosine (in bits).
    first = run.records["train_inner"][0]
    assert float(first["loss"]) == pytest.approx(
        float(first["nll_loss"]) + 5.0 * float(first["cosreg"]) / math.log(2), abs=2e-3)


def test_cosreg_on_fairseq_translation_task_trains(runs):
    run = runs["cosreg on fairseq's translation"]
    check_logged_objective(run)
    assert run.checkpoint()["cfg"]["task"]["_name"] == "translation"


def test_unlikelihood_with_cosreg_trains(runs):
    run = runs["ul + cosreg"]
    check_logged_objective(run)
    # The logged loss (bits) is NLL + UL (nats per token, logged as such) + gamma * cosine.
    first = run.records["train_inner"][0]
    assert float(first["ul_loss"]) > 0
    assert float(first["loss"]) == pytest.approx(
        float(first["nll_loss"]) + (float(first["ul_loss"]) + 5.0 * float(first["cosreg"])) / math.log(2), abs=3e-3)
