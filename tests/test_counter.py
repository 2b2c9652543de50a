"""DESIGN.md section 2, line by line: the token counter, the rare group and the gates.

The first part drives ``core.TokenCounter`` and ``core.compute_gates`` directly (no fairseq).
The second part drives the ``language_modeling_agg`` task by hand, the way fairseq's trainer
does (``train_step`` per micro-batch, ``optimizer_step`` per update, gradients cleared when an
update begins or is thrown away), with a stand-in optimizer.
"""

import io
from pathlib import Path

import pytest
import torch

from fairseq_agg import core

NSPECIAL = 4  # bos, pad, eos, unk
PAD = 1

pytestmark = pytest.mark.usefixtures("one_thread")


def counter_with(updates, vocab=12, window=None):
    """A counter fed one completed update per entry (lists of token ids)."""
    counter = core.TokenCounter(vocab, NSPECIAL, window=window)
    for tokens in updates:
        counter.add(torch.tensor(tokens, dtype=torch.long), PAD)
        counter.commit()
    return counter


def as_list(t):
    return [round(float(x), 12) for x in t]


# ------------------------------------------------------------------------------------------
# 2.2 window arithmetic: a_k = S_k / min(u, K); a = 0 before the first completed update
# ------------------------------------------------------------------------------------------
def test_average_is_window_sum_over_min_of_updates_and_window():
    counter = core.TokenCounter(8, NSPECIAL, window=3)
    updates = [[4, 4, 5], [5, 6], [4, 7, 7, 7], [6], [5, 5]]
    expected = [
        # after u completed updates (K = 3): S over the last min(u, 3) updates / min(u, 3)
        {4: 2 / 1, 5: 1 / 1},
        {4: 2 / 2, 5: 2 / 2, 6: 1 / 2},
        {4: 3 / 3, 5: 2 / 3, 6: 1 / 3, 7: 3 / 3},
        {4: 1 / 3, 5: 1 / 3, 6: 2 / 3, 7: 3 / 3},  # update 1 dropped out
        {4: 1 / 3, 5: 2 / 3, 6: 1 / 3, 7: 3 / 3},  # update 2 dropped out
    ]
    for u, (tokens, want) in enumerate(zip(updates, expected), start=1):
        counter.add(torch.tensor(tokens), PAD)
        counter.commit()
        assert counter.num_updates == u
        assert counter.updates_in_window() == min(u, 3)
        want_vec = [want.get(k, 0.0) for k in range(8)]
        assert counter.average().dtype == torch.float64
        assert as_list(counter.average()) == as_list(torch.tensor(want_vec, dtype=torch.float64))


def test_no_completed_update_means_zero_average():
    counter = core.TokenCounter(10, NSPECIAL, window=5)
    assert torch.equal(counter.average(), torch.zeros(10, dtype=torch.float64))
    # pending counts of an update in progress are not part of the window
    counter.add(torch.tensor([4, 5, 5, 9]), PAD)
    assert torch.equal(counter.average(), torch.zeros(10, dtype=torch.float64))
    gates = core.compute_gates(counter.average(), 0.5, NSPECIAL)
    assert gates.rare.tolist() == [False] * NSPECIAL + [True] * 6
    assert gates.g1[NSPECIAL:].eq(0).all() and gates.g2[NSPECIAL:].eq(0).all()
    counter.commit()
    assert counter.average()[5] == 2.0 and counter.average()[9] == 1.0


def test_pending_counts_do_not_move_the_gates_until_commit():
    counter = counter_with([[4, 5, 6, 7]], vocab=8, window=4)
    before = counter.average().clone()
    counter.add(torch.tensor([4, 4, 4, 4]), PAD)
    assert torch.equal(counter.average(), before)
    counter.commit()
    assert counter.average()[4] == (1 + 4) / 2


