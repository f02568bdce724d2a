"""benchmarks/short_to_long.py end to end at toy sizes: every stage trains through `ltrain-train`
from the previous stage's weights, every case is evaluated by `ltrain-eval`, and the results
file, its table and the heatmaps say so; --skip-train re-evaluates without inventing timings."""

import json

from omegaconf import OmegaConf

from benchmarks import short_to_long as sts

TOY = ["--retrieval-steps", "4", "--pretrain-steps", "4", "--continue-steps", "2", "--short", "128", "--long", "256",
       "--probes", "2", "--depths", "0.5", "--ranks", "1", "--threads", "1", "--tag", "toy"]
CASES = ["retrieval", "pretrain", "pretrain-as-infllm_v2", "infllm_v2", "pretrain-as-s2", "s2"]


def test_recipe_chains_stages_and_evaluates_every_case(tmp_path, monkeypatch):
    monkeypatch.setattr(sts, "RESULTS", tmp_path / "results")
    out = tmp_path / "runs"
    sts.main([*TOY, "--out-dir", str(out)])

    r = json.loads((tmp_path / "results" / "short_to_long-toy.json").read_text())
    assert {k: (t["steps"], t["seq_len"]) for k, t in r["train"].items()} == {
        "retrieval": (4, 128), "pretrain": (4, 128), "infllm_v2": (2, 256), "s2": (2, 256)}
    for stage, parent in (("pretrain", "retrieval"), ("infllm_v2", "pretrain"), ("s2", "pretrain")):
        assert str(sts.final_checkpoint(out, parent)) in (out / stage / "config.yaml").read_text()
    for kind in ("infllm_v2", "s2"):  # YaRN from the short length, by long / short
        model = OmegaConf.load(out / kind / "config.yaml").model
        assert (model.rope_scaling, model.rope_factor, model.rope_original_max_positions) == ("yarn", 2.0, 128)
    assert "model.rope_scaling=yarn" in sts.switch_overrides(out / "s2")
    assert list(r["eval"]) == CASES
    assert r["eval"]["infllm_v2"]["results"]["layer_modes"]["256"] == ["sparse", "sparse"]
    assert "sparse" in r["eval"]["pretrain-as-s2"]["results"]["layer_modes"]["256"]
    assert r["eval"]["pretrain"]["results"]["layer_modes"]["256"] == ["dense", "dense"]
    for case in CASES:
        assert (tmp_path / "results" / r["eval"][case]["heatmap"]).stat().st_size > 0
    md = (tmp_path / "results" / "short_to_long-toy.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "png" in line]
    assert len(table) == sum(len(e["results"]["passkey"]) for e in r["eval"].values())

    sts.main([*TOY, "--out-dir", str(out), "--skip-train"])
    again = json.loads((tmp_path / "results" / "short_to_long-toy.json").read_text())
    assert {t["wall_s"] for t in again["train"].values()} == {None}
    md = (tmp_path / "results" / "short_to_long-toy.md").read_text()
    assert "not timed (--skip-train)" in md and "nan" not in md
