"""The plain-PyTorch API ``fairseq_agg.training.AdaptiveGradientGating`` (issue 14, criteria 5 and 6).

On a hand-written tiny causal LM in float64 (tied and untied heads, with and without label
smoothing, with one logits tensor and chunked): every parameter's gradient over several updates
equals the paper's three-logit formulation with gates recomputed here from the completed
updates (``tests/_agg_oracle.py``); gradient accumulation equals one batch; evaluation,
``torch.no_grad()`` and ``agg.eval()`` never count; two gloo processes equal one process with
accumulation; bad input is refused with one line. Needs neither fairseq nor transformers.
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _agg_oracle import (
    IGNORE, TinyLM, assert_grads_match, named_grads, reference_gates, shifted_targets, three_logit_loss, zipf_tokens,
)
from fairseq_agg import training
from fairseq_agg.errors import AggConfigError
from fairseq_agg.training import AdaptiveGradientGating, AggUsageWarning

REPO = Path(__file__).resolve().parents[1]
V, D, T = 40, 12, 9
ALPHA = 0.9  # rare: fewer than 0.9 occurrences per update on average: a good mix here
WINDOW = 3
UPDATES = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _updates(micro_batches_per_update: int, batch: int, seed: int = 3):
    """UPDATES updates of `batch` sequences each, split into micro-batches."""
    ids, labels = zipf_tokens(UPDATES * batch, T, V, seed)
    per = batch // micro_batches_per_update
    updates = []
    for u in range(UPDATES):
        micro = []
        for m in range(micro_batches_per_update):
            start = u * batch + m * per
            micro.append((ids[start : start + per], labels[start : start + per]))
        updates.append(micro)
    return updates


def _train(model, agg, updates, record=None, between=None):
    """A nanoGPT-style loop: summed loss / labels of the update, Adam, agg.step()."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for u, micro in enumerate(updates):
        n = sum(int((y[:, 1:] != IGNORE).sum()) for _, y in micro)
        for x, y in micro:
            h = model.features(x)
            loss = agg.loss(h[:, :-1], model.head.weight, y[:, 1:], reduction="sum") / n
            loss.backward()
        if record is not None:
            record.append((named_grads(model), copy.deepcopy(model.state_dict())))
        opt.step()
        opt.zero_grad()
        agg.step()
        if between is not None:
            between(u)
    return model