def test_slots_older_than_the_window_drop_out_completely():
    counter = counter_with([[9, 9, 9], [4], [5], [6]], vocab=10, window=3)
    assert counter.average()[9] == 0.0
    assert counter.window_sum[9] == 0
    assert counter.updates_in_window() == 3
    assert as_list(counter.average()[4:7]) == as_list(torch.tensor([1 / 3] * 3, dtype=torch.float64))
    # K = 1: only the last update
    counter = counter_with([[4, 4], [5]], vocab=10, window=1)
    assert counter.average()[4] == 0.0 and counter.average()[5] == 1.0


def test_set_window_trims_the_oldest_updates():
    counter = counter_with([[4], [5, 5], [6, 6, 6], [7], [8, 8]], vocab=10, window=None)
    # unbounded window: all 5 updates
    assert counter.updates_in_window() == 5
    assert as_list(counter.average()[4:9]) == as_list(torch.tensor([1, 2, 3, 1, 2], dtype=torch.float64) / 5)
    counter.set_window(2)
    assert counter.window == 2 and counter.updates_in_window() == 2
    assert as_list(counter.average()[4:9]) == as_list(torch.tensor([0, 0, 0, 1, 2], dtype=torch.float64) / 2)
    # a larger window later does not bring trimmed updates back
    counter.set_window(4)
    assert counter.updates_in_window() == 2
    counter.add(torch.tensor([4]), PAD)
    counter.commit()
    assert as_list(counter.average()[4:9]) == as_list(torch.tensor([1, 0, 0, 1, 2], dtype=torch.float64) / 3)
    with pytest.raises(ValueError):
        counter.set_window(0)
    with pytest.raises(ValueError):
        core.TokenCounter(10, NSPECIAL, window=0)


# ------------------------------------------------------------------------------------------
# 2.1 counting: target tokens only, padding excluded
# ------------------------------------------------------------------------------------------
def test_padding_is_not_counted():
    counter = core.TokenCounter(10, NSPECIAL, window=2)
    target = torch.tensor([[4, 5, 2, PAD, PAD], [6, 6, 2, PAD, PAD]])  # 2-D, as fairseq's target
    counter.add(target, padding_idx=PAD)
    assert counter.pending.tolist() == [0, 0, 2, 0, 1, 1, 2, 0, 0, 0]
    counter.commit()
    assert counter.average()[PAD] == 0
    assert counter.average()[2] == 2 and counter.average()[6] == 2
    # an all-padding micro-batch adds nothing
    counter.add(torch.full((3, 4), PAD), padding_idx=PAD)
    assert counter.pending.sum() == 0


def test_micro_batches_of_one_update_share_one_slot():
    counter = core.TokenCounter(10, NSPECIAL, window=2)
    counter.add(torch.tensor([4, 5]), PAD)
    counter.add(torch.tensor([5, 9]), PAD)
    counter.commit()
    assert counter.updates_in_window() == 1 and counter.num_updates == 1
    assert counter.average()[[4, 5, 9]].tolist() == [1.0, 2.0, 1.0]
    ids, counts = counter.slots[-1]
    assert ids.tolist() == [4, 5, 9] and counts.tolist() == [1, 2, 1]  # distinct ids, summed


def test_discard_pending_drops_the_update_in_progress():
    counter = counter_with([[4]], vocab=8, window=3)
    counter.add(torch.tensor([5, 5]), PAD)
    counter.discard_pending()
    counter.add(torch.tensor([6]), PAD)
    counter.commit()
    assert counter.average()[[4, 5, 6]].tolist() == [0.5, 0.0, 0.5]


def test_out_of_range_tokens_are_refused():
    counter = core.TokenCounter(8, NSPECIAL)
    with pytest.raises(ValueError):
        counter.add(torch.tensor([4, 8]), PAD)
    with pytest.raises(ValueError):
        counter.add(torch.tensor([-3]), PAD)
    with pytest.raises(ValueError):
        core.TokenCounter(NSPECIAL, NSPECIAL)  # no non-special token


