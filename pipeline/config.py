"""Typed, validated configuration: one frozen dataclass per section of params.yaml.

Each stage calls `load(<Section>, ...)` for the sections it reads. Unknown sections, unknown keys, wrong
types and out-of-range values stop the stage with a `ConfigError` that names the key, before anything is
written.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .world import SUBJECT_FIELDS

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A bad value in params.yaml (or a bad input file); the message names the key or the file."""


# ---------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    image_size: int = 32          # pixels; the patch size of `model` must divide it
    seed: int = 0                 # seed of the training subjects, contexts and jitter
    jitter: float = 0.0           # max shift (px) of a target's subject from its nominal position (uniform)
    reference_size: str = "fixed"    # reference drawn at the mean size ("fixed") or at its target's ("target")

    def check(self):
        _choice(self.reference_size, ("target", "fixed"), "world.reference_size")
        _require(self.image_size >= 8, "world.image_size", "must be >= 8")
        _require(self.jitter >= 0, "world.jitter", "must be >= 0")


@dataclass(frozen=True)
class Prepare:
    train_subjects: int = 1500
    targets_per_subject: int = 2
    shard_rows: int = 2000        # rows per Parquet shard
    # Real scale (issue 4): `source: subjects200k` reads Subjects200K instead of rendering the embedded world.
    source: str = "embedded"      # embedded | subjects200k
    subjects200k: str = "Yuanshi/Subjects200K"   # a hub dataset id, or a local Parquet file or folder of them
    collection: str = "collection_2"  # Subjects200K's `collection` column ("" = every collection)
    min_quality: int = 5          # keep pairs whose three quality_assessment scores are all >= this
    subset: int = 5000            # training pairs kept (after the filters, in dataset order; 0 = all)
    val_subset: int = 64          # pairs after the training ones, held out to choose the guidance scale
    image_size: int = 512         # side of the crops written to the manifests (Subjects200K crops are 512)
    padding: int = 8              # Subjects200K's padding around and between the two halves of a pair image
    # Imperfect pairs (embedded world): with probability `target_mismatch` a training target shows its subject with
    # one of `mismatch_fields` (drawn uniformly) changed, as Subjects200K's generated pairs can differ from their
    # reference in a detail; references, the bench and the validation split stay exact. 0 = every pair exact.
    target_mismatch: float = 0.0
    mismatch_fields: list[str] = field(default_factory=lambda: ["mark_corner", "mark_color"])

    SOURCES = ("embedded", "subjects200k")

    def check(self):
        for k in ("train_subjects", "targets_per_subject", "shard_rows", "image_size"):
            _require(getattr(self, k) >= 1, f"prepare.{k}", "must be >= 1")
        _choice(self.source, self.SOURCES, "prepare.source")
        for k in ("min_quality", "subset", "val_subset", "padding"):
            _require(getattr(self, k) >= 0, f"prepare.{k}", "must be >= 0")
        _require(0.0 <= self.target_mismatch <= 1.0, "prepare.target_mismatch", "must be in [0, 1]")
        _require(self.target_mismatch == 0 or self.source == "embedded", "prepare.target_mismatch",
                 "applies to the embedded world only (prepare.source: embedded)")
        _require(bool(self.mismatch_fields), "prepare.mismatch_fields", "must name at least one field")
        _require(len(set(self.mismatch_fields)) == len(self.mismatch_fields), "prepare.mismatch_fields",
                 f"must not repeat a field, got {self.mismatch_fields}")
        for i, f in enumerate(self.mismatch_fields):   # not the class: the prompt names it
            _choice(f, tuple(k for k in SUBJECT_FIELDS if k != "cls"), f"prepare.mismatch_fields[{i}]")


@dataclass(frozen=True)
class Bench:
    seed: int = 12345             # seed of the bench subjects (disjoint from the training subjects)
    subjects: int = 30
    prompts_per_subject: int = 4
    seeds: int = 2                # sampling seeds per (subject, prompt)
    val_seed: int = 4242          # seed of the validation subjects (guidance tuning), disjoint from both
    val_subjects: int = 30
    source: str = "embedded"      # embedded | dreambench (real scale: ../shared/dreambench or dreambench_root)
    dreambench_root: str = ""     # "" = $SFO_DREAMBENCH, else ../shared/dreambench beside the repository

    SOURCES = ("embedded", "dreambench")

    def check(self):
        _choice(self.source, self.SOURCES, "bench.source")
        for k in ("subjects", "prompts_per_subject", "seeds", "val_subjects"):
            _require(getattr(self, k) >= 1, f"bench.{k}", "must be >= 1 (a bench with zero items measures nothing)")


