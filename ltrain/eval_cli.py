"""`ltrain-eval`: evaluate one checkpoint at several context lengths, a Hydra app like ltrain-train.

    ltrain-eval eval.checkpoint=outputs/run/checkpoints/step_00000200 eval.out_dir=eval/run \\
        eval.lengths=[256,512,1024] eval.depths=[0.1,0.5,0.9] eval.n=20 eval.seed=1234 \\
        [eval.tasks=[passkey,multikey,vartrack]] [eval.keys=4] [eval.variables=4] [eval.device=auto] [eval.data_path=MEMMAP_DIR]
        [eval.doc_boundaries=null] [eval.buckets=8] \\
        [eval.overrides=[attention.pattern=I]] [eval.progress=false]

The checkpoint is a step directory `<run dir>/checkpoints/step_<N>` (or the `latest` file beside
it); the model is the run's config.yaml (two levels up) with `eval.overrides` applied (keys of the
run's config; ltrain-eval quotes them for Hydra), holding the step's weights
(ltrain.eval.load_model). For each length L in eval.lengths:

- loss by position: mean next-token loss and perplexity (exp of the loss) over all L positions and
  in `eval.buckets` equal position buckets [0, L/b), [L/b, 2L/b), ..., so far positions can be
  compared with near ones (does the context help?). The sequences: with eval.data_path (a directory
  written by ltrain-prepare) the last eval.n non-overlapping windows of L + 1 tokens counted back from
  the end of tokens.bin (ltrain-prepare has no split: point it at a directory prepared from
  held-out text, or rely on the run not having reached the end of its file), evaluated per document
  as training with data.doc_boundaries does (attention within each token's document, positions
  restarting, no loss on a token that starts a document; eval.doc_boundaries=false attends across
  them; null follows the run's data.doc_boundaries, else true); without it, samples
  HELDOUT_INDEX + i (i < eval.n) of the run's synthetic task (its data.task settings) with data seed
  eval.seed, indices no training run reaches, so they are held out whatever trainer.seed was.
- the probe tasks of eval.tasks (any of passkey, multikey, vartrack; all three by default), each
  the greedy exact-match accuracy of eval.n probes (seed, i), built by the generators the synthetic
  training tasks of the same names use (ltrain.data.synthetic; no downloads):
  - passkey: a number hidden at each depth in eval.depths (ltrain.eval.passkey_by_depth);
  - multikey (RULER's multi-key needle): eval.keys "The number for <key> is <value>." needles, the
    queried one at each depth in eval.depths, the others anywhere (ltrain.eval.multikey_by_depth);
  - vartrack (RULER's variable tracking): a chain of eval.variables assignments VAR A = <number>.
    VAR B = A. ... in filler; the answer is every name in the chain, in order
    (ltrain.data.synthetic.vartrack_accuracy; one accuracy per length, no depth).

Outputs in eval.out_dir: eval.json (command, commit, checkpoint, model summary, settings, results:
perplexity, layer_modes and one entry per task of eval.tasks), eval.md (the same as Markdown tables),
passkey_heatmap.png and multikey_heatmap.png (accuracy, length x depth; for the tasks evaluated),
vartrack_accuracy.png (accuracy per length) and perplexity_by_position.png (perplexity per position
bucket, one line per length).

Every length is checked before any model work: one line `ltrain: config error: eval.lengths[i]=...`
names a length the model's attention kinds cannot run (not a multiple of a kind's block size), or
one too short for the probes or buckets; a missing checkpoint or config.yaml is one line too.
Results depend only on the checkpoint and the settings (two runs on one machine write identical
results). One process on one device (eval.device=auto: CUDA when available, else the CPU; fp32);
context-parallel (multi-rank) evaluation is not supported.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from ltrain.errors import ConfigError, config_error  # noqa: E402

HELDOUT_INDEX = 2**48  # first synthetic sample index of the loss sequences: far beyond any training run
EVAL_TASKS = ("passkey", "multikey", "vartrack")  # probe tasks of eval.tasks
DEPTH_TASKS = ("passkey", "multikey")  # graded by needle depth (eval.depths)
MODEL_STATES = "mp_rank_00_model_states.pt"  # = ltrain.eval.MODEL_STATES (not imported: torch loads late)
# Hydra settings of every run: no outputs/ directory, no log files, ltrain's own lines only.
HYDRA_ARGS = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


@dataclass
class EvalSection:
    """The `eval` settings (module docstring)."""

    checkpoint: str = ""  # <run dir>/checkpoints/step_<N>
    out_dir: str = ""  # where eval.json, eval.md and the plots go (created)
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    n: int = 20  # sequences per length for the loss, probes per (task, length[, depth])
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))  # probe tasks: passkey, multikey, vartrack
    keys: int = 4  # multikey: needles per probe (one queried)
    variables: int = 4  # vartrack: variables in the chain
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:<i>
    data_path: str = ""  # memmap directory (ltrain-prepare) for the loss; "" = synthetic
    # Memmap windows pack documents: true attends within each token's document (positions restart,
    # no loss across a boundary), as training with data.doc_boundaries; null: the run's
    # data.doc_boundaries where it set one, else true.
    doc_boundaries: Optional[bool] = None
    buckets: int = 8  # position buckets per length
    batch_size: int = 4  # sequences per forward
    overrides: list[str] = field(default_factory=list)  # dotlist over the run's config, e.g. attention.pattern=I
    progress: bool = True  # tqdm bar (only on a terminal)


@dataclass
class EvalConfig:
    eval: EvalSection = field(default_factory=EvalSection)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="eval", node=EvalConfig)


def check_override_keys(args: list[str]) -> None:
    """ConfigError for a command-line key that is not an eval setting, before Hydra (whose message
    suggests `+key=...`, which the schema refuses anyway). hydra.* and unparsable args are Hydra's."""
    from ltrain.config import parse_overrides

    known = [f"eval.{f.name}" for f in dataclasses.fields(EvalSection)]
    for o in parse_overrides(args):
        key = o.key_or_group
        if key.split("/")[0].split(".")[0] == "hydra" or key in known:
            continue
        if not key.startswith("eval."):
            raise ConfigError(f"{key} is not an ltrain-eval setting; a setting of the model goes in "
                              f"eval.overrides=[{key}=...], see ltrain-eval --help")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"closest: {close[0]}" if close else "settings: " + ", ".join(known)
        raise ConfigError(f"{key} is not an ltrain-eval setting ({hint}), fix or remove the override")


