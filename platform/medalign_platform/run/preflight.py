"""``medalign check``: a preflight that loads no weights, and the per-trial GPU memory estimate.

What it checks, in order, before any Ray resource or weight is touched:

1. the composed config is typed and its paths checked (:class:`~medalign_platform.run.settings.RunSettings`:
   keys, ranges, files, layer range);
2. the student's ``config.json`` (read from disk or the local HF cache) is a transformers
   LLaVA with a vision grid, an image token, and the layout a preset declares
   (``model.grid``, ``model.vision_feature_layer``); ``data.max_length`` holds its image tokens;
3. the teacher's config (open_clip ``local-dir`` / ``hf-hub`` / config name, or a
   transformers ``CLIPModel``) gives a ViT grid; it is mapped onto the student's grid
   (e.g. 14x14 -> 24x24, bilinear); ``teacher.attention: prompt_aware`` needs a text tower;
4. dtype and attention implementation fit the device (``flash_attention_2`` needs the
   package and a half-precision model; ``eager`` materialises every layer's attention);
5. the per-trial GPU memory (:func:`estimate_memory`) with and without gradient
   checkpointing, and how many trials fit on each GPU (:func:`check_trial_fits`, also what
   ``medalign sweep`` runs before Ray starts).

The memory model is :mod:`medalign_platform.run.memory`; the estimate lands within a few percent
of measured peaks (``docs/models.md``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch

from ..common.errors import ConfigError
from .memory import GIB, MemoryEstimate, build_meta_model, estimate_memory, student_grid
from ..common.settings import Settings, setting
from .settings import RunSettings

__all__ = [
    "GPU_MEMORY_GIB",
    "MemoryEstimate",
    "PreflightReport",
    "CheckOptions",
    "check_trial_fits",
    "estimate_memory",
    "estimate_for_config",
    "local_gpus",
    "run_preflight",
    "student_config",
    "teacher_layout",
]

#: Kept free on every GPU for the CUDA context, cuBLAS workspaces and fragmentation.
GPU_RESERVE_GIB = 1.5
#: Nominal total memory (GiB, as nvidia-smi reports it) of common cards, used when the
#: cluster's GPUs are not given (``check.gpus``) or visible from the driver.
GPU_MEMORY_GIB = {"A10-24GB": 22.5, "L40S-48GB": 45.0, "A100-40GB": 40.0, "A100-80GB": 80.0, "H100-80GB": 79.6,
                  "H200-141GB": 140.4}


# --------------------------------------------------------------------------- configs on disk


def student_config(path: str):
    """The student's transformers config, read without weights (local folder or HF cache).

    Raises:
        ConfigError: no config, an original-layout LLaVA that needs ``medalign convert``,
            or not a LLaVA-family model.
    """
    from transformers import AutoConfig

    local = Path(str(path)).expanduser()
    raw = json.loads((local / "config.json").read_text()) if (local / "config.json").is_file() else None
    if raw is not None and raw.get("model_type", "").startswith("llava_"):
        raise ConfigError(f"model.path={path}: model_type={raw['model_type']!r} is the original LLaVA layout, which "
                          f"transformers cannot load; convert it first: medalign convert llava-med {path} OUT "
                          "VISION_TOWER, then point model.path at OUT")
    try:
        config = AutoConfig.from_pretrained(str(local) if raw is not None else str(path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.path={path}: no config.json on disk or in the local Hugging Face cache "
                          f"({str(error).splitlines()[0]}); download the model (huggingface-cli download {path}) or "
                          "fix the path") from error
    if not hasattr(config, "vision_config") or not hasattr(config, "text_config"):
        raise ConfigError(f"model.path={path}: {type(config).__name__} is not a LLaVA-family config "
                          "(it needs a vision_config and a text_config)")
    return config


def _hub_file(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def _open_clip_layout(model_cfg: dict) -> dict:
    """Grid, width and parameter count of an open_clip vision tower, built on the meta device."""
    import open_clip
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"])
    vision_cfg.pop("timm_model_pretrained", None)
    with torch.device("meta"):
        visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))
    if hasattr(visual, "trunk"):
        grid, width = tuple(visual.trunk.patch_embed.grid_size), int(visual.trunk.embed_dim)
    elif hasattr(visual, "grid_size"):
        grid, width = tuple(visual.grid_size), int(visual.transformer.width)
    else:
        raise ConfigError(f"the teacher's vision tower {type(visual).__name__} is not a ViT; MedAlign needs a CLS ViT")
    del open_clip
    return {"grid": (int(grid[0]), int(grid[1])), "width": width,
            "params": sum(p.numel() for p in visual.parameters())}


def teacher_layout(teacher: dict) -> dict:
    """What the teacher config says, without weights: ``kind``, ``grid``, ``width``,
    ``params`` (vision tower), ``has_text`` and ``source`` (the file read).

    Raises:
        ConfigError: a missing file, or a config that is not in the local cache.
    """
    from ..core.teacher import HF_CLIP_PREFIX, LOCAL_DIR_PREFIX

    name = str(teacher.get("name") or "")
    if teacher.get("factory"):   # built in code (e.g. SynthMed's oracle): ask the teacher itself
        from .evaluation import build_teacher
        from .settings import TeacherSettings

        built = build_teacher(TeacherSettings.from_dict(dict(teacher)))
        return {"kind": f"{type(built).__name__} ({teacher['factory']})", "grid": tuple(built.grid),
                "width": int(built.width), "params": 0, "has_text": bool(getattr(built, "has_text", False)),
                "source": str(teacher["factory"])}
    if name.startswith(HF_CLIP_PREFIX):
        source = name[len(HF_CLIP_PREFIX):]
        local = Path(source).expanduser() / "config.json"
        path = local if local.is_file() else _hub_file(source, "config.json")
        if path is None:
            raise ConfigError(f"teacher.name={name}: no config.json at {local} nor in the local HF cache; download it "
                              f"(huggingface-cli download {source}) or fix the path")
        vision = json.loads(path.read_text())["vision_config"]
        side = int(vision["image_size"]) // int(vision["patch_size"])
        return {"kind": "transformers CLIPModel", "grid": (side, side), "width": int(vision["hidden_size"]),
                "params": None, "has_text": True, "source": str(path)}
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser() / "open_clip_config.json"
        if not path.is_file():
            raise ConfigError(f"teacher.name={name}: {path} does not exist")
        config = json.loads(path.read_text())
    elif name.startswith("hf-hub:"):
        path = _hub_file(name[len("hf-hub:"):], "open_clip_config.json")
        if path is None:
            raise ConfigError(f"teacher.name={name}: open_clip_config.json is not in the local HF cache (the hub is "
                              f"offline); download it (huggingface-cli download {name[7:]}) or use local-dir:PATH")
        config = json.loads(path.read_text())
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ConfigError(f"teacher.name={name!r} is not an open_clip config name, local-dir:, hf-hub: or hf-clip:")
        config, path = {"model_cfg": model_cfg}, f"open_clip config {name}"
    model_cfg = config["model_cfg"]
    layout = _open_clip_layout(model_cfg)
    text_cfg = model_cfg.get("text_cfg", {})
    has_text = (config.get("medalign") or {}).get("text_tower", "present") != "absent"
    hf_text = text_cfg.get("hf_model_name")
    if has_text and hf_text and hf_text.startswith("/") and not (Path(hf_text) / "config.json").is_file():
        raise ConfigError(f"teacher {name}: its text tower config {hf_text}/config.json is missing (the folder moved?); "
                          "re-run medalign convert or fix hf_model_name in open_clip_config.json")
    kind = "open_clip + timm ViT" if "timm_model_name" in model_cfg["vision_cfg"] else "open_clip ViT"
    return {"kind": kind, **layout, "has_text": has_text, "source": str(path)}


# --------------------------------------------------------------------------- the run config


def compute_dtype_of(settings: RunSettings) -> tuple[str, str]:
    """``(weight dtype, activation dtype)`` of a run on GPU."""
    weight, precision = settings.model.dtype, settings.trainer.precision
    if weight == "auto":  # what a GPU run loads (torch_dtype)
        weight = "bfloat16"
    if weight in ("bfloat16", "float16"):
        return weight, weight
    return weight, "float32" if precision == "fp32" else "bfloat16"


def estimate_for_config(settings: RunSettings, *, batch_size: int | None = None,
                        gradient_checkpointing: bool | None = None, student=None, meta_model=None) -> MemoryEstimate:
    """:func:`estimate_memory` for a run's settings (model, LoRA, steer, trainer, data)."""
    student = student if student is not None else student_config(settings.model.path)
    weight, compute = compute_dtype_of(settings)
    return estimate_memory(
        student, lora=settings.lora, steer_mode=settings.distill.steer.mode, steer_rank=settings.distill.steer.rank,
        batch_size=batch_size or settings.trainer.batch_size, seq_len=settings.data.max_length,
        weight_dtype=weight, compute_dtype=compute,
        gradient_checkpointing=(settings.trainer.gradient_checkpointing if gradient_checkpointing is None
                                else gradient_checkpointing),
        attn_implementation=settings.model.attn_implementation,
        capture_attention=settings.distill.lambda_attn > 0, meta_model=meta_model,
    )


