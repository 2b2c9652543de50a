"""AGG's gated output layer on the device a run trains on, against the float64 oracle of the
paper's eq. 23 computed on the CPU.

The device comes from ``AGG_TEST_DEVICE`` (default ``cpu``); ``scripts/gpu-check.sh`` runs this
file with ``AGG_TEST_DEVICE=cuda``. Stated tolerances (relative Frobenius error of the loss, the
feature gradient and W's gradient): float32 1e-6, float16 1e-2, bfloat16 5e-2. Low precision is
what ``--fp16``/``--bf16`` feed the criterion: features and W in that dtype, log-softmax and
loss in float32.
"""

import os

import pytest
import torch

from fairseq_agg import core

DEVICE = torch.device(os.environ.get("AGG_TEST_DEVICE", "cpu"))
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PAD, NSPECIAL = 1, 4


def eq23_oracle(h, w, y, gates, eps):
    """Loss and gradients of label-smoothed cross-entropy with W's gradient gated, in float64:
    grad_W = (D * Gate)^T H with D = (P - Q) on non-padding rows, grad_H = D W (paper eq. 23)."""
    h, w = h.double(), w.double()
    logits = h @ w.t()
    lprobs = torch.log_softmax(logits, -1)
    keep = (y != PAD).double()
    nll = -lprobs.gather(1, y.unsqueeze(1)).squeeze(1)
    smooth = -lprobs.sum(-1)
    n = w.size(0)
    loss = (((1 - eps - eps / (n - 1)) * nll + eps / (n - 1) * smooth) * keep).sum()
    p = lprobs.exp()
    q = torch.full_like(p, eps / (n - 1))
    q.scatter_(1, y.unsqueeze(1), 1 - eps)
    d = (p - q) * keep.unsqueeze(1)
    rare, g1, g2 = gates.rare, gates.g1.double(), gates.g2.double()
    row_rare = rare[y].unsqueeze(1)
    gate = torch.where(row_rare, g2.expand_as(p), g1.expand_as(p)).clone()
    gate.scatter_(1, y.unsqueeze(1), 1.0)  # a row's own target is never gated
    return loss, d @ w, (d * gate).t() @ h


def problem(seed, rows=96, dim=32, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * 0.3
    avg = torch.rand(vocab, generator=gen, dtype=torch.float64) * 0.2
    gates = core.compute_gates(avg, alpha=0.08, nspecial=NSPECIAL)
    y = torch.randint(NSPECIAL, vocab, (rows,), generator=gen)
    y[::11] = PAD
    y[1::4] = torch.nonzero(gates.rare).squeeze(1)[: len(y[1::4])]  # rare-target rows present
    assert 0 < gates.num_rare < vocab - NSPECIAL
    return h, w, y, gates


def relative_error(got, want):
    return float((got.double().cpu() - want).norm() / want.norm())


@pytest.mark.parametrize("chunk_rows", [0, 40])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gated_loss_on_the_device_matches_the_float64_oracle(dtype, eps, chunk_rows):
    h64, w64, y, gates = problem(seed=int(eps * 10) + chunk_rows)
    want_loss, want_gh, want_gw = eq23_oracle(h64, w64, y, gates, eps)
    h = h64.to(DEVICE, dtype).requires_grad_()
    w = w64.to(DEVICE, dtype).requires_grad_()
    loss, _, _ = core.gated_loss(h, w, y.to(DEVICE).view(8, -1), gates.to(DEVICE), ignore_index=PAD,
                                 label_smoothing=eps, chunk_rows=chunk_rows)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    tol = TOLERANCE[dtype]
    assert abs(float(loss) - float(want_loss)) <= tol * abs(float(want_loss))
    assert relative_error(h.grad, want_gh) <= tol
    assert relative_error(w.grad, want_gw) <= tol
    rare = gates.rare
    assert relative_error(w.grad[rare.to(DEVICE)], want_gw[rare]) <= tol  # the gated rows on their own
    # The gating matters far beyond the tolerance: plain cross-entropy's rare rows are far off.
    ungated = core.Gates(torch.zeros_like(rare), torch.ones_like(gates.g1), torch.ones_like(gates.g2))
    _, _, plain_gw = eq23_oracle(h64, w64, y, ungated, eps)
    assert relative_error(plain_gw[rare], want_gw[rare]) > 2 * tol


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunked_matmuls_in_the_training_precision(monkeypatch, dtype, eps):
    """The chunked path as it runs on CUDA: matmuls in float16/bfloat16 (float16's gradient
    scaled by a power of two and unscaled in float32), sums in float32. Forced on the CPU here,
    where torch would otherwise pick float32 matmuls; same tolerances as above."""
    monkeypatch.setattr(core, "_matmul_dtype", lambda dtype, device: dtype)
    h64, w64, y, gates = problem(seed=11)
    want_loss, want_gh, want_gw = eq23_oracle(h64, w64, y, gates, eps)
    h = h64.to(dtype).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    loss, _, _ = core.gated_loss(h, w, y.view(8, -1), gates, ignore_index=PAD, label_smoothing=eps, chunk_rows=40)
    loss.backward()
    tol = TOLERANCE[dtype]
    assert abs(float(loss) - float(want_loss)) <= tol * abs(float(want_loss))
    assert relative_error(h.grad, want_gh) <= tol
    assert relative_error(w.grad, want_gw) <= tol
    assert relative_error(w.grad[gates.rare], want_gw[gates.rare]) <= tol


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_chunked_path_with_rows_in_their_own_order(monkeypatch, eps):
    """The chunked path as it runs on CUDA, where rows are not ordered by rare target (that would
    read a count from the device once per micro-batch): the gate is built per chunk instead."""
    monkeypatch.setattr(core, "_orders_rare_rows", lambda device: False)
    h64, w64, y, gates = problem(seed=5)
    want_loss, want_gh, want_gw = eq23_oracle(h64, w64, y, gates, eps)
    h, w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    loss, _, _ = core.gated_loss(h, w, y.view(8, -1), gates, ignore_index=PAD, label_smoothing=eps, chunk_rows=40)
    loss.backward()
    assert abs(float(loss) - float(want_loss)) <= 1e-12 * abs(float(want_loss))
    assert relative_error(h.grad, want_gh) <= 1e-12
    assert relative_error(w.grad, want_gw) <= 1e-12
