"""Token-level unlikelihood (issue 3) against a dense float64 reference of the formula."""

import torch
import torch.nn.functional as F

from fairseq_agg import core

PAD = 1


def dense_candidate_mask(target: torch.Tensor, pad: int, vocab: int) -> torch.Tensor:
    """M[b, t, c] = 1 iff c is among target[b, :t], c != target[b, t], c != pad, and
    target[b, t] is not padding. Written as plain loops: the reference."""
    bsz, length = target.shape
    mask = torch.zeros(bsz, length, vocab, dtype=torch.float64)
    for b in range(bsz):
        for t in range(length):
            if target[b, t] == pad:
                continue
            for s in range(t):
                c = int(target[b, s])
                if c != pad and c != int(target[b, t]):
                    mask[b, t, c] = 1.0
    return mask


def reference_objective(logits, target, alpha, pad, eps=0.0):
    """NLL (label-smoothed as fairseq) + alpha * sum_c -log(clamp(1 - p_c, 1e-5)), per row."""
    bsz, length, vocab = logits.shape
    lprobs = F.log_softmax(logits, dim=-1)
    mask = dense_candidate_mask(target, pad, vocab)
    ul_rows = (-torch.log(torch.clamp(1 - lprobs.exp(), min=1e-5)) * mask).sum(-1)
    nll_rows = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth_rows = -lprobs.sum(-1)
    eps_i = eps / (vocab - 1)
    mle_rows = (1 - eps - eps_i) * nll_rows + eps_i * smooth_rows
    keep = (target != pad).to(logits.dtype)
    return (mle_rows * keep + alpha * ul_rows).reshape(-1), (nll_rows * keep).sum(), ul_rows.sum()


def random_batch(seed, bsz=4, length=9, vocab=12):
    g = torch.Generator().manual_seed(seed)
    # Few distinct tokens so that repeats are frequent; some rows padded at the end.
    target = torch.randint(4, 4 + 5, (bsz, length), generator=g)
    for b in range(1, bsz):
        target[b, length - b:] = PAD
    logits = torch.randn(bsz, length, vocab, generator=g, dtype=torch.float64) * 2
    return logits, target


def ours(logits, target, alpha, eps=0.0):
    lprobs = F.log_softmax(logits.reshape(-1, logits.size(-1)), dim=-1)
    mle, nll = core.label_smoothed_nll_loss(lprobs, target.reshape(-1), eps, PAD)
    rows, tokens = core.unlikelihood_candidates(target, PAD)
    ul = core.unlikelihood_loss(lprobs, rows, tokens)
    return mle + alpha * ul, nll, ul


def test_candidates_match_the_dense_definition():
    for seed in range(5):
        _, target = random_batch(seed)
        rows, tokens = core.unlikelihood_candidates(target, PAD)
        sparse = torch.zeros(target.numel(), 12, dtype=torch.float64)
        sparse[rows, tokens] = 1.0
        assert len(set(zip(rows.tolist(), tokens.tolist()))) == rows.numel(), "duplicate candidates"
        assert torch.equal(sparse, dense_candidate_mask(target, PAD, 12).reshape(-1, 12))


def test_values_and_gradients_equal_the_dense_reference():
    for seed in range(4):
        for eps in (0.0, 0.1):
            logits, target = random_batch(seed)
            logits.requires_grad_()
            loss, nll, ul = ours(logits, target, alpha=1.0, eps=eps)
            ref_rows, ref_nll, ref_ul = reference_objective(logits, target, 1.0, PAD, eps)
            ref = ref_rows.sum()
            assert torch.allclose(loss, ref, atol=1e-10, rtol=0)
            assert torch.allclose(nll, ref_nll, atol=1e-10, rtol=0)
            assert torch.allclose(ul, ref_ul, atol=1e-10, rtol=0)
            (g,) = torch.autograd.grad(loss, logits)
            (g_ref,) = torch.autograd.grad(ref, logits)
            assert torch.allclose(g, g_ref, atol=1e-10, rtol=0)


