"""Low-precision inputs (what --fp16/--bf16 feed the criterion): the gate is applied in
float32 and the gradients keep the parameters' dtype."""

import pytest
import torch

from fairseq_agg import core


@pytest.mark.parametrize("chunk_rows", [0, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_gradients_in_low_precision_track_float64(dtype, chunk_rows):
    torch.manual_seed(0)
    rows, dim, vocab = 64, 16, 40
    h64 = torch.randn(rows, dim, dtype=torch.float64)
    w64 = torch.randn(vocab, dim, dtype=torch.float64) * 0.5
    target = torch.randint(4, vocab, (rows,))
    avg = torch.rand(vocab, dtype=torch.float64) * 0.2
    gates = core.compute_gates(avg, alpha=0.1, nspecial=4)
    assert 0 < gates.num_rare < vocab - 4

    def grads(h, w):
        h = h.clone().requires_grad_()
        w = w.clone().requires_grad_()
        loss, _, _ = core.gated_loss(h, w, target.view(4, -1), gates, ignore_index=1, label_smoothing=0.1,
                                     unlikelihood_alpha=0.5, chunk_rows=chunk_rows)
        loss.backward()
        return loss, h.grad, w.grad

    loss_ref, gh_ref, gw_ref = grads(h64, w64)
    loss, gh, gw = grads(h64.to(dtype), w64.to(dtype))
    assert loss.dtype == torch.float32  # log-softmax and loss in float32, as fairseq does
    assert gh.dtype == dtype and gw.dtype == dtype
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert torch.allclose(loss.double(), loss_ref, rtol=tol)
    for got, ref in ((gh, gh_ref), (gw, gw_ref)):
        err = (got.double() - ref).norm() / ref.norm()
        assert err < tol, float(err)
    # The gate did its work in low precision too: rare rows are damped relative to ungated.
    h = h64.to(dtype).requires_grad_()
    w = w64.to(dtype).requires_grad_()
    plain, _, _ = core.gated_loss(h, w, target.view(4, -1), None, ignore_index=1, label_smoothing=0.1,
                                  unlikelihood_alpha=0.5, chunk_rows=chunk_rows)
    plain.backward()
    assert not torch.allclose(w.grad.double(), gw.double())
