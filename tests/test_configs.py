"""Every configs/*.args file parses with fairseq's own parser into the paper's settings."""

from pathlib import Path

import pytest

from _fairseq import USER_DIR

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.args"))


def read_args(path):
    return [word for line in path.read_text().splitlines() if not line.startswith("#") for word in line.split()]


def parse(path):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, ["/nonexistent-data", "--user-dir", USER_DIR, *read_args(path)])


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"lm_mle.args", "lm_agg.args", "mt_base_agg.args", "mt_big_agg.args"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_to_the_paper_settings(path):
    args = parse(path)
    assert args.adam_betas == "(0.9,0.98)" and args.weight_decay == 0.01 and args.fp16
    if path.name.startswith("lm_"):
        # Table 12: 24 layers, d=1024, FFN 4096, 16 heads
        assert (args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim,
                args.decoder_attention_heads) == (24, 1024, 4096, 16)
        assert args.lr == [7e-4] and args.tokens_per_sample == 1024 and args.max_update == 50000
        assert args.max_tokens * args.update_freq[0] == 32768
    else:
        assert args.share_all_embeddings and args.label_smoothing == 0.1 and args.lr == [1e-3]
        assert args.max_tokens * args.update_freq[0] == 65536
        assert args.dropout == (0.3 if "big" in path.name else 0.1)
    if "agg" in path.name:
        assert args.criterion == "agg_cross_entropy"
        assert args.agg_alpha == (0.03 if path.name.startswith("lm_") else 0.08)
