"""The CPU-scale equal-perplexity study (fairseq_agg.study): its smoke form end to end, and
its verdict computed from the numbers."""

import json
import math

import numpy as np
import pytest

from fairseq_agg import study
from fairseq_agg.workdir import stamp_owner


def test_smoke_study_runs_end_to_end(tmp_path):
    result = study.run_study(["--smoke", "--workdir", str(tmp_path)])
    settings = result["settings"]
    assert len(result["runs"]) == (len(settings["alphas"]) + 1) * len(settings["seeds"])
    on_disk = json.loads((tmp_path / "study.json").read_text())
    text = (tmp_path / "study.md").read_text()
    for length in settings["lengths"]:
        mle = on_disk["stats"]["MLE"][str(length)]
        per_seed = [on_disk["runs"][f"mle-seed{s}"]["by_length"][str(length)]["ppl total"] for s in settings["seeds"]]
        assert mle["ppl total"]["values"] == per_seed
        assert mle["ppl total"]["mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
        assert mle["ppl total"]["std"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9)
        for key in ("ppl frequent", "ppl rare", "I(W)", "IsoScore"):
            assert math.isfinite(mle[key]["mean"])
        assert f"| MLE | {length} | {mle['ppl total']['mean']:.2f} ± {mle['ppl total']['std']:.2f} |" in text
        assert f"At {length} updates:" in text
    assert "Total-perplexity gap of AGG over MLE with training length" in text
    # a re-run may replace what this one wrote: each folder carries the study's stamp
    made = [tmp_path, tmp_path / "smoke-data", tmp_path / "data-bin", *(tmp_path / key for key in result["runs"])]
    assert {stamp_owner(folder) for folder in made} == {"fairseq_agg.study"}


def _summary(ppl_total, ppl_rare):
    def entry(values):
        values = list(values)
        return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": values,
                "n": len(values)}

    return {"ppl total": entry(ppl_total), "ppl rare": entry(ppl_rare)}


def test_verdict_follows_the_numbers():
    mle = {600: _summary([174.0, 175.0, 176.0], [40000, 42000, 44000]),
           1800: _summary([150.0, 151.0, 152.0], [30000, 31000, 32000])}
    stats = {"MLE": mle,
             # alpha 0.03: 4% worse at 600 (far beyond noise), within noise at 1800 with rare 2.5x lower
             "AGG alpha=0.03": {600: _summary([181.0, 181.5, 182.0], [17000, 17500, 18000]),
                                1800: _summary([150.5, 151.5, 152.5], [12000, 12400, 12800])},
             # alpha 0.05: within noise everywhere, but rare only 1.2x lower
             "AGG alpha=0.05": {600: _summary([174.5, 175.0, 176.5], [35000, 35000, 35000]),
                                1800: _summary([150.0, 151.5, 152.0], [26000, 26000, 26000])}}
    result = study.verdict(stats, [0.03, 0.05], [600, 1800])
    assert result["answer_by_length"] == {600: False, 1800: True}
    c = result["comparisons"]["AGG alpha=0.03"][600]
    se = math.sqrt(0.5 ** 2 / 3 + 1.0 ** 2 / 3)
    assert c["se"] == pytest.approx(se) and c["ppl_diff"] == pytest.approx(6.5) and not c["within_noise"]
    assert result["comparisons"]["AGG alpha=0.05"][600]["within_noise"]
    assert not result["comparisons"]["AGG alpha=0.05"][600]["rare_2x_lower"]
    assert result["lines"][0].startswith("At 600 updates: NO alpha")
    assert result["lines"][1].startswith("At 1800 updates: YES. AGG with alpha 0.03")
    assert "alpha 0.03 narrows: +3.7% at 600 updates -> +0.3% at 1800" in result["lines"][2]


def test_plan_and_estimate():
    plan = study.plan_runs([0.025, 0.03, 0.05], [1, 2, 3])
    assert len(plan) == 12 and plan[0] == ("mle-seed1", None, 1) and ("agg0.05-seed3", 0.05, 3) in plan
    low, high = study.estimate_seconds(len(plan), 1800, 2)
    assert low == pytest.approx(6 * 1800 * study.SECONDS_PER_UPDATE[0])
    with pytest.raises(SystemExit, match="at least two --seeds"):
        study.run_study(["--smoke", "--seeds", "1", "--dry-run"])


def test_a_workdir_the_study_did_not_write_is_refused_in_one_line_and_left_alone(tmp_path, capsys):
    (tmp_path / "mle-seed1").mkdir()
    (tmp_path / "mle-seed1" / "checkpoint_best.pt").write_text("the user's model")
    with pytest.raises(SystemExit) as refused:
        study.main(["--smoke", "--workdir", str(tmp_path)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"python -m fairseq_agg.study: error: {tmp_path} holds files that fairseq_agg.study did not write "
        "(no .fairseq-agg-owner stamp); pass another --workdir or remove it yourself"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "mle-seed1", "mle-seed1/checkpoint_best.pt"]
    assert (tmp_path / "mle-seed1" / "checkpoint_best.pt").read_text() == "the user's model"
