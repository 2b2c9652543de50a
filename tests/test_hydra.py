"""``fairseq-hydra-train`` with the plug-in (issue 12): the shipped config groups
(``fairseq_agg/config``, passed with ``--config-dir``) compose, train and stay current."""

import subprocess
import sys

import pytest

from fairseq_agg.fairseq_fixes import saved_counter_state
from fairseq_agg.hydra_config import CONFIG_DIR, GROUPS, config_yaml

from conftest import USER_DIR, parse_records, subprocess_env


@pytest.mark.parametrize("group,name", [(g, n) for g, names in GROUPS.items() for n in names])
def test_shipped_config_groups_are_current(group, name):
    shipped = (CONFIG_DIR / group / f"{name}.yaml").read_text(encoding="utf-8")
    assert shipped == config_yaml(group, name), "run `python -m fairseq_agg.hydra_config`"


def test_fairseq_hydra_train_trains_with_agg_cross_entropy(lm_data, tmp_path):
    import torch

    save_dir = tmp_path / "checkpoints"
    result = subprocess.run(
        [
            sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(CONFIG_DIR),
            "task=language_modeling_agg", f"task.data={lm_data}", "task.tokens_per_sample=32",
            "criterion=agg_cross_entropy", "criterion.agg_alpha=0.5",
            "model=transformer_lm", "model.decoder_layers=1", "model.decoder_embed_dim=16",
            "model.decoder_output_dim=16", "model.decoder_input_dim=16", "model.decoder_ffn_embed_dim=32",
            "model.decoder_attention_heads=2", "model.share_decoder_input_output_embed=true",
            "optimizer=adam", "optimization.lr=[0.001]", "lr_scheduler=fixed",
            f"common.user_dir={USER_DIR}", "common.cpu=true", "common.log_format=json", "common.log_interval=1",
            "dataset.max_tokens=256", "dataset.num_workers=0", "dataset.disable_validation=true",
            "optimization.max_update=3", f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = (tmp_path / "hydra" / "hydra_train.log").read_text()
    records = [r for r in parse_records(log.replace("][train_inner][INFO] - ", " | train_inner | "))["train_inner"]]
    assert [int(r["num_updates"]) for r in records] == [1, 2, 3], log[-3000:]
    assert all(0 < float(r["agg_rare"]) for r in records)
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["criterion"]["agg_alpha"] == 0.5 and state["cfg"]["criterion"]["_name"] == "agg_cross_entropy"
    assert saved_counter_state(state)["num_updates"] == 3