@pytest.mark.parametrize("chunk", [0, 7], ids=["one-logits", "chunked"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["ce", "ls0.1"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gradients_equal_three_logit_formulation(tied, eps, chunk):
    updates = _updates(1, 4)
    model = TinyLM(V, D, T, tied)
    agg = AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW, label_smoothing=eps, chunk_size=chunk)
    record = []
    _train(model, agg, updates, record)

    history, gated_somewhere = [], False
    for u, (micro, (grads, params)) in enumerate(zip(updates, record)):
        rare, g1, g2 = reference_gates(history, V, ALPHA, WINDOW)
        oracle = TinyLM(V, D, T, tied)
        oracle.load_state_dict(params)
        n = sum(int((y[:, 1:] != IGNORE).sum()) for _, y in micro)
        for x, y in micro:
            h = oracle.features(x)[:, :-1].reshape(-1, D)
            (three_logit_loss(h, oracle.head.weight, y[:, 1:].reshape(-1), rare, g1, g2, eps) / n).backward()
        assert_grads_match(grads, named_grads(oracle), f"update {u + 1}")
        if 0 < int(rare.sum()) < V:
            # Not vacuous: the gate moves W's gradient far beyond the tolerance.
            plain = TinyLM(V, D, T, tied)
            plain.load_state_dict(params)
            for x, y in micro:
                logits = plain.features(x)[:, :-1] @ plain.head.weight.t()
                (F.cross_entropy(logits.reshape(-1, V), y[:, 1:].reshape(-1), label_smoothing=eps, reduction="sum") / n).backward()
            diff = (plain.head.weight.grad - oracle.head.weight.grad).abs().max()
            gated_somewhere |= bool(diff > 1e-4)
        history.append(shifted_targets([y for _, y in micro]))
    assert gated_somewhere
    assert agg.num_updates == UPDATES
    rare, _, _ = reference_gates(history, V, ALPHA, WINDOW)
    assert torch.equal(agg.gates().rare.cpu(), rare)


def test_accumulation_equals_one_batch_and_evaluation_changes_nothing():
    one = _train(TinyLM(V, D, T, tied=True), agg_one := AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW), _updates(1, 4))
    two = _train(TinyLM(V, D, T, tied=True), agg_two := AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW), _updates(2, 4))
    for (name, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert _same_counter(agg_one, agg_two)
    assert torch.equal(agg_one.gates().g1, agg_two.gates().g1) and torch.equal(agg_one.gates().g2, agg_two.gates().g2)

    # The same run with an evaluation after every update (no_grad, and eval() with grad on).
    ev_ids, ev_labels = zipf_tokens(4, T, V, seed=11)
    model = TinyLM(V, D, T, tied=True)
    agg_eval = AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW)

    def evaluate(_u):
        with torch.no_grad():
            agg_eval.loss(model.features(ev_ids)[:, :-1], model.head.weight, ev_labels[:, 1:])
        agg_eval.eval()
        agg_eval.loss(model.features(ev_ids)[:, :-1], model.head.weight, ev_labels[:, 1:])
        agg_eval.train()
        model.zero_grad()  # the eval-mode loss above built a graph; no gradient stays behind
        assert int(agg_eval.counter.pending.sum()) == 0

    _train(model, agg_eval, _updates(2, 4), between=evaluate)
    for (name, p1), (_, p2) in zip(two.named_parameters(), model.named_parameters()):
        assert torch.equal(p1, p2), name
    assert _same_counter(agg_two, agg_eval)


def _same_counter(a, b) -> bool:
    sa, sb = a.state_dict()["_extra_state"], b.state_dict()["_extra_state"]
    return all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa
    ) and set(sa) == set(sb)