def local_gpus() -> list[tuple[str, float]]:
    """``(name, total GiB)`` of the GPUs this process sees (none on a CPU driver)."""
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory / GIB)
            for i in range(torch.cuda.device_count())]


def parse_gpus(value) -> list[tuple[str, float]]:
    """``check.gpus`` / ``ray.gpu_memory_gib``: numbers (GiB) or names from :data:`GPU_MEMORY_GIB`."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    gpus = []
    for item in values:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0:
            gpus.append((f"{item:g} GiB GPU", float(item)))
        elif isinstance(item, str) and item in GPU_MEMORY_GIB:
            gpus.append((item, GPU_MEMORY_GIB[item]))
        else:
            raise ConfigError(f"GPU {item!r}: give its memory in GiB (e.g. 80) or one of {sorted(GPU_MEMORY_GIB)}")
    return gpus


def trials_per_gpu(estimate: MemoryEstimate, gpu_gib: float) -> int:
    return max(0, math.floor((gpu_gib - GPU_RESERVE_GIB) / estimate.gib()))


def check_trial_fits(settings: RunSettings, trial_resources: dict | None, cluster_gpus) -> list[str]:
    """Problems (empty when it fits) with running one trial of ``config`` on its GPU share.

    A trial gets ``trial_resources["GPU"]`` of a GPU (a fraction, or whole GPUs per worker);
    it fits when the estimated peak is below that share of the smallest GPU, less
    :data:`GPU_RESERVE_GIB`. Each problem names the fix: ``sweep.trial_resources.GPU``,
    ``trainer.batch_size`` or ``trainer.gradient_checkpointing``.

    Args:
        settings: the run settings of a trial.
        trial_resources: e.g. ``{"CPU": 1, "GPU": 0.5}`` (None: ``ray.resources_per_worker``).
        cluster_gpus: ``[(name, GiB), ...]``, GiB numbers, or names (see :func:`parse_gpus`);
            empty: nothing to check against.
    """
    resources = dict(trial_resources or settings.ray.resources_per_worker or {})
    share = float(resources.get("GPU", 1 if settings.ray.use_gpu else 0) or 0)
    gpus = [g if isinstance(g, tuple) else parse_gpus(g)[0] for g in (cluster_gpus or [])]
    if share <= 0 or not gpus:
        return []
    student = student_config(settings.model.path)
    meta = build_meta_model(student)
    estimate = estimate_for_config(settings, student=student, meta_model=meta)
    name, smallest = min(gpus, key=lambda g: g[1])
    capacity = share * (smallest - GPU_RESERVE_GIB) if share < 1 else smallest - GPU_RESERVE_GIB
    if estimate.gib() <= capacity:
        return []
    fixes = []
    needed = estimate.gib() / (smallest - GPU_RESERVE_GIB)
    if share < 1 and needed <= 1:
        fraction = next(f for f in (0.125, 0.25, 1 / 3, 0.5, 1.0) if f >= needed)
        fixes.append(f"sweep.trial_resources.GPU={fraction:.3g} ({int(1 / fraction)} trial(s) per GPU)")
    batch = estimate.batch_size
    while batch > 1:
        batch //= 2
        smaller = estimate_for_config(settings, batch_size=batch, student=student, meta_model=meta)
        if smaller.gib() <= capacity:
            fixes.append(f"trainer.batch_size={batch} (with trainer.grad_accum x{estimate.batch_size // batch} to keep "
                         f"the effective batch; ~{smaller.gib():.1f} GiB)")
            break
    if not estimate.gradient_checkpointing:
        ckpt = estimate_for_config(settings, gradient_checkpointing=True, student=student, meta_model=meta)
        if ckpt.gib() <= capacity:
            fixes.append(f"trainer.gradient_checkpointing=true (~{ckpt.gib():.1f} GiB; a step takes ~1.5x as long, "
                         "measured on an H200 at 7B batch 8)")
    fix_text = "; or ".join(fixes) if fixes else "a GPU with more memory (no listed setting fits)"
    return [f"a trial needs ~{estimate.describe()}, but gets {share:g} x {smallest:.0f} GiB ({name}) less "
            f"{GPU_RESERVE_GIB} GiB reserve = {capacity:.1f} GiB. Fix: {fix_text}."]


# --------------------------------------------------------------------------- the report


@dataclass
class PreflightReport:
    """What ``medalign check`` prints: facts, warnings and problems (problems fail the check)."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    estimates: dict[str, MemoryEstimate] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        out += [f"warning: {w}" for w in self.warnings]
        out += [f"PROBLEM: {p}" for p in self.problems]
        out.append("preflight: OK" if self.ok else f"preflight: {len(self.problems)} problem(s)")
        return "\n".join(out)


