"""ltrain.eval against plain math: held-out loss is the cross-entropy of the model's own
logits, passkey accuracy counts exactly the probes an oracle answers, and load_model puts a
checkpoint's weights back into the run's model (or the same weights into another kind)."""

import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from ltrain.config import TrainConfig
from ltrain.data.config import DataConfig
from ltrain.data.synthetic import SyntheticSource, make_passkey
from ltrain.eval import MODEL_STATES, eval_batches, heldout_loss, load_model, passkey_by_depth
from ltrain.models.transformer import Transformer

VOCAB = 258  # the byte tokenizer's ids: every synthetic token fits
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", f"model.vocab_size={VOCAB}",
        "attention.pattern=D", "trainer.run_name=t"]


def _config(overrides=()):
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist([*TINY, *overrides]))


def _model(overrides=()) -> Transformer:
    cfg = OmegaConf.to_object(_config(overrides))
    torch.manual_seed(0)
    return Transformer(cfg.model, cfg.attention).eval()


def _run_dir(tmp_path, model: Transformer, overrides=()):
    """A run dir as ltrain-train leaves it, as far as evaluation reads it: config.yaml and one
    checkpoint step dir holding DeepSpeed's model-states file."""
    OmegaConf.save(_config(overrides), tmp_path / "config.yaml")
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, ckpt / MODEL_STATES)
    return tmp_path, ckpt


def test_eval_batches_are_the_fixed_synthetic_samples():
    tokens = eval_batches(128, 5, seed=7)
    assert tokens.shape == (5, 129) and tokens.dtype == torch.int64
    src = SyntheticSource(DataConfig(kind="synthetic", task="passkey", seq_len=128), 7)
    for i in range(5):
        assert torch.equal(tokens[i], torch.from_numpy(src.sample(i)[0]))
    assert torch.equal(tokens, eval_batches(128, 5, seed=7))
    assert not torch.equal(tokens, eval_batches(128, 5, seed=8))


def test_heldout_loss_is_the_mean_token_cross_entropy():
    model, tokens = _model(), eval_batches(128, 5, seed=1)
    with torch.no_grad():  # by hand, one sequence at a time, in float64
        nll = []
        for t in tokens:
            logp = torch.log_softmax(model(t[None, :-1])[0].double(), -1)
            nll.append(-logp[torch.arange(128), t[1:]])
        expected = torch.cat(nll).mean().item()
    loss, modes = heldout_loss(model, tokens, batch_size=2)  # batches of 2, 2, 1: a mean over tokens
    assert loss == pytest.approx(expected, rel=1e-5)
    assert modes == ["dense", "dense"]


class _Uniform(torch.nn.Module):
    """Equal logits for every token: cross-entropy log(V) at every position."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))
        self.attn_stats = {}

    def forward(self, ids):
        return torch.zeros(*ids.shape, VOCAB)


def test_heldout_loss_of_uniform_logits_is_log_vocab():
    loss, modes = heldout_loss(_Uniform(), eval_batches(128, 3, seed=0))
    assert loss == pytest.approx(math.log(VOCAB), rel=1e-6) and modes == []


class _Oracle:
    """Reads the pass key from the needle in its input and predicts it as the last `digits`
    tokens (logit p predicts token p+1), but only for keys that pass `answers`."""

    def __init__(self, answers=lambda key: True, digits=5):
        self.answers, self.digits = answers, digits

    def __call__(self, ids):
        logits = torch.zeros(*ids.shape, VOCAB)
        for row, seq in enumerate(ids):
            key = re.search(r"The pass key is (\d+)\.", bytes(seq.tolist()).decode()).group(1)
            guess = key if self.answers(key) else "".join(str((int(c) + 1) % 10) for c in key)
            for j, c in enumerate(guess):
                logits[row, ids.shape[1] - self.digits + j, ord(c)] = 1.0
        return logits


def test_passkey_accuracy_counts_the_probes_answered():
    depths, n, seq_len, seed = [0.0, 0.5, 1.0], 12, 160, 3
    assert passkey_by_depth(_Oracle(), seq_len, n, depths, seed) == {"0": 1.0, "0.5": 1.0, "1": 1.0, "mean": 1.0}
    assert passkey_by_depth(_Oracle(lambda key: False), seq_len, n, depths, seed)["mean"] == 0.0

    even = lambda key: int(key[0]) % 2 == 0  # noqa: E731
    acc = passkey_by_depth(_Oracle(even), seq_len, n, depths, seed)
    for d in depths:  # by hand: the probes (seed, i) whose key starts with an even digit
        keys = []
        for i in range(n):
            tokens, start, length = make_passkey((seed, i), seq_len, d)
            keys.append(bytes(tokens[start:start + length].tolist()).decode())
        assert acc[f"{d:g}"] == sum(map(even, keys)) / n
    assert 0 < acc["mean"] < 1 and acc["mean"] == pytest.approx(sum(acc[f"{d:g}"] for d in depths) / 3)


def test_load_model_restores_the_checkpoint_weights(tmp_path):
    trained = _model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the init a fresh build would give
    run_dir, ckpt = _run_dir(tmp_path, trained)
    model, cfg = load_model(run_dir, ckpt)
    assert not model.training and cfg.model.dim == 32 and model.kinds == ["dense", "dense"]
    for (name, a), (_, b) in zip(trained.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = eval_batches(128, 2, seed=0)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), trained(ids), rtol=0, atol=0)

        # The same weights as another parameter-free kind: infllm_v2 up to its dense_len is dense.
        for overrides in ({"attention": {"pattern": "I", "layers": None}}, ["attention.pattern=I"]):
            sparse, _ = load_model(run_dir, ckpt, overrides)
            assert sparse.kinds == ["infllm_v2", "infllm_v2"]
            torch.testing.assert_close(sparse(ids), trained(ids), rtol=1e-5, atol=1e-5)

    with pytest.raises(RuntimeError, match="size mismatch"):  # strict: a model of other shapes refuses
        load_model(run_dir, ckpt, ["model.dim=64"])
