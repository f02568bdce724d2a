"""ltrain-eval end to end on a tiny checkpoint: the files it writes and their numbers (accuracies
are fractions, perplexity = exp(loss), one entry per position bucket, bucket losses average to
the length's loss), identical results from a second run, memmap held-out windows, and the one
line for a length the model cannot run or a checkpoint that is not there."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ltrain.config import TrainConfig
from ltrain.data.prepare import prepare
from ltrain.eval import MODEL_STATES, token_losses
from ltrain.eval_cli import EvalSection, evaluate, quote_overrides
from ltrain.models.transformer import Transformer

# Dense and InfLLM-V2 layers (block size 64; below dense_len the InfLLM-V2 layer runs dense).
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=258",
        "attention.pattern=DI", "trainer.run_name=t", "data.seq_len=128"]
LENGTHS, DEPTHS, BUCKETS, N = [128, 256], [0.0, 0.5, 1.0], 4, 3
KEYS, VARIABLES = 2, 3  # multikey needles, vartrack chain: small enough for 128 tokens
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir as ltrain-train leaves it, as far as evaluation reads it (config.yaml, one step dir
    with DeepSpeed's model-states file), and one ltrain-eval run of it as a subprocess."""
    root = tmp_path_factory.mktemp("eval_cli")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(TINY))
    obj = OmegaConf.to_object(cfg)
    torch.manual_seed(0)
    model = Transformer(obj.model, obj.attention)
    run_dir = root / "run"
    ckpt = run_dir / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    torch.save({"module": model.state_dict()}, ckpt / MODEL_STATES)
    out = root / "out"
    proc = _cli(f"eval.checkpoint={ckpt}", f"eval.out_dir={out}", f"eval.lengths=[{','.join(map(str, LENGTHS))}]",
                f"eval.depths=[{','.join(map(str, DEPTHS))}]", f"eval.n={N}", f"eval.buckets={BUCKETS}", "eval.seed=5",
                f"eval.keys={KEYS}", f"eval.variables={VARIABLES}")
    assert proc.returncode == 0, proc.stderr
    return {"ckpt": ckpt, "out": out, "model": model.eval(), "stdout": proc.stdout, "root": root}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ltrain.eval_cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _check_results(record, lengths=LENGTHS, n=N):
    r = record["results"]
    assert list(r) == ["perplexity", "passkey", "multikey", "vartrack", "layer_modes"]
    assert record["settings"]["tasks"] == ["passkey", "multikey", "vartrack"]
    assert (record["settings"]["keys"], record["settings"]["variables"]) == (KEYS, VARIABLES)
    for task in ("passkey", "multikey", "vartrack"):
        assert list(r[task]) == list(r["perplexity"]) == [str(x) for x in lengths]
    for length in lengths:
        p = r["perplexity"][str(length)]
        assert p["sequences"] == n and p["perplexity"] == pytest.approx(math.exp(p["loss"]), rel=1e-12)
        assert len(p["buckets"]) == BUCKETS
        assert [(b["start"], b["end"]) for b in p["buckets"]] == [(k * length // BUCKETS, (k + 1) * length // BUCKETS)
                                                                 for k in range(BUCKETS)]
        for b in p["buckets"]:
            assert b["perplexity"] == pytest.approx(math.exp(b["loss"]), rel=1e-12)
        # the buckets' losses weighted by their scored tokens average to the length's loss (equal
        # weights but for document ends in memmap windows, which score nothing)
        tokens = [b["tokens"] for b in p["buckets"]]
        assert sum(b["loss"] * t for b, t in zip(p["buckets"], tokens)) / sum(tokens) == pytest.approx(p["loss"], rel=1e-6)
        assert all(0 < t <= n * (b["end"] - b["start"]) for b, t in zip(p["buckets"], tokens))
        for task in ("passkey", "multikey"):
            acc = r[task][str(length)]
            assert set(acc) == {f"{d:g}" for d in DEPTHS} | {"mean"}
            assert all(0.0 <= v <= 1.0 for v in acc.values())
            assert acc["mean"] == pytest.approx(sum(acc[f"{d:g}"] for d in DEPTHS) / len(DEPTHS))
        assert set(r["vartrack"][str(length)]) == {"accuracy"} and 0.0 <= r["vartrack"][str(length)]["accuracy"] <= 1.0
        assert r["layer_modes"][str(length)] == ["dense", "dense"]


def test_outputs_and_their_numbers(run):
    record = json.loads((run["out"] / "eval.json").read_text())
    assert record["command"].startswith("ltrain-eval eval.checkpoint=")
    assert record["commit"] and record["checkpoint"] == str(run["ckpt"].resolve()) and record["step"] == 7
    m = record["model"]
    assert m["dim"] == 32 and m["n_layers"] == 2 and m["attention"]["layers"] == ["dense", "infllm_v2"]
    assert m["parameters"] == sum(p.numel() for p in run["model"].parameters())
    assert record["settings"]["lengths"] == LENGTHS and record["settings"]["device"] == "cpu"
    assert record["loss_data"]["128"]["kind"] == "synthetic"
    _check_results(record)
    md = (run["out"] / "eval.md").read_text()
    for title in ("Passkey retrieval", "Multi-key needle", "Variable tracking"):
        assert f"## {title} accuracy" in md
    assert "## Perplexity by position" in md and "| length | accuracy |" in md
    assert "| 256 |" in md and "depth 0.5" in md
    for name in ("passkey_heatmap.png", "multikey_heatmap.png", "vartrack_accuracy.png", "perplexity_by_position.png"):
        data = (run["out"] / name).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    assert "L=128: loss" in run["stdout"] and "multikey mean" in run["stdout"] and "vartrack_accuracy.png" in run["stdout"]


def test_a_second_run_gives_identical_results_and_the_loss_is_the_models(run, tmp_path):
    first = json.loads((run["out"] / "eval.json").read_text())
    e = EvalSection(checkpoint=str(run["ckpt"]), out_dir=str(tmp_path), lengths=LENGTHS, depths=DEPTHS, n=N,
                    buckets=BUCKETS, seed=5, progress=False,
                    keys=KEYS, variables=VARIABLES)
    second = evaluate(e, [])  # in this process: no second start-up
    assert second["results"] == first["results"]
    assert json.loads((tmp_path / "eval.json").read_text())["results"] == first["results"]
    # The held-out sequences' loss is the model's own mean token loss on them.
    from ltrain.data.config import DataConfig
    from ltrain.data.synthetic import SyntheticSource
    from ltrain.eval_cli import HELDOUT_INDEX

    src = SyntheticSource(DataConfig(kind="synthetic", task="passkey", seq_len=128), 5)
    tokens = torch.stack([torch.from_numpy(src.sample(HELDOUT_INDEX + i)[0]) for i in range(N)])
    assert token_losses(run["model"], tokens).double().mean().item() == pytest.approx(
        first["results"]["perplexity"]["128"]["loss"], rel=1e-6)
    # Another seed: other sequences and probes.
    other = evaluate(EvalSection(**{**vars(e), "seed": 6, "lengths": [128], "out_dir": str(tmp_path / "o")}), [])
    assert other["results"]["perplexity"]["128"] != first["results"]["perplexity"]["128"]


def test_memmap_windows_are_evaluated_per_document(run, tmp_path):
    """The last windows of tokens.bin, each document on its own by default: the loss equals running every
    document's piece of a window alone from position 0 (no attention across, no loss on a boundary);
    eval.doc_boundaries=false scores the windows as plain rows."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # short documents (~50-180 tokens): every window crosses boundaries
        words = rng.integers(8, 30)
        (src / f"d{i:02d}.txt").write_text(" ".join("".join(rng.choice(list("abcdefgh"), 5)) for _ in range(words)))
    data = tmp_path / "data"
    prepare([str(src)], data)
    meta = json.loads((data / "meta.json").read_text())
    base = dict(checkpoint=str(run["ckpt"]), lengths=[128], depths=DEPTHS, n=2, buckets=BUCKETS, data_path=str(data),
                progress=False, keys=KEYS, variables=VARIABLES)
    record = evaluate(EvalSection(**base, out_dir=str(tmp_path / "out")), [])
    assert record["loss_data"]["128"] == {"kind": "memmap", "path": str(data), "sequences": 2,
                                          "windows": "last non-overlapping windows of the file", "doc_boundaries": True}
    assert "each document on its own" in (tmp_path / "out" / "eval.md").read_text()
    flat = np.memmap(data / "tokens.bin", dtype=meta["dtype"], mode="r")
    offsets = np.fromfile(data / "docs.idx", dtype=np.int64)
    total, crossings, nll, count = len(flat), 0, 0.0, 0
    windows = []
    for j in range(2):
        start = total - (j + 1) * 129
        window = torch.from_numpy(np.asarray(flat[start : start + 129], dtype=np.int64))
        windows.append(window)
        cuts = [0] + [int(o) - start for o in offsets if start < o < start + 129] + [129]
        crossings += len(cuts) - 2
        for a, b in zip(cuts, cuts[1:]):
            if b - a > 1:
                losses = token_losses(run["model"], window[None, a:b])
                nll, count = nll + losses.double().sum().item(), count + losses.numel()
    assert crossings >= 2
    assert record["results"]["perplexity"]["128"]["loss"] == pytest.approx(nll / count, rel=1e-5)
    _check_results(record, lengths=[128], n=2)
    across = evaluate(EvalSection(**base, out_dir=str(tmp_path / "across"), doc_boundaries=False), [])
    assert across["loss_data"]["128"]["doc_boundaries"] is False
    plain = token_losses(run["model"], torch.stack(windows)).double().mean().item()
    assert across["results"]["perplexity"]["128"]["loss"] == pytest.approx(plain, rel=1e-6)
    from ltrain.errors import ConfigError

    dense = dict(base, lengths=[120], overrides=["attention.pattern=D"], out_dir=str(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"eval.lengths\[0\]=120 is invalid: memmap windows are evaluated per "
                                          r"document, masked per attention block: use a multiple of 16, or "
                                          r"eval.doc_boundaries=false"):
        evaluate(EvalSection(**dense), [])
    assert evaluate(EvalSection(**dense, doc_boundaries=False), [])["loss_data"]["120"]["doc_boundaries"] is False


def test_bad_inputs_answer_one_line(run, tmp_path):
    ckpt = run["ckpt"]
    bad = _cli(f"eval.checkpoint={ckpt}", f"eval.out_dir={tmp_path / 'o'}", "eval.lengths=[128,200]",
               f"eval.keys={KEYS}")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("ltrain: config error: eval.lengths[1]=200 is invalid: must be a multiple of 64, "
                                  "the attention block size of the model's infllm_v2 layers "
                                  "(attention.infllm_v2.block_size)")
    assert not (tmp_path / "o").exists()  # nothing written: refused before any model work
    missing = _cli(f"eval.checkpoint={tmp_path / 'nope'}", f"eval.out_dir={tmp_path / 'o'}")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert missing.stderr.startswith("ltrain: config error: eval.checkpoint=") and "no such directory" in missing.stderr
    lone = tmp_path / "lone" / "step_00000001"  # a step dir outside any run dir: no config.yaml two levels up
    lone.mkdir(parents=True)
    (lone / MODEL_STATES).write_bytes((ckpt / MODEL_STATES).read_bytes())
    no_cfg = _cli(f"eval.checkpoint={lone}", f"eval.out_dir={tmp_path / 'o'}")
    assert no_cfg.returncode == 2 and len(no_cfg.stderr.strip().splitlines()) == 1 and "config.yaml" in no_cfg.stderr


def test_validation_in_process(run, tmp_path):
    from ltrain.errors import ConfigError

    base = dict(checkpoint=str(run["ckpt"]), out_dir=str(tmp_path), progress=False, keys=KEYS, variables=VARIABLES)
    with pytest.raises(ConfigError, match=r"eval.lengths\[0\]=64 is invalid: a passkey probe needs at least"):
        evaluate(EvalSection(**base, lengths=[64]), [])
    with pytest.raises(ConfigError, match=r"eval.lengths\[0\]=128 is invalid: a multikey probe with eval.keys=4 "
                                          r"needs at least 160 tokens \(lower eval.keys or leave multikey out of eval.tasks\)"):
        evaluate(EvalSection(**{**base, "keys": 4}, lengths=[128]), [])
    with pytest.raises(ConfigError, match=r"eval.tasks\[1\]='ruler' is invalid: allowed values are passkey, multikey, vartrack"):
        evaluate(EvalSection(**base, tasks=["passkey", "ruler"]), [])
    with pytest.raises(ConfigError, match=r"eval.depths\[0\]=1.5"):
        evaluate(EvalSection(**base, depths=[1.5]), [])
    with pytest.raises(ConfigError, match="eval.overrides: attention.patern is not a setting"):
        evaluate(EvalSection(**base, overrides=["attention.patern=D"]), [])
    from ltrain.eval_cli import resolve_checkpoint

    (run["ckpt"].parent / "latest").write_text(run["ckpt"].name)  # the pointer ltrain-train writes
    assert resolve_checkpoint(str(run["ckpt"].parent / "latest")) == (run["ckpt"], run["ckpt"].parent.parent)
    # Overrides rebuild the layers: the same weights as a dense model run any length.
    record = evaluate(EvalSection(**base, lengths=[120], depths=[0.5], n=1, buckets=BUCKETS,
                                  overrides=["attention.pattern=D"]), [])
    assert record["model"]["attention"]["layers"] == ["dense", "dense"] and "120" in record["results"]["passkey"]
    # eval.tasks picks the probe tasks: vartrack alone, no passkey or multikey results or heatmaps.
    only = evaluate(EvalSection(**{**base, "out_dir": str(tmp_path / "vt")}, lengths=[128], n=1, buckets=BUCKETS,
                                tasks=["vartrack"]), [])
    assert list(only["results"]) == ["perplexity", "vartrack", "layer_modes"]
    assert sorted(p.name for p in (tmp_path / "vt").iterdir()) == ["eval.json", "eval.md", "perplexity_by_position.png",
                                                                  "vartrack_accuracy.png"]
    assert "Passkey" not in (tmp_path / "vt" / "eval.md").read_text()


def test_unknown_keys_are_refused_before_hydra():
    from ltrain.errors import ConfigError
    from ltrain.eval_cli import check_override_keys

    check_override_keys(["eval.n=3", "hydra.run.dir=x", "eval.overrides=['model.dim=8']"])
    with pytest.raises(ConfigError, match="eval.lenghts is not an ltrain-eval setting .closest: eval.lengths."):
        check_override_keys(["eval.lenghts=[128]"])
    with pytest.raises(ConfigError, match=r"a setting of the model goes in eval.overrides=\[model.dim=...\]"):
        check_override_keys(["model.dim=8"])


def test_overrides_are_quoted_for_hydra():
    assert quote_overrides(["eval.overrides=[attention.pattern=I,attention.layers=[dense,s2]]", "eval.n=2"]) == [
        "eval.overrides=['attention.pattern=I','attention.layers=[dense,s2]']", "eval.n=2"]
    assert quote_overrides(["eval.overrides=['a=b']", "eval.overrides=[]"]) == ["eval.overrides=['a=b']",
                                                                              "eval.overrides=[]"]