@dataclass(frozen=True)
class Judges:
    seed: int = 777
    train_renders: int = 6000
    val_renders: int = 1000
    batch_size: int = 128
    attr_steps: int = 1500
    dino_steps: int = 600
    dino_near_miss_negatives: bool = False   # each subject's near miss (one identity attribute changed) as a negative
    clip_steps: int = 600
    lr: float = 1e-3
    # Real scale: `source: pretrained` loads DINO and CLIP (hub ids or local paths) instead of training them.
    source: str = "embedded"      # embedded | pretrained
    dino: str = "facebook/dino-vits16"
    clip: str = "openai/clip-vit-base-patch32"   # or openai/clip-vit-large-patch14
    reference_pairing: str = "all"   # DINO / CLIP-I against every reference of the subject ("all") or the first

    SOURCES = ("embedded", "pretrained")
    PAIRINGS = ("all", "first")

    def check(self):
        _choice(self.source, self.SOURCES, "judges.source")
        _choice(self.reference_pairing, self.PAIRINGS, "judges.reference_pairing")
        for k in ("train_renders", "val_renders", "batch_size"):
            _require(getattr(self, k) >= 2, f"judges.{k}", "must be >= 2")
        for k in ("attr_steps", "dino_steps", "clip_steps"):
            _require(getattr(self, k) >= 1, f"judges.{k}", "must be >= 1")
        _positive(self, "judges", "lr")


@dataclass(frozen=True)
class Model:
    """The FluxTransformer2DModel config of the embedded backbone, and its text encoders."""
    patch_size: int = 4           # pixel patch side: tokens are patch_size**2 * 3 values
    num_layers: int = 2           # double-stream blocks
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: list[int] = field(default_factory=lambda: [8, 12, 12])
    position_delta: list[int] = field(default_factory=lambda: [0, -8])  # (row, col) shift of condition tokens
    text_dim: int = 64            # T5 stand-in width (joint_attention_dim)
    pooled_dim: int = 32          # CLIP-text stand-in width (pooled_projection_dim)
    max_text_len: int = 12
    text_seed: int = 0            # seed of the frozen random text encoders
    backbone: str = "embedded"    # embedded: the pixel-patch FLUX built from this section; flux: FLUX.1-dev
    # backbone flux: the diffusers FluxPipeline layout (transformer/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    # scheduler/) as a hub id or a local folder. The transformer's own config replaces the sizes above;
    # patch_size is the 2x2 latent packing, max_text_len the T5 sequence length.
    pretrained: str = "black-forest-labs/FLUX.1-dev"
    gradient_checkpointing: bool = True   # backbone flux, on CUDA

    BACKBONES = ("embedded", "flux")

    def check(self):
        _choice(self.backbone, self.BACKBONES, "model.backbone")
        for k in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "text_dim",
                  "pooled_dim", "max_text_len"):
            _require(getattr(self, k) >= 1, f"model.{k}", "must be >= 1")
        _require(self.num_single_layers >= 0, "model.num_single_layers", "must be >= 0")
        _require(len(self.axes_dims_rope) == 3 and sum(self.axes_dims_rope) == self.attention_head_dim,
                 "model.axes_dims_rope", f"must be 3 numbers summing to attention_head_dim "
                 f"({self.attention_head_dim}), got {self.axes_dims_rope}")
        _require(all(d % 2 == 0 for d in self.axes_dims_rope), "model.axes_dims_rope", "entries must be even")
        _require(len(self.position_delta) == 2, "model.position_delta", "must be [row, col]")


@dataclass(frozen=True)
class Sft:
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 4e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    generic_prompt_prob: float = 0.25   # METHOD.md 8: degraded conditions must stay on-manifold for CDNS
    text_dropout: float = 0.1           # empty prompt (classifier-free guidance's unconditional branch)
    image_dropout: float = 0.0          # a black reference (OminiControl's condition dropout; the paper: 0.1)
    ref_blur_prob: float = 0.0          # blur the reference (target stays sharp): coherent CDNS negatives
    ref_blur_radii: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    timestep_mu: float = 0.0            # logit-normal t = sigmoid(n), n ~ N(mu, sigma)
    timestep_sigma: float = 1.0
    log_every: int = 25
    # backbone flux: the OminiControl LoRA (routed to the condition tokens only), trained, or loaded
    lora_rank: int = 4
    lora_alpha: float = 4.0
    init_lora: str = ""           # a local path or hub id of a released OminiControl LoRA: loaded, not trained
    optimizer: str = "adamw"      # adamw | prodigy (the paper's; `pip install prodigyopt`, lr 1)

    OPTIMIZERS = ("adamw", "prodigy")

    def check(self):
        _choice(self.optimizer, self.OPTIMIZERS, "sft.optimizer")
        _require(self.lora_rank >= 1, "sft.lora_rank", "must be >= 1")
        for k in ("steps", "batch_size", "log_every"):
            _require(getattr(self, k) >= 1, f"sft.{k}", "must be >= 1")
        _positive(self, "sft", "lr", "timestep_sigma", "grad_clip")
        _finite(self, "sft", "timestep_mu", "weight_decay")
        _require(self.warmup_steps >= 0, "sft.warmup_steps", "must be >= 0")
        for k in ("generic_prompt_prob", "text_dropout", "image_dropout", "ref_blur_prob"):
            _require(0 <= getattr(self, k) <= 1, f"sft.{k}", "must be in [0, 1]")
        _require(all(math.isfinite(r) and r >= 0 for r in self.ref_blur_radii), "sft.ref_blur_radii",
                 "must be finite numbers >= 0")


