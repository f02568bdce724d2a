"""Structured configs for every group of the Hydra tree in conf/, and their validation.

OmegaConf enforces types when the YAML groups and command-line overrides are
merged into these dataclasses (a non-integer size fails there, naming the
key). `validate` adds the checks that need more than a type: ranges, known
attention kinds, divisibility over context-parallel ranks, data files. It runs
right after composition, before any process group starts, and raises
ConfigError with one line naming the key, the bad value and what is allowed.
A setting that runs but silently loses something (a sparse layout whose heads
together miss distant context) is logged as a one-line warning instead. The
attention kinds bring their own sections and checks (ltrain.attention.registry);
this module names none of them. Hydra and OmegaConf are imported only by the
functions that compose or register, and the data checks (numpy) only in
`validate`, so the dataclasses load on a machine without them (a GPU image
with only torch and triton).
"""

from __future__ import annotations

import datetime
import difflib
import os
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import List, Optional

from ltrain.attention.registry import kinds as attention_kinds
from ltrain.attention.registry import resolve_layer_kinds
from ltrain.data.config import DataConfig, DataConfigError, doc_masking
from ltrain.errors import ConfigError, config_error

INIT_WEIGHTS = "ltrain_weights.safetensors"  # trainer.init_from's file (ltrain.convert writes it)
CHECKPOINT_MANIFEST = "ltrain_complete.json"  # = ltrain.checkpoint.MANIFEST (not imported: torch loads late)


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0  # 0: SwiGLU's 8/3 * dim rounded up to multiple_of
    multiple_of: int = 64
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: str = "none"  # none | linear (position interpolation) | ntk | llama3 | yarn
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_positions: int = 8192  # llama3, yarn: the pretraining length
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0  # yarn
    tie_embeddings: bool = True
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2 checkpoints, ltrain-convert)
    activation_checkpointing: bool = False
    init_std: float = 0.02


def _attention_config() -> type:
    """The `attention` section: the layer pattern, then one section per registered kind
    that has settings (attention.<kind name>), each the kind's own
    dataclass (ltrain.attention.registry)."""
    sections = [(name, kind.config, field(default_factory=kind.config))
                for name, kind in attention_kinds().items() if kind.config is not None]
    cls = make_dataclass("AttentionConfig", [
        # One letter per layer, repeated to n_layers (the kinds' letters), unless
        # `layers` lists every layer's kind by name.
        ("pattern", str, field(default="D")),
        ("layers", Optional[List[str]], field(default=None)),
        *sections,
    ])
    cls.__module__ = __name__  # picklable as ltrain.config.AttentionConfig
    return cls


AttentionConfig = _attention_config()


@dataclass
class ParallelConfig:
    dp: int = -1  # -1: whatever the world size leaves after cp
    cp: int = 1
    cp_impl: str = "ring"  # ring | ulysses
    # auto: balance packed documents' attention work per batch (parallel.balance) when the rows
    # are masked per document, else zigzag | zigzag | documents
    cp_split: str = "auto"
    cp_split_chunks: int = 4  # chunks per rank of the documents split (more: finer balance, more ring tiles)
    zero_stage: int = 0
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 300
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 1234
    log_every: int = 10
    out_dir: str = "outputs"
    run_name: str = "${ltrain_run_id:}"
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True
    ckpt_dir: str = ""  # "": <run dir>/checkpoints, the run dir being Hydra's (hydra.run.dir)
    ckpt_every: int = 100  # 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto (newest complete checkpoint in ckpt_dir, if any) | none | PATH
    init_from: str = ""  # "": random init | a dir written by `ltrain-convert hf-to-ltrain` | a checkpoint step dir (weights only)
    loss_chunk: int = 1024  # tokens per fp32 logits block of the loss (ltrain.loss.chunked_lm_loss)
    peak_tflops: float = 0.0  # one device's peak for MFU; 0: by GPU name (A100/H100/H200 bf16), none on CPU


@dataclass
class TrackingConfig:
    backend: str = "console"  # console | wandb | none
    project: str = "ltrain"
    mode: str = "offline"  # wandb: offline (no network, no account) | online
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