# ------------------------------------------------------------------------------------------
# 2.3, 2.4 and the gates of eqs. 7 and 8
# ------------------------------------------------------------------------------------------
def test_special_symbols_are_never_rare():
    avg = torch.zeros(9, dtype=torch.float64)  # nothing seen: everything would be rare
    gates = core.compute_gates(avg, 0.03, NSPECIAL)
    assert gates.rare.tolist() == [False] * 4 + [True] * 5
    assert gates.g1[:4].tolist() == [1.0] * 4 and gates.g2[:4].tolist() == [1.0] * 4
    # another number of specials
    gates = core.compute_gates(avg, 0.03, 6)
    assert gates.rare.tolist() == [False] * 6 + [True] * 3


def test_rare_is_strictly_below_alpha_and_gates_follow_eqs_7_and_8():
    #       specials            rare: 0, .01, .02, .03       not rare: = alpha, above
    avg = torch.tensor([0, 0, 0, 0, 0.0, 0.01, 0.02, 0.03, 0.04, 0.2], dtype=torch.float64)
    gates = core.compute_gates(avg, 0.04, NSPECIAL)
    assert gates.rare.tolist() == [False] * 4 + [True] * 4 + [False, False]
    assert gates.num_rare == 4 and not gates.is_identity()
    mean = (0.0 + 0.01 + 0.02 + 0.03) / 4  # 0.015, over the rare tokens only
    want_g1 = [1, 1, 1, 1, 0.0, 0.01, 0.02, 0.03, 1, 1]  # g1_k = a_k
    want_g2 = [1, 1, 1, 1, 0.0, 0.01 / mean, 1.0, 1.0, 1, 1]  # min(a_k / mean, 1)
    # float64 gates, so that a float64 run is gated in float64 (exact here)
    assert torch.equal(gates.g1, torch.tensor(want_g1, dtype=torch.float64))
    assert torch.equal(gates.g2, torch.tensor(want_g2, dtype=torch.float64))
    assert gates.g1.shape == gates.g2.shape == gates.rare.shape == (10,)


def test_ablation_switches_keep_the_other_gate():
    avg = torch.tensor([0, 0, 0, 0, 0.0, 0.01, 0.03, 0.5], dtype=torch.float64)
    full = core.compute_gates(avg, 0.04, NSPECIAL)
    no_g1 = core.compute_gates(avg, 0.04, NSPECIAL, use_g1=False)
    no_g2 = core.compute_gates(avg, 0.04, NSPECIAL, use_g2=False)
    assert torch.equal(no_g1.rare, full.rare) and torch.equal(no_g2.rare, full.rare)
    assert no_g1.g1.eq(1).all() and torch.equal(no_g1.g2, full.g2)
    assert no_g2.g2.eq(1).all() and torch.equal(no_g2.g1, full.g1)
    assert not full.g1.eq(1).all() and not full.g2.eq(1).all()


def test_empty_rare_set_gates_nothing():
    avg = torch.tensor([0, 0, 0, 0, 0.5, 0.7, 3.0], dtype=torch.float64)
    gates = core.compute_gates(avg, 0.5, NSPECIAL)  # 0.5 is not < 0.5
    assert gates.num_rare == 0 and gates.is_identity()
    assert gates.g1.eq(1).all() and gates.g2.eq(1).all()
    # and the gated projection is then the ordinary one, gradients included
    torch.manual_seed(0)
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 7, dtype=torch.float64)
    (core.gated_linear(h, w, torch.tensor([4, 5, 6, 4, 2]), gates) * r).sum().backward()
    assert torch.allclose(w.grad, r.t() @ h.detach(), rtol=0, atol=1e-12)


