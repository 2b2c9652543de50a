"""The third deviation of the original unlikelihood code (Welleck et al. 2020, their
``candidate_penalty_cross_entropy``), transcribed here from its description: the candidate
matrix of the original holds the padding index in every row (it fills the upper triangle and
the masked current target with ``padding_idx`` before scattering), so the padding token is a
negative candidate at every position and -log(1 - p_pad) is added there. Ours leaves it out;
on one unpadded sequence the two differ by exactly that sum."""

import torch
import torch.nn.functional as F

from fairseq_agg import core

PAD = 1


def original_candidates(target: torch.Tensor, pad: int, vocab: int) -> torch.Tensor:
    """The original's candidate mask for one flattened target sequence: row t marks the tokens
    of target[:t] other than target[t], and the padding index."""
    n = target.numel()
    mask = torch.zeros(n, vocab, dtype=torch.float64)
    for t in range(n):
        mask[t, pad] = 1.0
        for s in range(t):
            if int(target[s]) != int(target[t]):
                mask[t, int(target[s])] = 1.0
    return mask


def test_ours_leaves_out_the_padding_candidate_of_every_row():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(4, 9, (1, 12), generator=g)  # one sequence, no padding: deviations 1 and 2 do not apply
    logits = torch.randn(1, 12, 10, generator=g, dtype=torch.float64) * 2
    lprobs = F.log_softmax(logits.reshape(-1, 10), dim=-1)
    rows, tokens = core.unlikelihood_candidates(target, PAD)
    ours = core.unlikelihood_loss(lprobs, rows, tokens)
    one_minus = torch.clamp(1 - lprobs.exp(), min=1e-5)
    original = (-torch.log(one_minus) * original_candidates(target.reshape(-1), PAD, 10)).sum()
    pad_term = -torch.log(one_minus[:, PAD]).sum()
    assert pad_term > 0
    assert torch.allclose(original - ours, pad_term, atol=1e-12, rtol=0)