@dataclass(frozen=True)
class Train:
    """Shared by `sft` and `sfo`: resumable training (pipeline/checkpoint.py) and the forward's speed options."""
    checkpoint_every: int = 100   # steps between checkpoints in checkpoints/<stage>/ (the last step needs none)
    compile: str = "auto"         # torch.compile the forward: on, off, or auto (on with CUDA, off on CPU)
    processes: int = 1            # `sft` / `sfo` under `accelerate launch --num_processes N` (DDP); see README
    bf16: str = "auto"            # bf16 autocast of the forward: on, off, or auto (on with CUDA, off on CPU)

    SWITCH = ("auto", "on", "off")

    def check(self):
        _require(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _require(self.processes >= 1, "train.processes", "must be >= 1")
        _choice(self.compile, self.SWITCH, "train.compile")
        _choice(self.bf16, self.SWITCH, "train.bf16")

    def enabled(self, key: str, cuda: bool) -> bool:
        """`on`, or `auto` where CUDA is in use (docs/performance.md: on CPU they gain < 20 % per step)."""
        return getattr(self, key) == "on" or (getattr(self, key) == "auto" and cuda)


@dataclass(frozen=True)
class Sampler:
    """Shared by `guidance`, `cdns` and `evaluate`: negatives are sampled exactly as evaluation samples.
    The guidance scale is not set here: the `guidance` stage chooses it on the validation split."""
    steps: int = 20
    shift: float = 1.0            # time shift of the Euler grid, t' = shift t / (1 + (shift - 1) t)
    batch_size: int = 64

    def check(self):
        _require(self.steps >= 1, "sampler.steps", "must be >= 1")
        _require(self.batch_size >= 1, "sampler.batch_size", "must be >= 1")
        _positive(self, "sampler", "shift")


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance on the text (1 = off), chosen for the SFT base's dino on data/val."""
    scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    seeds: int = 1
    seed: int = 0

    def check(self):
        _require(len(self.scales) >= 1, "guidance.scales", "must list at least one scale")
        _require(all(math.isfinite(s) and s > 0 for s in self.scales), "guidance.scales", "must all be > 0")
        _require(self.seeds >= 1, "guidance.seeds", "must be >= 1")


@dataclass(frozen=True)
class Cdns:
    seed: int = 0
    num_triplets: int = 512       # negatives are made for the first N training triplets (0 = all)
    image: str = "blur"
    text: str = "none"            # the default since the calibration (README): "generic" is the paper's
    blur_radius: float = 2.0      # Gaussian blur radius in pixels at world.image_size
    noise_std: float = 0.3        # `image: noise`: pixel noise std as a fraction of the 0-255 range
    workers: int = 2              # Ray actors (one GPU each where CUDA exists, else one CPU slot each)
    threads_per_worker: int = 1
    shard_rows: int = 64
    ray_address: str = ""         # "" starts a local Ray on loopback; "auto" or host:port joins a cluster

    IMAGE_CHOICES = ("blur", "noise", "semantic", "none")
    TEXT_CHOICES = ("generic", "perturbed", "none")

    def check(self):
        _choice(self.image, self.IMAGE_CHOICES, "cdns.image")
        _choice(self.text, self.TEXT_CHOICES, "cdns.text")
        _require(math.isfinite(self.blur_radius) and self.blur_radius >= 0, "cdns.blur_radius",
                 f"must be a finite number >= 0, got {self.blur_radius}")
        _require(math.isfinite(self.noise_std) and self.noise_std >= 0, "cdns.noise_std", "must be >= 0")
        for k in ("workers", "threads_per_worker", "shard_rows"):
            _require(getattr(self, k) >= 1, f"cdns.{k}", "must be >= 1")
        _require(self.num_triplets >= 0, "cdns.num_triplets", "must be >= 0")


@dataclass(frozen=True)
class Sfo:
    seed: int = 0
    steps: int = 100
    pairs_per_step: int = 16
    lr: float = 5e-4
    lora_rank: int = 16
    lora_alpha: float = 16.0
    timesteps: str = "logit_normal"   # or "uniform" (the paper's Table C)
    timestep_mu: float = 0.0
    timestep_sigma: float = 1.0
    grad_clip: float = 1.0
    log_every: int = 1
    micro_batch: int = 0          # pairs per forward/backward (gradient accumulation); 0 = pairs_per_step at once
    pairs: str = "cdns"           # how (x+, x-) pairs are made: see PAIRS_CHOICES and docs/architecture.md
    direct: bool = False          # train the SFT weights themselves (reference: a frozen copy) instead of a LoRA
    optimizer: str = "adamw"      # adamw | prodigy (the paper's; lr 1)

    TIMESTEP_CHOICES = ("logit_normal", "uniform")
    # cdns: x- from degraded conditions (the method); self_play: x- from the undegraded conditions;
    # sft_additional: a LoRA trained with the SFT loss on the positives alone (the control);
    # judge_dpo: two samples from the undegraded conditions, the one the DINO judge prefers is x+.
    PAIRS_CHOICES = ("cdns", "self_play", "sft_additional", "judge_dpo")

    def check(self):
        _choice(self.timesteps, self.TIMESTEP_CHOICES, "sfo.timesteps")
        _choice(self.pairs, self.PAIRS_CHOICES, "sfo.pairs")
        _choice(self.optimizer, Sft.OPTIMIZERS, "sfo.optimizer")
        for k in ("steps", "pairs_per_step", "log_every"):
            _require(getattr(self, k) >= 1, f"sfo.{k}", "must be >= 1")
        _require(self.lora_rank >= 1, "sfo.lora_rank", f"must be >= 1, got {self.lora_rank}")
        _require(self.micro_batch >= 0, "sfo.micro_batch", "must be >= 0 (0: all pairs of a step at once)")
        _positive(self, "sfo", "lr", "lora_alpha", "timestep_sigma", "grad_clip")
        _finite(self, "sfo", "timestep_mu")


@dataclass(frozen=True)
class Loss:
    beta: float = 1000.0          # METHOD.md 4, for the mean-reduced error
    sft_weight: float = 0.0       # optional SFT term on the positives (0 = the paper's loss)

    def check(self):
        _positive(self, "loss", "beta")
        _require(math.isfinite(self.sft_weight) and self.sft_weight >= 0, "loss.sft_weight",
                 f"must be a finite number >= 0, got {self.sft_weight}")


@dataclass(frozen=True)
class Evaluate:
    seed: int = 0
    grid_subjects: int = 8

    def check(self):
        _require(self.grid_subjects >= 1, "evaluate.grid_subjects", "must be >= 1")


SECTIONS = {"world": World, "prepare": Prepare, "bench": Bench, "judges": Judges, "model": Model, "sft": Sft,
            "train": Train, "sampler": Sampler, "guidance": Guidance, "cdns": Cdns, "sfo": Sfo, "loss": Loss, "evaluate": Evaluate}


# ---------------------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------------------
def read_params(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found (run from the repository root)")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: must be a mapping of sections")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; known sections: {sorted(SECTIONS)}")
    return params


def section(name: str, params: dict):
    """The validated dataclass of section `name` from the parsed params."""
    cls = SECTIONS[name]
    raw = params.get(name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: section '{name}' must be a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) {[f'{name}.{k}' for k in unknown]}; "
                          f"known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{name}.{k}") for k, v in raw.items()}
    cfg = cls(**values)
    cfg.check()
    return cfg


def load(*names: str, path: str | Path = PARAMS_FILE):
    """Validated sections, in the order asked: `world, bench = load("world", "bench")`."""
    params = read_params(path)
    out = tuple(section(n, params) for n in names)
    return out[0] if len(out) == 1 else out


def _coerce(value, hint, key):
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"params.yaml: {key} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params.yaml: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params.yaml: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):   # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"params.yaml: {key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params.yaml: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"params.yaml: {key} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"params.yaml: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")


def _require(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"params.yaml: {key} {msg}")


def _positive(cfg, sec: str, *keys: str):
    for k in keys:
        v = getattr(cfg, k)
        _require(math.isfinite(v) and v > 0, f"{sec}.{k}", f"must be a finite number > 0, got {v}")


def _finite(cfg, sec: str, *keys: str):
    for k in keys:
        _require(math.isfinite(getattr(cfg, k)), f"{sec}.{k}", "must be finite")


def _choice(value: str, choices: tuple, key: str):
    _require(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