def test_no_candidate_leaks_across_sequences():
    # Sequence 1 repeats nothing of its own, but its tokens all appear in sequence 0.
    target = torch.tensor([[4, 5, 6, 7], [5, 6, 7, 8]])
    logits = torch.randn(2, 4, 10, dtype=torch.float64)
    rows, tokens = core.unlikelihood_candidates(target, PAD)
    second = rows >= 4
    got = sorted(zip((rows[second] - 4).tolist(), tokens[second].tolist()))
    assert got == [(1, 5), (2, 5), (2, 6), (3, 5), (3, 6), (3, 7)]
    # The batch loss is the sum of the per-sequence losses. Candidates drawn from the
    # flattened batch (the original plug-in) would add sequence 0's tokens to sequence 1.
    batch = ours(logits, target, 1.0)[2]
    alone = ours(logits[:1], target[:1], 1.0)[2] + ours(logits[1:], target[1:], 1.0)[2]
    assert torch.allclose(batch, alone, atol=1e-12, rtol=0)
    flat = target.reshape(1, -1)
    leaky = ours(logits.reshape(1, 8, 10), flat, 1.0)[2]
    assert not torch.allclose(batch, leaky)


def test_padding_rows_contribute_nothing():
    logits, target = random_batch(3)
    loss = ours(logits, target, 1.0)[0]
    changed = logits.clone()
    changed[target == PAD] += 50 * torch.randn_like(changed[target == PAD])
    assert torch.equal(ours(changed, target, 1.0)[0], loss)
    rows, tokens = core.unlikelihood_candidates(target, PAD)
    assert not bool((tokens == PAD).any())
    assert not bool((target.reshape(-1)[rows] == PAD).any())


def test_agg_gate_applies_to_the_whole_objective():
    """Gated UL equals the three-logit formulation with the UL objective on each logit set."""
    torch.manual_seed(0)
    bsz, length, d, vocab = 3, 8, 6, 12
    _, target = random_batch(7, bsz, length, vocab)
    h = torch.randn(bsz * length, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, d, dtype=torch.float64, requires_grad=True)
    avg = torch.tensor([0.0] * 4 + [0.05, 0.3, 0.02, 2.0, 3.0, 0.0, 0.01, 0.6], dtype=torch.float64)
    gates = core.compute_gates(avg, alpha=0.5, nspecial=4)
    assert gates.rare[target.reshape(-1)].any() and (~gates.rare[target.reshape(-1)]).any()

    logits = core.gated_linear(h, w, target.reshape(-1), gates)
    lprobs = F.log_softmax(logits, dim=-1)
    mle, _ = core.label_smoothed_nll_loss(lprobs, target.reshape(-1), 0.0, PAD)
    loss = mle + core.unlikelihood_loss(lprobs, *core.unlikelihood_candidates(target, PAD))
    gh, gw = torch.autograd.grad(loss, (h, w))

    flat = target.reshape(-1)
    gate1 = torch.where(gates.rare, gates.g1.double(), torch.ones(vocab, dtype=torch.float64)).expand(flat.numel(), -1).clone()
    gate2 = gates.g2.double().expand(flat.numel(), -1).clone()
    gate1.scatter_(1, flat.unsqueeze(1), 1.0)
    gate2.scatter_(1, flat.unsqueeze(1), 1.0)
    z0 = h @ w.detach().t()
    z1 = gate1 * (h.detach() @ w.t()) + (1 - gate1) * (h.detach() @ w.detach().t())
    z2 = gate2 * (h.detach() @ w.t()) + (1 - gate2) * (h.detach() @ w.detach().t())
    rare_row = gates.rare[flat].double()

    def rows_of(z):
        return reference_objective(z.reshape(bsz, length, vocab), target, 1.0, PAD)[0]

    ref = rows_of(z0).sum() + (rows_of(z1) * (1 - rare_row)).sum() + (rows_of(z2) * rare_row).sum()
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert torch.allclose(gh, rh, atol=1e-10, rtol=0)
    assert torch.allclose(gw, rw, atol=1e-10, rtol=0)
    # And the gating did something: the ungated W gradient differs.
    ungated = torch.autograd.grad(rows_of(h.detach() @ w.t()).sum(), w)[0]
    assert not torch.allclose(gw, ungated)


# -- through fairseq ----------------------------------------------------------------------

import pytest  # noqa: E402

from _fairseq import binarize_lm, build, fairseq_train, train_args  # noqa: E402


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    return binarize_lm(tmp_path_factory.mktemp("ul"), "lm", 300)


def _sample_and_counter(task, model):
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.dataset("train"), max_tokens=256).next_epoch_itr(shuffle=False)
    batches = [next(itr) for _ in range(3)]
    for batch in batches[:2]:  # two completed updates: some tokens rare, some not
        task.agg_counter.add(batch["target"], task.target_dictionary.pad())
        task.agg_counter.commit()
    return batches[2]


