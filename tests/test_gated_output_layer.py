"""``GatedOutputLayer`` in one process, as docs/pytorch.md describes it: for plain cross-entropy
computed by the model from the layer's logits, training equals ``agg.loss()`` (float64, tied and
untied heads); evaluation and ``torch.no_grad()`` make it a plain ``nn.Linear`` that counts
nothing; a training forward without its targets, two forwards in one ``agg.targets`` block and a
head AGG cannot serve are refused in one line each."""

import pytest
import torch
import torch.nn.functional as F

from _agg_oracle import TinyLM, zipf_tokens
from fairseq_agg.errors import AggConfigError
from fairseq_agg.training import AdaptiveGradientGating, causal_targets

V, D, T = 40, 12, 9
ALPHA, WINDOW, UPDATES = 0.9, 3, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tied: bool, gated: bool):
    """UPDATES updates of one batch each; the model's own cross-entropy on the gated layer's
    logits, or agg.loss() on its hidden states."""
    model = TinyLM(V, D, T, tied).double()
    agg = AdaptiveGradientGating(V, alpha=ALPHA, window=WINDOW)
    if gated:
        model.head = agg.gated_output_layer(model.head)
        assert (model.head.weight is model.embed.weight) == tied  # the same Parameter
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for update in range(UPDATES):
        ids, labels = zipf_tokens(4, T, V, seed=update)
        if gated:
            with agg.targets(causal_targets(labels)):
                logits = model.head(model.features(ids))
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        else:
            loss = agg.loss(model.features(ids)[:, :-1], model.head.weight, labels[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        agg.step()
    return model, agg


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_gated_layer_trains_as_the_fused_loss(tied):
    fused_model, fused = _train(tied, gated=False)
    gated_model, gated = _train(tied, gated=True)
    assert 0 < gated.num_rare < V  # the gates matter
    for (name, p1), (_, p2) in zip(fused_model.named_parameters(), gated_model.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert torch.equal(fused.counter.window_sum, gated.counter.window_sum)


def _untied_gated_model():
    """A float64 TinyLM whose untied head is AGG's gated layer, with the hidden states and labels of one batch."""
    model = TinyLM(V, D, T, tied=False).double()
    agg = AdaptiveGradientGating(V, alpha=ALPHA)
    model.head = agg.gated_output_layer(model.head)
    ids, labels = zipf_tokens(2, T, V, seed=0)
    return model, agg, model.features(ids), labels


def test_in_evaluation_it_is_a_plain_linear_layer_that_counts_nothing():
    model, agg, hidden, _ = _untied_gated_model()
    with torch.no_grad():
        torch.testing.assert_close(model.head(hidden), hidden @ model.head.weight.t())
    model.head.eval()
    model.head(hidden)
    assert int(agg.counter.pending.sum()) == 0


def _one_line(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message and message.strip(), message
    for word in words:
        assert word in message, message


def test_misuse_is_refused_in_one_line():
    model, agg, hidden, labels = _untied_gated_model()
    with pytest.raises(AggConfigError) as excinfo:
        model.head(hidden)  # a training forward without targets
    _one_line(excinfo, "agg.targets(")
    with agg.targets(causal_targets(labels)):
        model.head(hidden)
        with pytest.raises(AggConfigError) as excinfo:
            model.head(hidden)
    _one_line(excinfo, "twice")
    with agg.targets(labels[:, 1:]):
        with pytest.raises(AggConfigError) as excinfo:
            model.head(hidden)
    _one_line(excinfo, "do not align", "causal_targets")
    with pytest.raises(AggConfigError) as excinfo:
        agg.gated_output_layer(torch.nn.Linear(D, V, bias=True))
    _one_line(excinfo, "bias")
    with pytest.raises(AggConfigError) as excinfo:
        agg.gated_output_layer(torch.nn.Linear(D, V + 1, bias=False))
    _one_line(excinfo, str(V + 1), f"vocab_size={V + 1}")