def quote_overrides(args: list[str]) -> list[str]:
    """`eval.overrides=[attention.pattern=I,model.rope_factor=4]` as Hydra's grammar needs it (each
    element quoted: an unquoted `=` inside a list is a parse error). Commas inside brackets (a list
    value such as attention.layers=[dense,s2]) stay in their element; quoted elements are kept."""
    out = []
    for a in args:
        m = re.fullmatch(r"(\+?eval\.overrides)=\[(.*)\]", a, flags=re.S)
        if not m or not m.group(2).strip():
            out.append(a)
            continue
        items, depth, cur = [], 0, ""
        for ch in m.group(2):
            if ch == "," and depth == 0:
                items.append(cur)
                cur = ""
                continue
            depth += {"[": 1, "]": -1}.get(ch, 0)
            cur += ch
        items.append(cur)
        items = [i.strip() for i in items]
        quoted = [i if i[:1] in "'\"" and i[-1:] == i[:1] and len(i) > 1
                  else "'" + i.replace("\\", "\\\\").replace("'", "\\'") + "'" for i in items]
        out.append(f"{m.group(1)}=[{','.join(quoted)}]")
    return out


# ---------------------------------------------------------------------------------------------- checks


def _run_config(e: EvalSection, run_dir: Path):
    """The run's TrainConfig with eval.overrides, as load_model will build it (no weights read)."""
    from ltrain.config import TrainConfig, config_groups
    from ltrain.config import check_override_keys as check_train_keys

    groups = config_groups()
    for i, o in enumerate(e.overrides):
        key = o.split("=", 1)[0].lstrip("+")
        if "=" not in o:
            raise config_error(f"eval.overrides[{i}]", o, "expected key=value, e.g. attention.pattern=I")
        if key in groups:
            raise config_error(f"eval.overrides[{i}]", o, f"a config group choice; set keys instead "
                               f"(e.g. {key}.<setting>=...)")
    try:
        check_train_keys([o.lstrip("+") for o in e.overrides])
    except ConfigError as exc:
        raise ConfigError(f"eval.overrides: {exc}") from None
    base = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"))
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(e.overrides))) if e.overrides else base
        return OmegaConf.to_object(merged)
    except Exception as exc:  # omegaconf's validation errors: an unknown key or a wrongly typed value
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise config_error("eval.overrides", list(e.overrides), first) from None