def _check_dtype_and_attention(settings: RunSettings, report: PreflightReport) -> None:
    use_gpu, dtype = settings.ray.use_gpu, settings.model.dtype
    if dtype == "auto":  # what the workers load (core.student.torch_dtype)
        dtype = "bfloat16" if use_gpu else "float32"
    implementation, precision = settings.model.attn_implementation, settings.trainer.precision
    if implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            report.problems.append("model.attn_implementation=flash_attention_2 but the flash_attn package is not "
                                   "installed; use sdpa (the tap works with it) or install flash-attn")
        if dtype == "float32":
            report.problems.append("flash_attention_2 needs half-precision weights: set model.dtype=bfloat16")
        if not use_gpu:
            report.problems.append("flash_attention_2 runs on GPUs only: set ray.use_gpu=true or use sdpa")
    if implementation == "eager":
        report.warnings.append("model.attn_implementation=eager materialises [heads, T, T] per layer for backward; "
                               "sdpa gives the same tap values at a fraction of the memory")
    if use_gpu and dtype == "float32":
        report.warnings.append("model.dtype=float32 on GPU keeps fp32 weights (4 bytes/parameter) plus bf16 autocast "
                               "copies; model.dtype=bfloat16 halves the weights")
    if use_gpu and dtype == "float16":
        report.warnings.append("model.dtype=float16: activations can overflow without loss scaling; prefer bfloat16")
    if not use_gpu and dtype != "float32":
        report.warnings.append(f"model.dtype={dtype} on CPU is slow (no bf16 matmul kernels on most CPUs)")
    if precision == "fp32" and use_gpu and dtype == "float32":
        report.warnings.append("trainer.precision=fp32 on GPU: activations in fp32 take twice the memory of bf16")