def test_mean_rare_average_zero_gives_g2_zero():
    avg = torch.tensor([0, 0, 0, 0, 0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    gates = core.compute_gates(avg, 0.1, NSPECIAL)
    assert gates.rare.tolist() == [False] * 4 + [True] * 3 + [False]
    assert not torch.isnan(gates.g2).any()
    assert gates.g2[4:7].eq(0).all() and gates.g2[[0, 1, 2, 3, 7]].eq(1).all()
    assert gates.g1[4:7].eq(0).all()


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_alpha_outside_zero_one_is_refused(alpha):
    with pytest.raises(ValueError):
        core.compute_gates(torch.zeros(6, dtype=torch.float64), alpha, NSPECIAL)


@pytest.mark.parametrize("alpha", [1e-6, 0.03, 1.0])
def test_alpha_inside_zero_one_is_accepted(alpha):
    gates = core.compute_gates(torch.zeros(6, dtype=torch.float64), alpha, NSPECIAL)
    assert gates.num_rare == 2


# ------------------------------------------------------------------------------------------
# ablation: the rare group frozen after a number of updates (Table 9)
# ------------------------------------------------------------------------------------------
def test_freeze_after_stops_the_window_changing():
    counter = core.TokenCounter(10, NSPECIAL, window=2)
    counter.freeze_after = 2  # as AggTaskMixin.configure_agg sets it from --agg-static-after
    for tokens in ([4, 5], [5, 6]):
        counter.add(torch.tensor(tokens), PAD)
        counter.commit()
    frozen = counter.average().clone()
    assert frozen[[4, 5, 6]].tolist() == [0.5, 1.0, 0.5]
    for tokens in ([7, 7, 7], [8], [9, 9]):
        counter.add(torch.tensor(tokens), PAD)
        counter.commit()
        assert torch.equal(counter.average(), frozen)
    assert counter.num_updates == 5  # the update clock still runs
    # and the frozen state survives a checkpoint
    restored = core.TokenCounter(10, NSPECIAL)
    restored.load_state_dict(counter.state_dict())
    restored.add(torch.tensor([7]), PAD)
    restored.commit()
    assert torch.equal(restored.average(), frozen)

    # the control: without freezing the same updates do move the window
    control = counter_with([[4, 5], [5, 6], [7, 7, 7], [8], [9, 9]], vocab=10, window=2)
    assert not torch.equal(control.average(), frozen)


# ------------------------------------------------------------------------------------------
# 2.8 checkpointing and 2.10 memory
# ------------------------------------------------------------------------------------------
def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_state_dict_round_trip_restores_the_same_counter():
    updates = [[4, 5, 5], [6, 7], [4, 4, 9], [8], [5, 6, 7]]
    counter = counter_with(updates, vocab=10, window=3)
    state = _roundtrip(counter.state_dict())
    restored = core.TokenCounter(10, NSPECIAL)  # window None: taken from the checkpoint
    restored.load_state_dict(state)
    assert restored.window == 3 and restored.num_updates == 5
    assert restored.updates_in_window() == 3
    assert torch.equal(restored.average(), counter.average())
    assert torch.equal(restored.window_sum, counter.window_sum)
    assert [(i.tolist(), c.tolist()) for i, c in restored.slots] == [
        (i.tolist(), c.tolist()) for i, c in counter.slots
    ]
    # and both go on identically, oldest slots dropping out in the same order
    for tokens in ([9, 9], [4], [7, 7, 7], [5]):
        for c in (counter, restored):
            c.add(torch.tensor(tokens), PAD)
            c.commit()
        assert torch.equal(restored.average(), counter.average())
    sd_a, sd_b = counter.state_dict(), restored.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        a, b = sd_a[key], sd_b[key]
        assert (torch.equal(a, b) if torch.is_tensor(a) else a == b), key


def test_empty_counter_round_trip():
    counter = core.TokenCounter(10, NSPECIAL, window=4)
    restored = core.TokenCounter(10, NSPECIAL)
    restored.load_state_dict(_roundtrip(counter.state_dict()))
    assert restored.num_updates == 0 and restored.updates_in_window() == 0
    assert torch.equal(restored.average(), torch.zeros(10, dtype=torch.float64))


def test_checkpoint_of_another_vocabulary_is_refused_clearly():
    state = counter_with([[4, 5]], vocab=10, window=2).state_dict()
    other = core.TokenCounter(16, NSPECIAL)
    with pytest.raises(ValueError, match=r"(?s)vocabulary.*10.*16"):
        other.load_state_dict(state)
    # the refused load left the counter untouched
    assert other.num_updates == 0 and other.window_sum.sum() == 0


def test_window_memory_grows_with_distinct_tokens_not_window_times_vocabulary():
    vocab, window, updates, distinct = 200_000, 100, 150, 20
    counter = core.TokenCounter(vocab, NSPECIAL, window=window)
    gen = torch.Generator().manual_seed(0)
    for _ in range(updates):
        ids = torch.randperm(vocab - NSPECIAL, generator=gen)[:distinct] + NSPECIAL
        counter.add(ids.repeat(3), PAD)  # 3 occurrences each, 20 distinct tokens
        counter.commit()
    assert counter.updates_in_window() == window
    state = counter.state_dict()
    stored = sum(v.numel() for v in state.values() if torch.is_tensor(v))
    assert state["slot_ids"].numel() == state["slot_counts"].numel() == window * distinct
    assert stored <= 2 * window * distinct + window  # ids, counts, one length per slot
    assert stored < vocab  # far from window x vocab (2e7)
    # in memory: two dense vectors (window sum, pending) plus the sparse slots
    in_memory = sum(v.numel() for v in vars(counter).values() if torch.is_tensor(v))
    in_memory += sum(i.numel() + c.numel() for i, c in counter.slots)
    assert in_memory <= 2 * vocab + 2 * window * distinct
    assert torch.equal(counter.average() * window, counter.window_sum.double())


# ------------------------------------------------------------------------------------------
# the fairseq task driven by hand
# ------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]



class FakeOptimizer:
    """What AggTaskMixin.train_step / optimizer_step use of a fairseq optimizer."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = 0

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1  # parameters are left as they are: runs stay comparable

    def zero_grad(self):
        for p in self.params:
            p.grad = None


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    pytest.importorskip("fairseq")
    from fairseq import options
    from fairseq_cli import preprocess

    root = tmp_path_factory.mktemp("agg_counter_data")
    with open(REPO / "data/wikitext-2/wiki.train.tokens", encoding="utf-8") as f:
        lines = [next(f) for _ in range(150)]
    (root / "train.txt").write_text("".join(lines), encoding="utf-8")
    args = options.get_preprocessing_parser().parse_args(
        ["--only-source", "--trainpref", str(root / "train.txt"), "--destdir", str(root / "bin"),
         "--nwordssrc", "400", "--workers", "1"]
    )
    preprocess.main(args)
    return str(root / "bin")


@pytest.fixture(scope="module")
def lm_cfg(lm_data):
    from fairseq import options, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cache = {}

    def get(*extra):
        if extra not in cache:
            argv = [
                lm_data, "--user-dir", str(REPO / "fairseq_agg"), "--task", "language_modeling_agg",
                "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16",
                "--decoder-input-dim", "16", "--decoder-output-dim", "16",
                "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
                "--share-decoder-input-output-embed", "--dropout", "0", "--attention-dropout", "0",
                "--tokens-per-sample", "32", "--max-tokens", "128", "--cpu", "--seed", "1",
                "--optimizer", "adam", "--lr", "1e-3", "--criterion", "agg_cross_entropy",
                "--agg-alpha", "1.0", *extra,
            ]
            args = options.parse_args_and_arch(options.get_training_parser(), argv)
            cfg = convert_namespace_to_omegaconf(args)
            utils.import_user_module(cfg.common)
            cache[extra] = cfg
        return cache[extra]

    return get


class Run:
    """language_modeling_agg, a float64 model and its criterion, stepped by hand."""

    def __init__(self, cfg):
        from fairseq import tasks, utils

        self.cfg = cfg
        self.task = tasks.setup_task(cfg.task)
        self.task.load_dataset("train")
        torch.manual_seed(0)
        self.model = self.task.build_model(cfg.model).double()
        self.criterion = self.task.build_criterion(cfg.criterion)
        self.optimizer = FakeOptimizer(self.model)
        self.pad = self.task.target_dictionary.pad()
        self.itr = self.task.get_batch_iterator(
            self.task.dataset("train"),
            max_tokens=cfg.dataset.max_tokens,
            max_positions=utils.resolve_max_positions(self.task.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=True,
            seed=1,
        )
        self.batches = list(self.itr.next_epoch_itr(shuffle=False))
        self.num_updates = 0

    @property
    def counter(self):
        return self.task.agg_counter

    def merged(self, *batches):
        """One batch holding the examples of ``batches``, through the dataset's collater."""
        dataset = self.task.dataset("train")
        ids = torch.cat([b["id"] for b in batches]).tolist()
        return dataset.collater([dataset[i] for i in ids])

    def train_step(self, sample, ignore_grad=False):
        return self.task.train_step(sample, self.model, self.criterion, self.optimizer,
                                    self.num_updates, ignore_grad=ignore_grad)

    def update(self, *samples):
        """One update as fairseq's trainer runs it: clear grads, micro-batches, step."""
        self.optimizer.zero_grad()
        for sample in samples:
            self.train_step(sample)
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.task.optimizer_step(self.optimizer, self.model, self.num_updates)
        self.num_updates += 1
        return grads


def _counts(vocab, *targets, pad):
    total = torch.zeros(vocab, dtype=torch.int64)
    for t in targets:
        t = t.reshape(-1)
        total += torch.bincount(t[t != pad], minlength=vocab)
    return total


def _slot_dense(counter, index=-1):
    ids, counts = counter.slots[index]
    dense = torch.zeros(counter.vocab_size, dtype=torch.int64)
    dense[ids] = counts
    return dense


def _assert_same_gates(a, b):
    assert torch.equal(a.rare, b.rare) and torch.equal(a.g1, b.g1) and torch.equal(a.g2, b.g2)


def test_update_freq_2_equals_one_batch_with_the_same_examples(lm_cfg):
    split = Run(lm_cfg("--update-freq", "2", "--agg-window", "2"))
    whole = Run(lm_cfg("--agg-window", "2"))
    assert len(split.batches) >= 8
    N = split.counter.vocab_size
    for u in range(4):
        a, b = split.batches[2 * u], split.batches[2 * u + 1]
        gates_before = split.criterion.current_gates()
        _assert_same_gates(gates_before, whole.criterion.current_gates())
        g_split = split.update(a, b)
        g_whole = whole.update(whole.merged(a, b))
        # the same gates were used by both micro-batches and by the whole batch
        for name in g_whole:
            assert torch.allclose(g_split[name], g_whole[name], rtol=0, atol=1e-9), (u, name)
        # one slot per update with the counts of both micro-batches
        assert split.counter.num_updates == whole.counter.num_updates == u + 1
        want = _counts(N, a["target"], b["target"], pad=split.pad)
        assert torch.equal(_slot_dense(split.counter), want)
        assert torch.equal(_slot_dense(whole.counter), want)
        sd_split, sd_whole = split.counter.state_dict(), whole.counter.state_dict()
        for key in sd_split:
            x, y = sd_split[key], sd_whole[key]
            assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), key
        _assert_same_gates(split.criterion.current_gates(), whole.criterion.current_gates())
    # after 4 updates with K = 2 the gates are those of the last two updates
    last = _counts(N, *(split.batches[i]["target"] for i in range(4, 8)), pad=split.pad)
    assert torch.equal(split.counter.average(), last.double() / 2)
    # and the gates are informative: some but not all non-special tokens are rare
    assert 0 < split.criterion.current_gates().num_rare < N - split.counter.nspecial


def test_gates_do_not_change_inside_an_update(lm_cfg):
    run = Run(lm_cfg("--agg-window", "3"))
    run.update(run.batches[0])
    gates = run.criterion.current_gates()
    run.optimizer.zero_grad()
    run.train_step(run.batches[1])
    assert run.counter.pending.sum() > 0
    _assert_same_gates(run.criterion.current_gates(), gates)
    avg = core.compute_gates(run.counter.average(), 1.0, run.counter.nspecial)
    _assert_same_gates(avg, gates)


def test_dummy_batches_and_validation_are_not_counted(lm_cfg):
    run = Run(lm_cfg("--agg-window", "3"))
    run.update(run.batches[0])
    run.update(run.batches[1])
    state = run.counter.state_dict()
    gates = run.criterion.current_gates()

    def unchanged():
        now = run.counter.state_dict()
        return all(
            (torch.equal(now[k], state[k]) if torch.is_tensor(now[k]) else now[k] == state[k]) for k in state
        )

    N = run.counter.vocab_size
    b2, b3, b4, b5 = run.batches[2:6]
    # fairseq's dummy batch (ignore_grad=True) first in an update: nothing pending
    run.optimizer.zero_grad()
    run.train_step(b2, ignore_grad=True)
    assert run.counter.pending.sum() == 0 and unchanged()
    # a real micro-batch is counted, a dummy one after it is not
    run.train_step(b4)
    assert torch.equal(run.counter.pending, _counts(N, b4["target"], pad=run.pad))
    run.train_step(b5, ignore_grad=True)
    assert torch.equal(run.counter.pending, _counts(N, b4["target"], pad=run.pad))
    # validation neither adds to the pending update nor commits anything
    run.task.valid_step(b3, run.model, run.criterion)
    assert torch.equal(run.counter.pending, _counts(N, b4["target"], pad=run.pad))
    assert unchanged()
    _assert_same_gates(run.criterion.current_gates(), gates)
    run.task.optimizer_step(run.optimizer, run.model, 2)
    assert run.counter.num_updates == 3
    assert torch.equal(_slot_dense(run.counter), _counts(N, b4["target"], pad=run.pad))


def test_gradients_cleared_mid_update_discard_the_pending_counts(lm_cfg):
    """fp16 overflow / OOM: fairseq zeroes the gradients (p.grad = None) and the update's
    micro-batches so far are thrown away; only the retried update is counted."""
    run = Run(lm_cfg("--agg-window", "3"))
    N = run.counter.vocab_size
    b0, b1 = run.batches[0], run.batches[1]
    run.optimizer.zero_grad()
    run.train_step(b0)
    run.optimizer.zero_grad()  # overflow: fairseq's trainer calls optimizer.zero_grad()
    run.train_step(b1)
    run.task.optimizer_step(run.optimizer, run.model, 0)
    assert run.counter.num_updates == 1
    assert torch.equal(_slot_dense(run.counter), _counts(N, b1["target"], pad=run.pad))

    # the control: without the cleared gradients both micro-batches belong to the update
    run.optimizer.zero_grad()
    run.train_step(b0)
    run.train_step(b1)
    run.task.optimizer_step(run.optimizer, run.model, 1)
    assert torch.equal(_slot_dense(run.counter), _counts(N, b0["target"], b1["target"], pad=run.pad))


def test_default_window_is_one_epoch_of_updates(lm_cfg):
    import math

    run = Run(lm_cfg())
    n_batches = len(run.itr)
    assert run.counter.window == n_batches
    run2 = Run(lm_cfg("--update-freq", "2"))
    assert run2.counter.window == math.ceil(n_batches / 2)
    run3 = Run(lm_cfg("--agg-window", "5"))
    assert run3.counter.window == 5


def test_static_after_freezes_the_gates(lm_cfg):
    frozen = Run(lm_cfg("--agg-window", "2", "--agg-static-after", "2"))
    live = Run(lm_cfg("--agg-window", "2"))
    for u in range(2):
        for run in (frozen, live):
            run.update(run.batches[u])
    gates = frozen.criterion.current_gates()
    _assert_same_gates(gates, live.criterion.current_gates())
    changed = False
    for u in range(2, 5):
        for run in (frozen, live):
            run.update(run.batches[u])
        _assert_same_gates(frozen.criterion.current_gates(), gates)
        g = live.criterion.current_gates()
        changed |= not torch.equal(g.g1, gates.g1)
    assert changed  # the control run's gates did move
    assert frozen.counter.num_updates == 5


def test_counter_travels_in_the_checkpoint_not_in_the_model(lm_cfg):
    run = Run(lm_cfg("--agg-window", "3"))
    for u in range(4):
        run.update(run.batches[u])
    # Stock fairseq tools load the model state strictly: it holds weights only.
    assert not [key for key in run.model.state_dict() if "agg" in key]
    saved = _roundtrip(run.task.agg_checkpoint_state(run.criterion))
    assert saved["options"]["agg_window"] == 3 and saved["options"]["agg_alpha"] == run.criterion.cfg.agg_alpha

    resumed = Run(lm_cfg("--agg-window", "3"))
    resumed.task.restore_agg_checkpoint_state(saved, resumed.criterion)
    assert resumed.counter.num_updates == 4
    assert torch.equal(resumed.counter.average(), run.counter.average())
    _assert_same_gates(resumed.criterion.current_gates(), run.criterion.current_gates())
    # both go on identically
    for r in (run, resumed):
        r.num_updates = 4
        r.update(r.batches[4])
    assert torch.equal(resumed.counter.average(), run.counter.average())

    # a checkpoint without AGG state (plain fairseq) leaves an empty counter
    fresh = Run(lm_cfg("--agg-window", "3"))
    fresh.model.load_state_dict(run.model.state_dict())
    fresh.task.restore_agg_checkpoint_state(None, fresh.criterion)
    assert fresh.counter.num_updates == 0 and fresh.counter.updates_in_window() == 0


def test_counter_of_a_legacy_checkpoint_is_restored_on_resume_only(lm_cfg):
    """fairseq-agg 0.1 kept the counter in the model state (``agg_counter._extra_state``)."""
    run = Run(lm_cfg())
    for u in range(3):
        run.update(run.batches[u])
    legacy = _roundtrip({**run.model.state_dict(), "agg_counter._extra_state": run.counter.state_dict()})
    old = Run(lm_cfg())
    old.model.load_state_dict(legacy)  # strict, as fairseq loads it
    assert old.counter.num_updates == 0  # loading weights does not move the counter ...
    old.task.restore_agg_checkpoint_state(None, old.criterion)  # ... resuming does
    assert old.counter.num_updates == 3
    assert torch.equal(old.counter.average(), run.counter.average())


def test_model_copies_do_not_touch_the_counter_and_ema_works(lm_cfg):
    """fairseq's --store-ema deep-copies the model and loads state dicts into the copy."""
    import copy

    run = Run(lm_cfg())
    run.update(run.batches[0])
    earlier = _roundtrip({**run.model.state_dict(), "agg_counter._extra_state": run.counter.state_dict()})
    run.update(run.batches[1])
    twin = copy.deepcopy(run.model)
    twin.load_state_dict(earlier)
    assert run.counter.num_updates == 2  # the live counter is not rewound
    run.update(run.batches[2])
    assert run.counter.num_updates == 3


def test_freeze_study_reaches_the_decoder_through_data_parallel_wrappers(lm_cfg):
    from fairseq.distributed import ModuleProxyWrapper

    class DataParallel(torch.nn.Module):  # what legacy_ddp / c10d put between proxy and model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    class DecayingSGD(FakeOptimizer):  # moves every row, gradient or not
        def step(self):
            with torch.no_grad():
                for p in self.params:
                    p -= 0.1 * (p.grad if p.grad is not None else 0) + 0.01 * p

    run = Run(lm_cfg("--agg-study", "freeze"))
    run.optimizer = DecayingSGD(run.model)
    wrapped = ModuleProxyWrapper(DataParallel(run.model))
    rows = run.task._agg_frozen_rows
    before = run.model.decoder.embed_tokens.weight.detach().clone()
    run.optimizer.zero_grad()
    run.task.train_step(run.batches[0], wrapped, run.criterion, run.optimizer, 0)
    run.task.optimizer_step(run.optimizer, wrapped, 0)
    after = run.model.decoder.embed_tokens.weight.detach()
    assert rows.any() and torch.equal(after[rows], before[rows])
    assert not torch.equal(after[~rows], before[~rows])