CHOICES = {
    "model.rope_scaling": ("none", "linear", "ntk", "llama3", "yarn"),
    "parallel.cp_impl": ("ring", "ulysses"),
    "parallel.cp_split": ("auto", "zigzag", "documents"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "optim.schedule": ("cosine", "constant"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "tracking.backend": ("console", "wandb", "none"),
    "tracking.mode": ("offline", "online"),
}

POSITIVE_INTS = (
    "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.multiple_of", "model.rope_original_max_positions", "parallel.cp", "parallel.cp_split_chunks", "optim.warmup_steps", "trainer.max_steps",
    "trainer.grad_accum", "trainer.log_every", "trainer.keep_last", "trainer.loss_chunk",
)
NON_NEGATIVE = ("model.ffn_dim", "optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio", "trainer.ckpt_every",
                "trainer.peak_tflops")
POSITIVE = ("model.norm_eps", "model.rope_base", "model.rope_factor", "model.rope_low_freq_factor",
            "model.rope_beta_slow", "model.init_std", "optim.lr")


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _fail(key: str, value, allowed: str) -> None:
    raise config_error(key, value, allowed)


def run_id() -> str:
    """One run name shared by every rank, so all ranks write one output dir.

    `${now:}` would resolve per rank (docs/field_notes.md#hydra-with-torchrun); the launcher's job or
    rendezvous id, or the torchrun agent's pid on one node, is common to all.
    """
    if os.environ.get("LTRAIN_RUN_ID"):
        return os.environ["LTRAIN_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv != "none":
        return f"torchrun-{rdzv}"
    if "LOCAL_RANK" in os.environ:
        return f"torchrun-{os.uname().nodename}-{os.getppid()}"
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


# trainer.precision: every attention kind and path (kernels, ring / Ulysses / LASP-2, the loss) is
# validated in fp32 and bf16 (benchmarks/bf16_training.py); why the other settings are refused.
PRECISION_REFUSED = {
    "fp16": "fp16 is refused: lightning attention's outputs and gradients are unnormalised sums over the sequence "
            "that can exceed fp16's range (65504), and DeepSpeed's fp16 loss scaling is not validated with the "
            "softmax kernels; use bf16 (fp32's range)",
    "fp64": "fp64 is refused: every attention kernel computes in fp32 (fp64 would silently get fp32 accuracy); "
            "use fp32",
}
PRECISION_ALIASES = {"float16": "fp16", "half": "fp16", "16": "fp16", "float64": "fp64", "double": "fp64", "64": "fp64"}


def _validate_precision(precision: str) -> None:
    allowed = "allowed values are fp32, bf16 (every attention kind; bf16 keeps fp32 master weights and an fp32 loss)"
    if precision not in CHOICES["trainer.precision"]:
        name = PRECISION_ALIASES.get(str(precision).lower(), str(precision).lower())
        why = PRECISION_REFUSED.get(name)
        _fail("trainer.precision", precision, allowed + (f"; {why}" if why else ""))


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Raise ConfigError on the first setting that cannot work."""
    _validate_precision(cfg.trainer.precision)
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            _fail(key, _get(cfg, key), "allowed values are " + ", ".join(map(str, allowed)))
    for key in POSITIVE_INTS:
        if _get(cfg, key) <= 0:
            _fail(key, _get(cfg, key), "must be a positive integer")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            _fail(key, _get(cfg, key), "must be >= 0")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            _fail(key, _get(cfg, key), "must be > 0")

    m = cfg.model
    if m.dim % m.n_heads:
        _fail("model.dim", m.dim, f"must be divisible by model.n_heads={m.n_heads}")
    if (m.dim // m.n_heads) % 2:
        _fail("model.dim", m.dim, "head dim (dim / n_heads) must be even for rotary embeddings")
    if m.rope_high_freq_factor <= m.rope_low_freq_factor:
        _fail("model.rope_high_freq_factor", m.rope_high_freq_factor,
              f"must be > model.rope_low_freq_factor={m.rope_low_freq_factor}")
    if m.rope_beta_fast <= m.rope_beta_slow:
        _fail("model.rope_beta_fast", m.rope_beta_fast, f"must be > model.rope_beta_slow={m.rope_beta_slow}")
    if m.n_heads % m.n_kv_heads:
        _fail("model.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")

    try:
        kinds = set(resolve_layer_kinds(cfg.attention.pattern, cfg.attention.layers, m.n_layers))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    resume = cfg.trainer.resume
    if resume not in ("auto", "none") and not os.path.isdir(resume):
        _fail("trainer.resume", resume, "allowed: auto, none, or an existing checkpoint directory")
    init_from = cfg.trainer.init_from
    if init_from and not (os.path.isfile(os.path.join(init_from, INIT_WEIGHTS))
                          or os.path.isfile(os.path.join(init_from, CHECKPOINT_MANIFEST))):
        _fail("trainer.init_from", init_from, f"must be \"\" (random init), a directory holding {INIT_WEIGHTS} "
              "(written by `ltrain-convert hf-to-ltrain`) or a finished checkpoint step directory "
              "(<run>/checkpoints/step_<N>)")

    # The data checks read files with numpy: loaded here, so the schema imports without it.
    from ltrain.data.memmap import max_token_id, read_meta
    from ltrain.data.tokenizer import BYTE_VOCAB_SIZE
    from ltrain.data.validate import validate_data_config

    try:
        validate_data_config(cfg.data)
    except DataConfigError as exc:
        raise ConfigError(str(exc)) from None
    meta = read_meta(cfg.data.path) if cfg.data.kind == "memmap" else None
    vocab = meta["vocab_size"] if meta else BYTE_VOCAB_SIZE
    if vocab > m.vocab_size:
        _fail("model.vocab_size", m.vocab_size, f"the data's tokenizer has {vocab} tokens; set model.vocab_size >= {vocab}")
    top = max_token_id(cfg.data.path, meta) if meta else -1  # a pass over tokens.bin for older corpora: once
    if top >= m.vocab_size:  # the embedding would raise IndexError mid-step
        _fail("model.vocab_size", m.vocab_size, f"data.path={cfg.data.path} holds token id {top}; "
              f"set model.vocab_size >= {top + 1}")
    _validate_environment(cfg)

    p = cfg.parallel
    world = world_size_from_env() if world_size is None else world_size
    if world % p.cp:
        _fail("parallel.cp", p.cp, f"must divide the world size {world}")
    dp = world // p.cp
    if p.dp not in (-1, dp):
        _fail("parallel.dp", p.dp, f"world size {world} / parallel.cp {p.cp} gives {dp}; set {dp} or -1")
    registered = attention_kinds()
    for name in sorted(kinds):  # each kind checks its own section (and what it needs of model, data, cp)
        if registered[name].validate is not None:
            registered[name].validate(cfg, kinds)
    layer_kinds = [registered[name] for name in sorted(kinds)]
    _validate_documents(cfg, layer_kinds)
    if p.cp > 1:
        _validate_cp_split(cfg, layer_kinds)


def _validate_environment(cfg: TrainConfig) -> None:
    """What the machine must provide, checked on every rank before any process group:
    the device asked for, and a wandb key for an online run."""
    if cfg.trainer.device == "cuda":
        from ltrain.parallel.topology import check_device  # imported only here: megatron is slow to import

        try:
            check_device("cuda", int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.tracking.backend == "wandb" and cfg.tracking.mode == "online":
        from ltrain.tracking import check_wandb_api_key  # ltrain.tracking imports this module

        check_wandb_api_key()


def resolve_run_paths(cfg: TrainConfig, run_dir: str) -> None:
    """trainer.ckpt_dir="" means <run dir>/checkpoints: checkpoints follow hydra.run.dir."""
    if not cfg.trainer.ckpt_dir:
        cfg.trainer.ckpt_dir = os.path.join(run_dir, "checkpoints")


def attention_block(cfg: TrainConfig, layer_kinds: list) -> int:
    """Tokens per attention block that fit every kind the model has (16 tokens at least)."""
    return max([16] + [kind.block_size(cfg) for kind in layer_kinds if kind.block_size is not None])


def _validate_documents(cfg: TrainConfig, layer_kinds: list) -> None:
    """Packed documents (data.doc_boundaries, on by default for packed memmap rows) are
    masked inside the block-sparse kernels, whose blocks must tile the row. A document
    shorter than a block, or than one InfLLM-V2 summary window, is fine (kernels/infllm_v2.py)."""
    n = cfg.data.seq_len
    block = attention_block(cfg, layer_kinds)
    if doc_masking(cfg.data) and n % block:
        _fail("data.seq_len", n, f"packed documents are masked per attention block (data.doc_boundaries): use a "
              f"multiple of {block}, or data.doc_boundaries=false to attend across documents")


def _validate_cp_split(cfg: TrainConfig, layer_kinds: list) -> None:
    """Context parallelism: one split for every layer, whatever its kind (ring / Ulysses /
    LASP-2H for softmax kinds, LASP-2 for linear ones): zigzag's 2 x cp chunks, or the
    documents split's cp x parallel.cp_split_chunks; the chunks hold whole attention
    blocks of every kind the model has (16 tokens at least)."""
    n, cp, p = cfg.data.seq_len, cfg.parallel.cp, cfg.parallel
    block = attention_block(cfg, layer_kinds)
    if p.cp_split == "documents" and not doc_masking(cfg.data):
        _fail("parallel.cp_split", p.cp_split, "balances packed documents, and these rows are not masked per "
              "document: set data.doc_boundaries=true (packed data) or parallel.cp_split=zigzag")
    if document_balance(cfg, block) is not None:
        chunks = cp * p.cp_split_chunks
        if n % (chunks * block):
            _fail("data.seq_len", n, f"must be divisible by parallel.cp x parallel.cp_split_chunks x block_size = "
                  f"{cp} x {p.cp_split_chunks} x {block} = {chunks * block} (the documents split cuts the row into "
                  f"whole attention blocks); change parallel.cp_split_chunks or set parallel.cp_split=zigzag")
    elif n % (2 * cp * block):
        _fail("data.seq_len", n, f"must be divisible by 2 x parallel.cp x block_size = 2 x {cp} x {block} "
              f"= {2 * cp * block} (zigzag split into whole attention blocks)")


def document_balance(cfg: TrainConfig, block: int | None = None) -> tuple[int, int] | None:
    """(chunks per rank, block size) for ltrain.train.shard_batch when the context-parallel split
    balances packed documents (parallel.cp_split: documents, or auto with document masking on and
    cp > 1), else None: zigzag. block: the model's attention block (default: computed)."""
    p = cfg.parallel
    if p.cp == 1 or p.cp_split == "zigzag" or (p.cp_split == "auto" and not doc_masking(cfg.data)):
        return None
    if block is None:
        registered = attention_kinds()
        kinds = set(resolve_layer_kinds(cfg.attention.pattern, cfg.attention.layers, cfg.model.n_layers))
        block = attention_block(cfg, [registered[k] for k in sorted(kinds)])
    return p.cp_split_chunks, block


# Keys that existed once and why they are gone (each kind lists its own): an override of one gets the reason.
REMOVED_KEYS = {f"attention.{name}.{key}": why for name, kind in attention_kinds().items()
                for key, why in kind.removed.items()}


def _schema() -> dict:
    return asdict(TrainConfig())


def _dotted(node: dict, path: str = "") -> list[str]:
    out = []
    for key, val in node.items():
        out.append(f"{path}{key}")
        if isinstance(val, dict):
            out += _dotted(val, f"{path}{key}.")
    return out


def unknown_key(name: str, allowed) -> ConfigError:
    """The one line for a key the schema lacks: the closest known key, or what is allowed there."""
    if name in REMOVED_KEYS:
        return ConfigError(f"{name} is not a setting: {REMOVED_KEYS[name]}; remove the override")
    close = difflib.get_close_matches(name, _dotted(_schema()), n=1, cutoff=0.6)
    hint = f"closest: {close[0]}" if close else "allowed here: " + ", ".join(map(str, allowed))
    return ConfigError(f"{name} is not a setting ({hint}), fix or remove the override")


def check_known_keys(dcfg) -> None:
    """ConfigError for a key the schema lacks (a `+key=...` override would
    otherwise be dropped silently when the config becomes TrainConfig)."""
    schema = _schema()

    def walk(node: dict, ref: dict, path: str) -> None:
        for key, val in node.items():
            name = f"{path}{key}"
            if key not in ref:
                raise unknown_key(name, ref)
            if isinstance(val, dict) and isinstance(ref[key], dict):
                walk(val, ref[key], name + ".")

    from omegaconf import OmegaConf

    walk({k: v for k, v in OmegaConf.to_container(dcfg, resolve=False).items() if k != "hydra"}, schema, "")


def config_groups() -> set[str]:
    """The group names of the conf/ tree (model, attention, ..., experiment)."""
    from importlib.resources import files

    return {p.name for p in files("ltrain.conf").iterdir() if p.is_dir() and not p.name.startswith("__")}


def parse_overrides(args: list[str]) -> list:
    """The command line's key=value / ~key overrides as Hydra parses them, or [] when Hydra's
    parser rejects them (its own error is then the one to show)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(
            [a for a in args if not a.startswith("-") and ("=" in a or a.startswith("~"))])
    except HydraException:
        return []


def check_override_keys(args: list[str]) -> None:
    """ConfigError for a command-line override of a key the schema lacks, with or
    without `+`, before Hydra composes (Hydra's own message for `foo=1` says to
    write `+foo=1`, which would then be dropped). Group choices (`model=small`),
    hydra.* and anything Hydra's parser rejects are left to Hydra."""
    overrides = parse_overrides(args)
    schema, groups = _schema(), config_groups()
    for o in overrides:
        key = o.key_or_group
        root = key.split("/")[0].split(".")[0]
        if o.package is not None or root == "hydra" or (root in groups and "." not in key):
            continue  # Hydra's own settings and group choices (model=small, hydra/launcher=...)
        node = schema
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise unknown_key(key, node if isinstance(node, dict) else [])
            node = node[part]


def register_configs() -> None:
    """Register the schema (typed merge target for conf/) and the run-id resolver."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("ltrain_run_id"):
        OmegaConf.register_new_resolver("ltrain_run_id", run_id, use_cache=True)
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