def run_preflight(settings: RunSettings, gpus=None, trial_resources: dict | None = None) -> PreflightReport:
    """Runs every check on a run's settings (see the module docstring); loads no weights.

    Args:
        settings: the typed run config (its paths are checked here).
        gpus: ``[(name, GiB), ...]`` or GiB numbers / names to fit trials on; default: the
            GPUs this process sees, else ``ray.gpu_memory_gib``, else a reference table.
        trial_resources: a sweep's ``sweep.trial_resources`` to check a trial's share against.
    """
    report = PreflightReport()
    try:
        settings.check_paths()
    except ConfigError as error:
        report.problems.append(str(error))
        return report
    model_cfg, teacher_cfg = settings.model, settings.teacher
    try:
        student = student_config(model_cfg.path)
    except ConfigError as error:
        report.problems.append(str(error))
        return report
    text = student.text_config
    grid = student_grid(student)
    image_tokens = grid[0] * grid[1]
    report.lines.append(
        f"student: {model_cfg.path} ({text.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
        f"vision {student.vision_config.model_type} {student.vision_config.image_size}px/"
        f"{student.vision_config.patch_size} -> {grid[0]}x{grid[1]} = {image_tokens} image tokens, feature layer "
        f"{student.vision_feature_layer}, {student.vision_feature_select_strategy})")
    declared = model_cfg.grid
    if declared is not None and tuple(declared) != grid:
        report.problems.append(f"model.grid={list(declared)} but the checkpoint's vision tower gives "
                               f"{grid[0]}x{grid[1]}; fix the preset or model.path")
    declared_layer = model_cfg.vision_feature_layer
    if declared_layer is not None and declared_layer != student.vision_feature_layer:
        report.problems.append(f"model.vision_feature_layer={declared_layer} but the checkpoint uses "
                               f"{student.vision_feature_layer}")
    max_length = settings.data.max_length
    if max_length <= image_tokens + 8:
        report.problems.append(f"data.max_length={max_length} cannot hold the {image_tokens} image tokens of this "
                               f"student plus a prompt and an answer; raise it (e.g. {image_tokens + 448})")
    report.lines.append(f"distillation: layer {settings.distill.layer} of 1..{text.num_hidden_layers - 1}, "
                        f"lambda_align {settings.distill.lambda_align}, lambda_attn {settings.distill.lambda_attn}, "
                        f"token_weights {settings.distill.token_weights}")

    try:
        teacher = teacher_layout(teacher_cfg.to_dict())
    except ConfigError as error:
        report.problems.append(str(error))
        teacher = None
    if teacher is not None:
        t_grid = teacher["grid"]
        factor = grid[0] / t_grid[0]
        mapping = ("same grid, no resize" if t_grid == grid else
                   f"bilinear {'up' if factor > 1 else 'down'}sampling x{factor:.2f}")
        params = f", {teacher['params'] / 1e6:.0f}M vision parameters" if teacher.get("params") else ""
        report.lines.append(f"teacher: {teacher_cfg.name} ({teacher['kind']}, width {teacher['width']}{params}, "
                            f"text tower {'yes' if teacher['has_text'] else 'no'}); grid {t_grid[0]}x{t_grid[1]} -> "
                            f"student {grid[0]}x{grid[1]} ({mapping})")
        mode = teacher_cfg.attention
        if mode == "prompt_aware" and not teacher["has_text"]:
            report.problems.append(f"teacher.attention=prompt_aware but {teacher_cfg.name} has no text tower; set "
                                   "teacher.attention=cls or convert the teacher with its text encoder")
        report.lines.append(f"teacher attention: {mode} ({'per image and question' if mode == 'prompt_aware' else 'per image'})")
    _check_dtype_and_attention(settings, report)

    meta = build_meta_model(student)
    weight, compute = compute_dtype_of(settings)
    for ckpt in (False, True):
        estimate = estimate_for_config(settings, gradient_checkpointing=ckpt, student=student, meta_model=meta)
        report.estimates["checkpointing" if ckpt else "plain"] = estimate
    plain = report.estimates["plain"]
    report.lines.append(f"parameters: {plain.params_total / 1e9:.3f}B total, {plain.params_trainable / 1e6:.1f}M "
                        f"trainable (LoRA r={settings.lora.rank}, steer {settings.distill.steer.mode}); weights "
                        f"{weight}, activations {compute}, attention {model_cfg.attn_implementation}")
    for key, label in (("plain", "per-trial GPU memory"), ("checkpointing", "  with gradient checkpointing")):
        chosen = " (configured)" if (key == "checkpointing") == settings.trainer.gradient_checkpointing else ""
        report.lines.append(f"{label}: ~{report.estimates[key].describe()}{chosen}")

    if gpus is None:
        gpus = local_gpus() or parse_gpus(settings.ray.gpu_memory_gib)
        reference = not gpus
        gpus = gpus or list(GPU_MEMORY_GIB.items())
    else:
        reference = False
        gpus = [g if isinstance(g, tuple) else parse_gpus(g)[0] for g in gpus]
    configured = report.estimates["checkpointing" if settings.trainer.gradient_checkpointing else "plain"]
    fits = ", ".join(f"{name}: {trials_per_gpu(configured, gib)}" for name, gib in gpus)
    report.lines.append(f"trials per GPU{' (reference cards; give check.gpus=[...] for yours)' if reference else ''}: "
                        f"{fits}")
    if not reference and (trial_resources is not None or settings.ray.use_gpu):
        report.problems += check_trial_fits(settings, trial_resources, gpus)
    return report


@dataclass
class CheckOptions(Settings):
    """The ``check.*`` keys of ``medalign check``."""

    section: ClassVar[str] = "check"

    gpus: list[float | str] | None = setting(None, "GPUs to fit trials on: GiB numbers or names, e.g. [80, H200-141GB]")
