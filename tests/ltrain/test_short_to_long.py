"""Short-to-long mechanism (benchmarks/short_to_long.py runs the full experiment): the
stage-0 retrieval run's checkpoint seeds (trainer.init_from) the stage-1 dense run, whose
checkpoint at dense_len seeds an infllm_v2 model past dense_len, whose layers then run
sparse with the same weights, and an S2 model.

Every training stage runs in one spawned process (one DeepSpeed import), composed
from the real presets with Hydra's compose API, a couple of tiny steps each.
"""

import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ltrain.config import TrainConfig, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg: TrainConfig = OmegaConf.to_object(compose("train", overrides=overrides))
    validate(cfg)
    return cfg


def _stages(rank, world, out_dir):
    from ltrain.train import train

    common = [f"trainer.out_dir={out_dir}", "trainer.progress=false", "data.micro_batch_size=2",
              "optim.warmup_steps=1"]
    stage0 = _compose(["experiment=short-to-long-retrieval", "trainer.run_name=retrieval", "trainer.max_steps=1",
                       *common])
    train(stage0, f"{out_dir}/retrieval")
    short = _compose(["experiment=short-to-long-dense", "trainer.run_name=short", "trainer.max_steps=2",
                      f"trainer.init_from={out_dir}/retrieval/checkpoints/step_00000001", "data.seq_len=128",
                      *common])
    train(short, f"{out_dir}/short")
    ckpt = f"{out_dir}/short/checkpoints/step_00000002"
    long = _compose(["experiment=short-to-long-sparse", "trainer.run_name=long", "trainer.max_steps=1",
                     f"trainer.init_from={ckpt}", "data.seq_len=512", "attention.infllm_v2.dense_len=128", *common])
    losses = train(long, f"{out_dir}/long")
    s2 = _compose(["experiment=short-to-long-s2", "trainer.run_name=s2", "trainer.max_steps=1",
                   f"trainer.init_from={ckpt}", "data.seq_len=512", *common])
    train(s2, f"{out_dir}/s2")
    return stage0.data.seq_len, short.data.seq_len, long.attention.infllm_v2.dense_len, losses


def test_dense_checkpoint_seeds_sparse_past_dense_len_and_s2(tmp_path):
    ((stage0_len, short_len, dense_len, losses),) = run_ranks(_stages, 1, str(tmp_path))
    assert stage0_len == short_len == dense_len == 128  # stage 1 is dense because it is not past dense_len
    assert f"initialized the weights from trainer.init_from={tmp_path}/retrieval/checkpoints/step_00000001" in (
        tmp_path / "short" / "train.log").read_text()

    # Stage 2 started from the checkpoint's weights (a new run: step 1), past dense_len, in sparse mode.
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and len(losses) == 1
    row = rows[0]
    assert row["seq_len"] == 512 > dense_len
    assert math.isfinite(row["loss"]) and row["loss"] == losses[0]
    modes = {k: v for k, v in row.items() if k.startswith("attn/") and k.endswith("/mode")}
    layers = range(len(modes))
    assert len(modes) == 2 and modes == {f"attn/layer{i}/mode": "sparse" for i in layers}  # the nano model
    assert all(0 < row[f"attn/layer{i}/block_fraction"] < 1 for i in layers)
    assert f"initialized the weights from trainer.init_from={tmp_path}/short/checkpoints/step_00000002" in (
        tmp_path / "long" / "train.log").read_text()
    s2_row = json.loads((tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(s2_row["loss"]) and s2_row["attn/layer0/block_fraction"] < 1

    # The dense checkpoint's weights load strictly (ltrain.eval.load_model) into an infllm_v2
    # model, which is exactly the dense model up to dense_len and finite, sparse, past it. (The
    # continuation also stretches RoPE, YaRN; with stage 1's positions only the attention differs.)
    from ltrain.eval import load_model

    ckpt = tmp_path / "short" / "checkpoints" / "step_00000002"
    (dense, _), (sparse, _) = (load_model(tmp_path / "short", ckpt),
                              load_model(tmp_path / "long", ckpt, ["model.rope_scaling=none"]))
    assert OmegaConf.load(tmp_path / "long" / "config.yaml").model.rope_scaling == "yarn"
    assert set(dense.kinds) == {"dense"} and set(sparse.kinds) == {"infllm_v2"}
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids[:, :dense_len]), dense(ids[:, :dense_len]), rtol=1e-5, atol=1e-5)
        assert set(sparse.attn_stats[f"attn/layer{i}/mode"] for i in layers) == {"dense"}
        out = sparse(ids)
        assert torch.isfinite(out).all()
        assert set(sparse.attn_stats[f"attn/layer{i}/mode"] for i in layers) == {"sparse"}
