"""Every configs/**/*.args file parses with fairseq's own parser into the paper's settings
(../DESIGN section 5: Table 12 and the authors' instructions)."""

from pathlib import Path

import pytest

from _fairseq import USER_DIR

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.args"))


def read_args(path):
    return [word for line in path.read_text().splitlines() if not line.startswith("#") for word in line.split()]


def parse(path):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, ["/nonexistent-data", "--user-dir", USER_DIR, *read_args(path)])


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"lm_mle.args", "lm_agg.args", "mt_base_agg.args", "mt_big_agg.args"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_to_the_paper_settings(path):
    args = parse(path)
    assert args.optimizer == "adam" and args.adam_betas == "(0.9,0.98)" and args.weight_decay == 0.01 and args.fp16
    assert args.lr_scheduler == "inverse_sqrt" and args.warmup_updates == 4000 and args.warmup_init_lr == 1e-7
    if path.parent.name == "study":
        # Table 12, empirical study: 6 layers, d=512, FFN 2048, 8 heads, 40k updates
        assert args.arch == "transformer_lm" and args.task == "language_modeling_agg"
        assert (args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim,
                args.decoder_attention_heads) == (6, 512, 2048, 8)
        assert args.max_update == 40000
    elif path.name.startswith("lm_"):
        # Table 12: 24 layers, d=1024, FFN 4096, 16 heads
        assert args.arch == "transformer_lm_gpt2_small" and args.task == "language_modeling_agg"
        assert (args.decoder_layers, args.decoder_embed_dim, args.decoder_ffn_embed_dim,
                args.decoder_attention_heads) == (24, 1024, 4096, 16)
        assert args.max_update == 50000
    else:
        assert args.arch == ("transformer_wmt_en_de_big" if "big" in path.name else "transformer_wmt_en_de")
        assert args.task == "translation_agg" and (args.source_lang, args.target_lang) == ("en", "de")
        assert args.share_all_embeddings and args.label_smoothing == 0.1 and args.lr == [1e-3]
        assert args.max_tokens * args.update_freq[0] == 65536 and args.max_update == 190000
        assert args.dropout == (0.3 if "big" in path.name else 0.1)
    if path.name.startswith("lm_"):
        assert args.share_decoder_input_output_embed and args.dropout == 0.1 and args.lr == [7e-4]
        assert args.tokens_per_sample == 1024 and args.max_tokens * args.update_freq[0] == 32768
    if "agg" in path.name:
        assert args.criterion == "agg_cross_entropy"
        assert args.agg_alpha == (0.03 if path.name.startswith("lm_") else 0.08)
    elif "_ul" in path.name:
        assert args.criterion == "unlikelihood_cross_entropy" and args.unlikelihood_alpha == 1.0
    else:
        assert args.criterion == ("cross_entropy" if path.name.startswith("lm_") else "label_smoothed_cross_entropy")