def resolve_checkpoint(checkpoint: str) -> tuple[Path, Path]:
    """(step dir, run dir) of eval.checkpoint, or ConfigError in one line."""
    if not checkpoint:
        raise ConfigError("eval.checkpoint is not set: give eval.checkpoint=<run dir>/checkpoints/step_<N>")
    ckpt = Path(checkpoint)
    if ckpt.is_file() and ckpt.name == "latest":  # the checkpoints dir's pointer: the step dir it names
        ckpt = ckpt.parent / ckpt.read_text().strip()
    if not ckpt.is_dir():
        raise config_error("eval.checkpoint", checkpoint, "no such directory (expected "
                           "<run dir>/checkpoints/step_<N>)")
    if not (ckpt / MODEL_STATES).is_file():
        steps = sorted((ckpt / "checkpoints").glob("step_*")) or sorted(ckpt.glob("step_*"))
        hint = f"; give a step directory, e.g. {steps[-1]}" if steps else ""
        raise config_error("eval.checkpoint", checkpoint, f"has no {MODEL_STATES}: not a checkpoint step "
                           f"directory (a ZeRO-3 checkpoint keeps its weights elsewhere){hint}")
    run_dir = ckpt.resolve().parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise config_error("eval.checkpoint", checkpoint, f"its run directory {run_dir} has no config.yaml "
                           "(expected <run dir>/checkpoints/step_<N>, the layout ltrain-train writes)")
    return ckpt, run_dir