def test_counting_and_gates_follow_completed_updates_only():
    agg = AdaptiveGradientGating(V, alpha=ALPHA)
    h = torch.randn(2, 5, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (2, 5))
    y[0, 0] = IGNORE
    before = agg.gates()
    agg.loss(h, w, y)
    assert int(agg.counter.pending.sum()) == 9  # the ignored label is not counted
    assert agg.gates() is before  # pending counts change no gate
    assert agg.num_rare == V  # no completed update yet: every token is rare
    with torch.no_grad():
        agg.loss(h, w, y)
    agg.eval()
    agg.loss(h, w, y)
    agg.train()
    assert int(agg.counter.pending.sum()) == 9
    agg.step()
    assert agg.num_updates == 1 and int(agg.counter.window_sum.sum()) == 9
    assert agg.gates() is not before
    agg.loss(h, w, torch.full_like(y, IGNORE))
    agg.step()  # an update whose labels are all ignored still counts as an update
    assert agg.num_updates == 2 and agg.counter.updates_in_window() == 2
    assert agg.window is None
    agg.set_window(1)
    assert agg.counter.updates_in_window() == 1


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_values_and_feature_gradients_are_plain_cross_entropy(eps):
    agg = AdaptiveGradientGating(V, alpha=ALPHA, label_smoothing=eps)
    agg.loss(torch.randn(1, V, D), torch.randn(V, D), torch.arange(V).view(1, -1))
    agg.step()  # one update that saw every token once: none is rare at alpha 0.9
    h = torch.randn(3, 6, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (3, 6))
    y[1, 2:] = IGNORE
    for reduction in ("mean", "sum"):
        got = agg.loss(h, w, y, reduction=reduction)
        want = F.cross_entropy((h @ w.t()).reshape(-1, V), y.reshape(-1), label_smoothing=eps, reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        g_got = torch.autograd.grad(got, (h, w))
        g_want = torch.autograd.grad(want, (h, w))
        for a, b in zip(g_got, g_want):  # no rare token: W's gradient is ungated too
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert agg.num_rare == 0
    # Only ignored labels: 0, not nan.
    empty = agg.loss(h, w, torch.full_like(y, IGNORE))
    assert float(empty) == 0.0


def test_state_dict_round_trip():
    agg = AdaptiveGradientGating(V, alpha=ALPHA, window=2)
    for seed in range(3):
        agg.loss(torch.randn(4, D), torch.randn(V, D), torch.randint(0, V, (4,), generator=torch.Generator().manual_seed(seed)))
        agg.step()
    other = AdaptiveGradientGating(V, alpha=ALPHA)
    other.load_state_dict(agg.state_dict())
    assert _same_counter(agg, other) and other.window == 2
    assert torch.equal(other.gates().g2, agg.gates().g2)
    bare = AdaptiveGradientGating(V, alpha=ALPHA)
    bare.load_state_dict(agg.counter.state_dict())  # a bare counter state works too
    assert _same_counter(agg, bare)


# -- misuse of step(), and the open update in the state ----------------------------------------
def _usage_warnings(call):
    """The AggUsageWarnings that ``call()`` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, AggUsageWarning)]


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, D, generator=gen), torch.randint(0, V, (2, 5), generator=gen)


def test_step_without_a_loss_call_warns_once():
    agg = AdaptiveGradientGating(V, alpha=ALPHA)
    w = torch.randn(V, D)
    h, y = _batch(0)

    def update(labels):
        agg.loss(h, w, labels)
        agg.step()

    assert _usage_warnings(lambda: update(y)) == []
    assert _usage_warnings(lambda: update(torch.full_like(y, IGNORE))) == []  # all labels ignored: not empty
    agg.discard_pending()
    messages = _usage_warnings(agg.step)  # nothing since the previous step(): an empty update
    assert len(messages) == 1 and "empty update" in messages[0] and "\n" not in messages[0]
    assert _usage_warnings(agg.step) == []  # once
    assert agg.num_updates == 4


def test_a_forgotten_step_warns_once_and_accumulation_never_does():
    model = TinyLM(V, D, T, tied=False)
    agg = AdaptiveGradientGating(V, alpha=ALPHA)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    micro = [zipf_tokens(2, T, V, seed) for seed in range(3)]

    def update(close=True):
        for x, y in micro:  # gradient accumulation: three loss() calls, one optimizer step
            agg.loss(model.features(x)[:, :-1], model.head.weight, y[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        if close:
            agg.step()

    assert _usage_warnings(lambda: [update() for _ in range(2)]) == []
    assert _usage_warnings(lambda: update(close=False)) == []
    messages = _usage_warnings(update)  # its first loss() follows an optimizer step without agg.step()
    assert len(messages) == 1 and "agg.step()" in messages[0] and "\n" not in messages[0]
    assert _usage_warnings(lambda: [update(close=False), update()]) == []  # once


def test_many_loss_calls_without_any_step_warn(monkeypatch):
    """A loop without a torch.optim optimizer: step() is missing when the first update has grown
    past LOSS_CALLS_BEFORE_A_FIRST_STEP loss() calls."""
    monkeypatch.setattr(training, "LOSS_CALLS_BEFORE_A_FIRST_STEP", 3)
    agg = AdaptiveGradientGating(V, alpha=ALPHA)
    w = torch.randn(V, D)
    h, y = _batch(0)
    assert _usage_warnings(lambda: [agg.loss(h, w, y) for _ in range(3)]) == []
    messages = _usage_warnings(lambda: agg.loss(h, w, y))
    assert len(messages) == 1 and "agg.step()" in messages[0]


def test_state_dict_holds_the_open_update():
    """A checkpoint taken mid-accumulation resumes exactly; older states still load."""
    agg = AdaptiveGradientGating(V, alpha=ALPHA, window=2)
    w = torch.randn(V, D)
    for seed in range(3):
        h, y = _batch(seed)
        agg.loss(h, w, y)
        agg.step()
    h, y = _batch(3)
    agg.loss(h, w, y)  # the open update: counts pending
    state = copy.deepcopy(agg.state_dict())

    resumed = AdaptiveGradientGating(V, alpha=ALPHA, window=2)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.counter.pending, agg.counter.pending) and int(agg.counter.pending.sum()) == 10
    for a in (agg, resumed):
        assert _usage_warnings(a.step) == []  # the update had its loss() call, before the checkpoint
    assert _same_counter(agg, resumed)

    # Another rank's open update is not taken (each rank restores only what it counted) ...
    other_rank = copy.deepcopy(state)
    other_rank["_extra_state"]["pending_rank"] = 1
    elsewhere = AdaptiveGradientGating(V, alpha=ALPHA, window=2)
    elsewhere.load_state_dict(other_rank)
    assert int(elsewhere.counter.pending.sum()) == 0 and elsewhere.num_updates == 3
    # ... and a state saved before the open update was kept loads as it did.
    old = {k: v for k, v in state["_extra_state"].items() if not k.startswith("pending")}
    older = AdaptiveGradientGating(V, alpha=ALPHA, window=2)
    older.load_state_dict({"_extra_state": old})
    assert int(older.counter.pending.sum()) == 0 and older.num_updates == 3


# -- dtypes and autocast -------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 7], ids=["one-logits", "chunked"])
def test_hidden_and_weight_of_different_dtypes_are_refused(chunk):
    agg = AdaptiveGradientGating(V, chunk_size=chunk)
    h, y = _batch(0)
    with pytest.raises(AggConfigError) as excinfo:
        agg.loss(h.float(), torch.randn(V, D), y)
    _one_line_error(excinfo, "torch.float32", "torch.float64", "hidden.to(weight.dtype)", "autocast")
    assert int(agg.counter.pending.sum()) == 0  # refused before anything was counted


@pytest.mark.parametrize("chunk", [0, 7], ids=["one-logits", "chunked"])
def test_under_autocast_both_operands_take_its_dtype(chunk):
    """As nn.Linear under torch.autocast: float32 weight with bfloat16 or float32 hidden states,
    values and gradients those of the operands rounded to bfloat16 (observed: 5e-3)."""
    agg = AdaptiveGradientGating(V, alpha=ALPHA, chunk_size=chunk)
    gen = torch.Generator().manual_seed(0)
    agg.loss(torch.randn(1, V // 2, D), torch.randn(V, D), torch.arange(V // 2).view(1, -1))
    agg.step()  # half of the tokens seen once: the other half is rare
    assert 0 < agg.num_rare < V
    w = torch.randn(V, D, generator=gen, dtype=torch.float32)
    h = torch.randn(3, 8, D, generator=gen, dtype=torch.float32)
    y = torch.randint(0, V, (3, 8), generator=gen)
    reference = copy.deepcopy(agg)
    h_ref = h.bfloat16().double().requires_grad_()
    w_ref = w.bfloat16().double().requires_grad_()
    want = reference.loss(h_ref, w_ref, y)
    want.backward()
    w_plain = w_ref.detach().clone().requires_grad_()
    F.cross_entropy((h_ref.detach() @ w_plain.t()).reshape(-1, V), y.reshape(-1)).backward()
    assert float((w_plain.grad - w_ref.grad).norm() / w_ref.grad.norm()) > 0.2  # the gate matters here
    for hidden_dtype in (torch.bfloat16, torch.float32):
        h_in = h.to(hidden_dtype).requires_grad_()
        w_in = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = agg.loss(h_in, w_in, y)
        got.backward()
        assert got.dtype == torch.float32 and w_in.grad.dtype == torch.float32 and h_in.grad.dtype == hidden_dtype
        assert abs(float(got) - float(want)) <= 1e-2 * float(want)
        for g, ref in ((h_in.grad, h_ref.grad), (w_in.grad, w_ref.grad)):
            assert float((g.double() - ref).norm() / ref.norm()) <= 2e-2


def _one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip(), message
    for word in words:
        assert word in message, message
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, AggConfigError)


@pytest.mark.parametrize("alpha", [0, 0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_alpha_refused(alpha):
    with pytest.raises(AggConfigError) as excinfo:
        AdaptiveGradientGating(V, alpha=alpha)
    _one_line_error(excinfo, "alpha", "(0, 1]")


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_bad_window_refused(window):
    with pytest.raises(AggConfigError) as excinfo:
        AdaptiveGradientGating(V, window=window)
    _one_line_error(excinfo, "window")
    agg = AdaptiveGradientGating(V)
    with pytest.raises(AggConfigError) as excinfo:
        agg.set_window(window)
    _one_line_error(excinfo, "window")


def test_counter_of_another_vocabulary_refused():
    state = AdaptiveGradientGating(V + 1).state_dict()
    with pytest.raises(AggConfigError) as excinfo:
        AdaptiveGradientGating(V).load_state_dict(state)
    _one_line_error(excinfo, str(V + 1), str(V), "vocabulary")


def test_bad_inputs_refused():
    agg = AdaptiveGradientGating(V)
    h, w = torch.randn(2, 3, D), torch.randn(V, D)
    cases = [
        (lambda: agg.loss(h, w, torch.zeros(2, 4, dtype=torch.long)), "align"),
        (lambda: agg.loss(h, torch.randn(V + 1, D), torch.zeros(2, 3, dtype=torch.long)), "vocab_size"),
        (lambda: agg.loss(h, w, torch.full((2, 3), V)), "outside the vocabulary"),
        (lambda: agg.loss(h, w, torch.zeros(2, 3, dtype=torch.long), reduction="none"), "reduction"),
        (lambda: AdaptiveGradientGating(V, ignore_index=0), "ignore_index"),
        (lambda: AdaptiveGradientGating(V, label_smoothing=1.0), "label_smoothing"),
        (lambda: AdaptiveGradientGating(V, chunk_size=-1), "chunk_size"),
        (lambda: AdaptiveGradientGating(V, static_after=0), "static_after"),
    ]
    for call, word in cases:
        with pytest.raises(AggConfigError) as excinfo:
            call()
        _one_line_error(excinfo, word)


def test_importable_without_fairseq_and_transformers():
    code = (
        "import sys\n"
        "sys.modules['fairseq'] = None; sys.modules['transformers'] = None; sys.modules['accelerate'] = None\n"
        "import torch\n"
        "from fairseq_agg.training import AdaptiveGradientGating\n"
        "agg = AdaptiveGradientGating(10, alpha=0.5)\n"
        "h = torch.randn(4, 3, requires_grad=True); w = torch.randn(10, 3, requires_grad=True)\n"
        "agg.loss(h, w, torch.tensor([1, 2, -100, 3])).backward(); agg.step()\n"
        "assert agg.num_updates == 1\n"
        "bad = [m for m in ('fairseq', 'transformers', 'accelerate') if sys.modules.get(m) is not None]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# -- data parallel: two gloo processes equal one process with accumulation 2 ----------------------
def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        updates = [[micro[rank]] for micro in _updates(2, 4)]
        model = TinyLM(V, D, T, tied=False)
        agg = AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        for (micro,) in updates:
            x, y = micro
            n = torch.tensor(float((y[:, 1:] != IGNORE).sum()))
            dist.all_reduce(n)
            (agg.loss(model.features(x)[:, :-1], model.head.weight, y[:, 1:], reduction="sum") / n).backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)  # summed: each rank's loss is already divided by the global count
            opt.step()
            opt.zero_grad()
            agg.step()
        if rank == 0:
            torch.save({"model": model.state_dict(), "agg": agg.state_dict()}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_with_accumulation(tmp_path):
    """Two gloo processes (fairseq and transformers blocked) against one with accumulation 2."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c",
             "import sys; sys.modules['fairseq'] = None; sys.modules['transformers'] = None\n"
             f"import test_training_api as t; t._ddp_worker({rank}, 2, {port}, {str(out)!r})"],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-6000:]
    got = torch.load(out, weights_only=True)
    model = _train(TinyLM(V, D, T, tied=False), agg := AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW), _updates(2, 4))
    for name, p in model.state_dict().items():
        torch.testing.assert_close(got["model"][name], p, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    other = AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW)
    other.load_state_dict(got["agg"])
    assert _same_counter(agg, other)