def _loss_and_grads(criterion, model, sample):
    model.zero_grad()
    loss, _, log = criterion(model, sample)
    loss.backward()
    return loss.detach(), log, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_alpha_zero_equals_agg_cross_entropy_exactly(lm_data):
    task, model, agg_ul = build(train_args(lm_data, "--agg-alpha", "0.5", "--dropout", "0")
                                + ["--criterion", "agg_unlikelihood", "--unlikelihood-alpha", "0"])
    model.double()
    sample = _sample_and_counter(task, model)
    _, _, agg_ce = build(train_args(lm_data, "--agg-alpha", "0.5"))
    agg_ce.counter = agg_ul.counter  # the same counter state
    assert 0 < agg_ce.current_gates().num_rare < len(task.target_dictionary) - 4
    agg_ul.train(), agg_ce.train(), model.train()
    loss_ul, log_ul, grads_ul = _loss_and_grads(agg_ul, model, sample)
    loss_ce, log_ce, grads_ce = _loss_and_grads(agg_ce, model, sample)
    assert torch.equal(loss_ul, loss_ce)
    assert torch.equal(log_ul["nll_loss"], log_ce["nll_loss"])
    assert float(log_ul["ul_loss"]) == 0.0
    assert grads_ul.keys() == grads_ce.keys() and len(grads_ul) > 0
    for name in grads_ul:
        assert torch.equal(grads_ul[name], grads_ce[name]), name


def test_agg_unlikelihood_gates_only_the_output_embedding(lm_data):
    """Against the UL baseline on the same model: same loss, same feature-path gradients,
    a different (gated) output-embedding gradient."""
    task, model, agg_ul = build(train_args(lm_data, "--agg-alpha", "0.5", "--dropout", "0")
                                + ["--criterion", "agg_unlikelihood", "--no-token-positional-embeddings"])
    model.double()
    sample = _sample_and_counter(task, model)
    _, _, baseline = build(train_args(lm_data) + ["--criterion", "unlikelihood_cross_entropy"])
    agg_ul.train(), baseline.train(), model.train()
    loss_agg, log_agg, grads_agg = _loss_and_grads(agg_ul, model, sample)
    loss_ul, log_ul, grads_ul = _loss_and_grads(baseline, model, sample)
    assert float(log_agg["ul_loss"]) > 0
    assert torch.allclose(loss_agg, loss_ul, rtol=1e-12, atol=0)
    tied = "decoder.embed_tokens.weight"
    for name in grads_agg:
        if name != tied:
            assert torch.allclose(grads_agg[name], grads_ul[name], rtol=1e-9, atol=1e-12), name
    assert not torch.allclose(grads_agg[tied], grads_ul[tied], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("criterion", ["agg_unlikelihood", "unlikelihood_cross_entropy"])
def test_fairseq_train_runs_end_to_end(lm_data, tmp_path, criterion):
    args = train_args(lm_data, "--max-update", "3", "--log-format", "simple", "--log-interval", "1",
                      save_dir=tmp_path) + ["--criterion", criterion]
    result = fairseq_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "ul_loss=" in log and "num_updates=3" in log
    assert ("agg_rare=" in log) == (criterion == "agg_unlikelihood")
    assert (tmp_path / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("criterion_args", [
    ["--criterion", "agg_cross_entropy", "--label-smoothing", "0.1"],
    ["--criterion", "agg_unlikelihood"],
    ["--criterion", "unlikelihood_cross_entropy"],
], ids=["agg_cross_entropy", "agg_unlikelihood", "unlikelihood_cross_entropy"])
def test_chunked_output_layer_equals_the_single_logits_pass(lm_data, criterion_args):
    args = train_args(lm_data, "--agg-alpha", "0.5", "--dropout", "0") + criterion_args
    if criterion_args[1] == "unlikelihood_cross_entropy":
        args = [a for a in args if a not in ("--agg-alpha", "0.5")]
    task, model, whole = build(args + ["--loss-chunk-size", "0"])
    model.double()
    sample = _sample_and_counter(task, model)
    _, _, chunked = build(args + ["--loss-chunk-size", "7"])
    if hasattr(whole, "counter"):
        chunked.counter = whole.counter
        assert whole.current_gates().num_rare > 0
    whole.train(), chunked.train(), model.train()
    loss_a, log_a, grads_a = _loss_and_grads(whole, model, sample)
    loss_b, log_b, grads_b = _loss_and_grads(chunked, model, sample)
    assert torch.allclose(loss_a, loss_b, rtol=1e-12, atol=0)
    for key in ("nll_loss", "ul_loss"):
        if key in log_a:
            assert torch.allclose(log_a[key], log_b[key], rtol=1e-12, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-13), name