def validate(e: EvalSection):
    """Check every setting before any model work; returns (step dir, run dir, run config, layer kinds,
    memmap meta or None). ConfigError names the first setting that cannot work."""
    ckpt, run_dir = resolve_checkpoint(e.checkpoint)
    if not e.out_dir:
        raise ConfigError("eval.out_dir is not set: give eval.out_dir=<directory for eval.json, eval.md, plots>")
    if Path(e.out_dir).exists() and not Path(e.out_dir).is_dir():
        raise config_error("eval.out_dir", e.out_dir, "exists and is not a directory")
    for key in ("n", "buckets", "batch_size", "keys", "variables"):
        if getattr(e, key) < 1:
            raise config_error(f"eval.{key}", getattr(e, key), "must be a positive integer")
    if not e.lengths:
        raise config_error("eval.lengths", list(e.lengths), "give at least one context length")
    if len(set(e.lengths)) != len(e.lengths):
        raise config_error("eval.lengths", list(e.lengths), "lists a length twice")
    for i, task in enumerate(e.tasks):
        if task not in EVAL_TASKS:
            raise config_error(f"eval.tasks[{i}]", task, f"allowed values are {', '.join(EVAL_TASKS)}")
    if len(set(e.tasks)) != len(e.tasks):
        raise config_error("eval.tasks", list(e.tasks), "lists a task twice")
    if not e.depths:
        raise config_error("eval.depths", list(e.depths), "give at least one needle depth")
    for i, d in enumerate(e.depths):
        if not 0.0 <= d <= 1.0:
            raise config_error(f"eval.depths[{i}]", d, "a needle depth is a fraction in [0, 1]")
    if len({f"{d:g}" for d in e.depths}) != len(e.depths):
        raise config_error("eval.depths", list(e.depths), "lists a depth twice")
    if not (e.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", e.device)):
        raise config_error("eval.device", e.device, "allowed values are auto, cpu, cuda, cuda:<index>")

    cfg = _run_config(e, run_dir)
    cfg.parallel.cp = 1  # one process: the kinds' context-parallel checks do not apply
    from ltrain.attention.registry import kinds as registered_kinds
    from ltrain.attention.registry import resolve_layer_kinds
    from ltrain.config import attention_block
    from ltrain.data.config import DataConfigError
    from ltrain.data.synthetic import min_seq_len

    try:
        layer_kinds = resolve_layer_kinds(cfg.attention.pattern, cfg.attention.layers, cfg.model.n_layers)
    except ValueError as exc:
        raise ConfigError(f"the model of {run_dir}/config.yaml with eval.overrides: {exc}") from None
    registered = registered_kinds()
    for name in sorted(set(layer_kinds)):
        if registered[name].validate is not None:
            try:
                registered[name].validate(cfg, set(layer_kinds))
            except ConfigError as exc:
                raise ConfigError(f"the model of {run_dir}/config.yaml with eval.overrides: {exc}") from None
    blocks = [(name, registered[name].block_size(cfg)) for name in sorted(set(layer_kinds))
              if registered[name].block_size is not None]
    doc_block = attention_block(cfg, [registered[name] for name in sorted(set(layer_kinds))])

    meta = None
    if e.data_path:
        from ltrain.data.memmap import max_token_id, read_meta

        try:
            meta = read_meta(e.data_path)
        except DataConfigError as exc:
            raise ConfigError(str(exc).replace("data.path", "eval.data_path", 1)) from None
        top = max_token_id(e.data_path, meta)
        if max(meta["vocab_size"] - 1, top) >= cfg.model.vocab_size:
            raise config_error("eval.data_path", e.data_path, f"its tokenizer has {meta['vocab_size']} tokens "
                               f"(largest id {top}) but the model's vocab_size is {cfg.model.vocab_size}")
    probe_min = {task: min_seq_len(dataclasses.replace(cfg.data, task=task, multikey_keys=e.keys,
                                                        vartrack_vars=e.variables)) for task in e.tasks}
    probe_what = {"passkey": "a passkey probe", "multikey": f"a multikey probe with eval.keys={e.keys}",
                  "vartrack": f"a vartrack probe with eval.variables={e.variables}"}
    stream_min = 0 if meta else min_seq_len(cfg.data)
    for i, length in enumerate(e.lengths):
        key = f"eval.lengths[{i}]"
        if length < 1:
            raise config_error(key, length, "must be a positive integer")
        for name, block in blocks:
            if length % block:
                raise config_error(key, length, f"must be a multiple of {block}, the attention block size of "
                                   f"the model's {name} layers (attention.{name}.block_size)")
        for task, need in probe_min.items():
            if length < need:
                setting = {"multikey": "eval.keys", "vartrack": "eval.variables"}.get(task)
                hint = f" (lower {setting} or leave {task} out of eval.tasks)" if setting else ""
                raise config_error(key, length, f"{probe_what[task]} needs at least {need} tokens{hint}")
        if length < stream_min:
            raise config_error(key, length, f"the run's data.task={cfg.data.task} needs at least {stream_min} tokens")
        if length < e.buckets:
            raise config_error(key, length, f"shorter than eval.buckets={e.buckets}")
        if meta and window_doc_masking(e, cfg) and length % doc_block:
            raise config_error(key, length, f"memmap windows are evaluated per document, masked per attention "
                               f"block: use a multiple of {doc_block}, or eval.doc_boundaries=false to attend "
                               "across documents")
        if meta and meta["num_tokens"] < length + 1:
            raise config_error(key, length, f"needs {length + 1} tokens but eval.data_path={e.data_path} "
                               f"has {meta['num_tokens']}")
    return ckpt, run_dir, cfg, layer_kinds, meta


# --------------------------------------------------------------------------------------------- running


def git_commit() -> str:
    """Short sha of the ltrain source tree, "-dirty" when tracked files changed; "unknown" outside git."""
    src = Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def window_doc_masking(e: EvalSection, cfg) -> bool:
    """Whether memmap windows are evaluated per document (eval.doc_boundaries resolved)."""
    if e.doc_boundaries is not None:
        return bool(e.doc_boundaries)
    return True if cfg.data.doc_boundaries is None else bool(cfg.data.doc_boundaries)


def loss_sequences(e: EvalSection, cfg, meta, length: int):
    """(LongTensor [n, length + 1] of the loss measurement, each token's document number [n, length + 1]
    or None, a description of where they came from)."""
    import numpy as np
    import torch

    if meta is not None:
        from ltrain.data.memmap import DOCS, TOKENS, doc_numbers

        root = Path(e.data_path)
        tokens = np.memmap(root / TOKENS, dtype=meta["dtype"], mode="r", shape=(meta["num_tokens"],))
        count = min(e.n, len(tokens) // (length + 1))
        starts = [len(tokens) - (j + 1) * (length + 1) for j in range(count)]
        rows = [np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts]
        docs = None
        if window_doc_masking(e, cfg):
            offsets = np.memmap(root / DOCS, dtype=np.int64, mode="r", shape=(meta["num_docs"] + 1,))
            docs = torch.from_numpy(np.stack([doc_numbers(offsets, s, length + 1) for s in starts]))
        return torch.from_numpy(np.stack(rows)), docs, {
            "kind": "memmap", "path": str(e.data_path), "sequences": count,
            "windows": "last non-overlapping windows of the file", "doc_boundaries": docs is not None}
    from ltrain.data.synthetic import SyntheticSource

    src = SyntheticSource(dataclasses.replace(cfg.data, kind="synthetic", path=None, seq_len=length), e.seed)
    rows = [torch.from_numpy(src.sample(HELDOUT_INDEX + i)[0]) for i in range(e.n)]
    return torch.stack(rows), None, {"kind": "synthetic", "task": cfg.data.task, "seed": e.seed, "sequences": e.n,
                                     "first_index": HELDOUT_INDEX}


def position_buckets(losses, buckets: int) -> list[dict]:
    """Mean loss, perplexity and scored tokens of `losses` [n, L] in `buckets` equal position buckets
    (a NaN loss, a document's last token with nothing to predict, is not scored)."""
    length = losses.shape[1]
    out = []
    for k in range(buckets):
        start, end = k * length // buckets, (k + 1) * length // buckets
        part = losses[:, start:end].double()
        loss = part.nanmean().item()
        out.append({"start": start, "end": end, "loss": loss, "perplexity": math.exp(loss),
                    "tokens": int((~part.isnan()).sum())})
    return out


def model_summary(model, cfg, layer_kinds: list[str], overrides: list[str]) -> dict:
    attn = {"pattern": cfg.attention.pattern, "layers": layer_kinds}
    for name in sorted(set(layer_kinds)):
        section = getattr(cfg.attention, name, None)
        if dataclasses.is_dataclass(section):
            attn[name] = dataclasses.asdict(section)
    return {"parameters": sum(p.numel() for p in model.parameters()), **dataclasses.asdict(cfg.model),
            "attention": attn, "overrides": list(overrides),
            "trained": {"seq_len": cfg.data.seq_len, "data": cfg.data.kind, "task": cfg.data.task}}


def evaluate(e: EvalSection, args: list[str]) -> dict:
    """Validate, run every (length, task) item, write the outputs; returns the eval.json record."""
    ckpt, run_dir, cfg, layer_kinds, meta = validate(e)
    started = time.time()
    import torch
    from tqdm import tqdm

    from ltrain.data.synthetic import vartrack_accuracy
    from ltrain.eval import load_model, multikey_by_depth, passkey_by_depth, token_losses

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if e.device == "auto" else e.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_error("eval.device", e.device, "CUDA is not available on this machine")
    try:
        model, cfg = load_model(run_dir, ckpt, list(e.overrides) or None)
    except RuntimeError as exc:  # strict load_state_dict: the weights do not fit the (overridden) model
        lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
        first = " ".join(lines[:2])[:300]
        raise CheckpointError(f"eval.checkpoint={str(e.checkpoint)!r}: its weights do not fit the model of "
                              f"{run_dir}/config.yaml with eval.overrides ({first})") from None
    model = model.to(device)

    def logits(ids):
        return model(ids.to(device))

    results = {"perplexity": {}, **{task: {} for task in e.tasks}, "layer_modes": {}}
    data = {}
    digits = cfg.data.passkey_digits
    work = [(length, task) for length in e.lengths for task in ("perplexity", *e.tasks)]
    bar = tqdm(work, desc="ltrain-eval", unit="item", file=sys.stderr,
               disable=not e.progress or not sys.stderr.isatty())
    for length, task in bar:
        bar.set_postfix_str(f"L={length} {task}")
        if task == "perplexity":
            tokens, docs, data[str(length)] = loss_sequences(e, cfg, meta, length)
            losses = token_losses(model, tokens, e.batch_size, docs)
            loss = losses.double().nanmean().item()
            results["perplexity"][str(length)] = {"loss": loss, "perplexity": math.exp(loss),
                                                  "sequences": len(tokens),
                                                  "buckets": position_buckets(losses, e.buckets)}
            results["layer_modes"][str(length)] = [v for k, v in model.attn_stats.items() if k.endswith("/mode")]
        elif task == "passkey":
            results["passkey"][str(length)] = passkey_by_depth(logits, length, e.n, list(e.depths), e.seed,
                                                               digits=digits)
        elif task == "multikey":
            results["multikey"][str(length)] = multikey_by_depth(logits, length, e.n, list(e.depths), e.seed,
                                                                 keys=e.keys, digits=digits)
        else:
            results["vartrack"][str(length)] = {"accuracy": vartrack_accuracy(
                logits, seq_len=length, n=e.n, seed=e.seed, variables=e.variables, digits=digits)}
    bar.close()
    step = re.fullmatch(r"step_(\d+)", ckpt.resolve().name)
    record = {
        "command": shlex.join(["ltrain-eval", *args]),
        "commit": git_commit(),
        "checkpoint": str(ckpt.resolve()),
        "run_dir": str(run_dir),
        "step": int(step.group(1)) if step else None,
        "model": model_summary(model, cfg, layer_kinds, e.overrides),
        "settings": {"lengths": list(e.lengths), "depths": list(e.depths), "n": e.n, "seed": e.seed,
                     "tasks": list(e.tasks), "keys": e.keys, "variables": e.variables,
                     "buckets": e.buckets, "batch_size": e.batch_size, "device": str(device),
                     "data_path": e.data_path or None, "doc_boundaries": e.doc_boundaries},
        "loss_data": data,
        "results": results,
        "seconds": round(time.time() - started, 2),
        "torch": torch.__version__,
    }
    write_outputs(Path(e.out_dir), record)
    return record


class CheckpointError(Exception):
    """A checkpoint that cannot be evaluated; the message is one line."""


# --------------------------------------------------------------------------------------------- outputs


def markdown(record: dict) -> str:
    s, r, m = record["settings"], record["results"], record["model"]
    lines = ["# ltrain-eval", "",
             f"- command: `{record['command']}`",
             f"- commit: `{record['commit']}`",
             f"- checkpoint: `{record['checkpoint']}` (step {record['step']})",
             f"- model: {m['name']}, {m['parameters'] / 1e6:.2f}M parameters, dim {m['dim']}, "
             f"{m['n_layers']} layers ({', '.join(m['attention']['layers'])}), trained at "
             f"{m['trained']['seq_len']} tokens"
             + (f"; overrides: `{' '.join(m['overrides'])}`" if m["overrides"] else ""),
             f"- device: {s['device']}; n = {s['n']}, seed = {s['seed']}", ""]
    depths = [f"{d:g}" for d in s["depths"]]
    titles = {"passkey": ("Passkey retrieval accuracy", "the needle at a fraction `depth` of the filler"),
              "multikey": ("Multi-key needle accuracy", f"{s.get('keys')} key/value needles, the queried one at "
                                                        "a fraction `depth` of the filler")}
    for task in (t for t in DEPTH_TASKS if t in r):
        title, what = titles[task]
        lines += [f"## {title}", "", f"Greedy accuracy of {s['n']} probes per cell ({what}).", "",
                  "| length | " + " | ".join(f"depth {d}" for d in depths) + " | mean |",
                  "|---:|" + "---:|" * (len(depths) + 1)]
        for length, acc in r[task].items():
            lines.append(f"| {length} | " + " | ".join(f"{acc[d]:.2f}" for d in depths) + f" | {acc['mean']:.2f} |")
        lines.append("")
    if "vartrack" in r:
        lines += ["## Variable tracking accuracy", "",
                  f"Greedy accuracy of {s['n']} probes per length (a chain of {s.get('variables')} variable "
                  "assignments in the filler; the answer is every variable name of the chain, in order).", "",
                  "| length | accuracy |", "|---:|---:|"]
        lines += [f"| {length} | {acc['accuracy']:.2f} |" for length, acc in r["vartrack"].items()]
        lines.append("")
    lines.pop()
    first = next(iter(record["loss_data"].values()))
    per_doc = ", each document on its own" if first.get("doc_boundaries") else ", across documents"
    source = (f"the last windows of `{first['path']}`{per_doc}" if first["kind"] == "memmap"
              else f"held-out synthetic `{first['task']}` samples (seed {first['seed']})")
    lines += ["", "## Perplexity by position", "",
              f"Next-token perplexity over {source}, in {s['buckets']} equal position buckets (bucket k: "
              "positions [k L / b, (k+1) L / b)); `all`: every position.", "",
              "| length | all | " + " | ".join(f"b{k}" for k in range(s["buckets"])) + " |",
              "|---:|---:|" + "---:|" * s["buckets"]]
    for length, p in r["perplexity"].items():
        lines.append(f"| {length} | {p['perplexity']:.3f} | "
                     + " | ".join(f"{b['perplexity']:.3f}" for b in p["buckets"]) + " |")
    lines += ["", "Mean loss (nats):", "",
              "| length | all | " + " | ".join(f"b{k}" for k in range(s["buckets"])) + " |",
              "|---:|---:|" + "---:|" * s["buckets"]]
    for length, p in r["perplexity"].items():
        lines.append(f"| {length} | {p['loss']:.4f} | " + " | ".join(f"{b['loss']:.4f}" for b in p["buckets"]) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, r = record["settings"], record["results"]
    depths, lengths = [f"{d:g}" for d in s["depths"]], [str(length) for length in s["lengths"]]
    for task in (t for t in DEPTH_TASKS if t in r):
        acc = [[r[task][length][d] for d in depths] for length in lengths]
        fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 2))
        im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (tokens)")
        ax.set_title(f"{task} accuracy (n={s['n']}" + (f", {s.get('keys')} keys)" if task == "multikey" else ")"))
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"{task}_heatmap.png", dpi=100)
        plt.close(fig)

    if "vartrack" in r:
        acc = [r["vartrack"][length]["accuracy"] for length in lengths]
        fig, ax = plt.subplots(figsize=(0.8 * len(lengths) + 3, 3.5))
        ax.bar(range(len(lengths)), acc, color="tab:blue")
        for i, v in enumerate(acc):
            ax.text(i, v + 0.02, f"{v:.2f}", ha="center", va="bottom")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_ylim(0.0, 1.1)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"vartrack accuracy (n={s['n']}, {s.get('variables')} variables)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "vartrack_accuracy.png", dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for length in lengths:
        b = r["perplexity"][length]["buckets"]
        ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["perplexity"] for x in b], marker="o", label=f"L={length}")
    ax.set_xlabel("position in the sequence (tokens, bucket centre)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by position ({s['buckets']} buckets per length)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "perplexity_by_position.png", dpi=100)
    plt.close(fig)


def write_outputs(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(record))
    plot(out, record)


# ------------------------------------------------------------------------------------------ entry point

_ARGS: list[str] = []  # the user's command-line arguments (before HYDRA_ARGS), for eval.json


@hydra.main(config_path=None, config_name="eval", version_base="1.3")
def hydra_main(dcfg: DictConfig) -> None:
    try:
        e: EvalSection = OmegaConf.to_object(dcfg).eval
        record = evaluate(e, _ARGS)
    except ConfigError as exc:
        print(f"ltrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as exc:
        print(f"ltrain: checkpoint error: {exc}", file=sys.stderr)
        sys.exit(2)
    r = record["results"]
    for length in r["perplexity"]:
        p = r["perplexity"][length]
        probes = [f"{task} mean {r[task][length]['mean']:.2f}" for task in DEPTH_TASKS if task in r]
        probes += [f"vartrack {r['vartrack'][length]['accuracy']:.2f}"] if "vartrack" in r else []
        print(f"L={length}: loss {p['loss']:.4f}, perplexity {p['perplexity']:.3f} "
              f"(first bucket {p['buckets'][0]['perplexity']:.3f}, last {p['buckets'][-1]['perplexity']:.3f})"
              + "".join(f"; {x}" for x in probes))
    out = Path(e.out_dir)
    files = ["eval.json", "eval.md", *(f"{t}_heatmap.png" for t in DEPTH_TASKS if t in r),
             *(["vartrack_accuracy.png"] if "vartrack" in r else []), "perplexity_by_position.png"]
    print("wrote " + ", ".join(str(out / f) for f in files))


def main() -> None:
    register_configs()
    _ARGS[:] = sys.argv[1:]
    args = quote_overrides(sys.argv[1:])
    try:
        check_override_keys(args)
    except ConfigError as exc:
        print(f"ltrain: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = args + [a for a in HYDRA_ARGS if a.split("=")[0] not in {x.split("=")[0] for x in args}]
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra_main()


if __name__ == "__main__":
    main()
