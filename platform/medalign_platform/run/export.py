"""``medalign export RUN_DIR --out DIR``: a run's adapter in a form peft loads directly.

``DIR`` holds the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
so ``peft.PeftModel.from_pretrained(base, DIR)`` works), the steer weights when the run
used them (``steer.safetensors``), the run's final predictions and ``medalign.json``
(base model, distillation settings, source checkpoint). :func:`load_exported` rebuilds the
full MedAlign student, steer adapter included.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import TRAINER_STATE, latest_checkpoint
from .filesystems import StoragePath, is_uri, mirror, normalize, relocate

EXPORT_FILE = "medalign.json"


def export_run(run_dir: str | Path, out: str | Path) -> Path | str:
    """Copies the run's latest adapter, steer weights and predictions into ``out``.

    Either may be on remote storage (``s3://...``): a remote run folder is read from a local
    mirror (``$MEDALIGN_CACHE/remote/...``, TensorBoard events left out), and a remote ``out``
    is written locally first and then uploaded.

    Returns:
        ``out`` (a local ``Path``, or the URI as given).
    """
    if is_uri(run_dir) or is_uri(out):
        return _export_remote(str(run_dir), str(out))
    return _export_local(Path(run_dir), Path(out))


def _export_remote(run_dir: str, out: str) -> Path | str:
    source = StoragePath(run_dir)
    if source.is_remote and not (source / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}/config.json missing: export needs the run's resolved config")
    local_run = mirror(source, skip=lambda relative: relative.split("/")[0] == "tensorboard")

    def export_to(folder: Path) -> Path:
        exported = _export_local(local_run, folder)
        info = json.loads((exported / EXPORT_FILE).read_text())  # name the remote checkpoint, not the mirror
        (exported / EXPORT_FILE).write_text(json.dumps(relocate(info, local_run, source), indent=2))
        return exported

    if not is_uri(out):
        return export_to(Path(out))
    with tempfile.TemporaryDirectory(prefix="medalign-export-") as scratch:
        StoragePath(out).upload(export_to(Path(scratch) / "export"), replace=True)
    return normalize(out)


def _export_local(run_dir: Path, out: Path) -> Path:
    """:func:`export_run` between local folders."""
    checkpoint = latest_checkpoint(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} missing: export needs the run's resolved config")
    config = json.loads(config_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for item in (checkpoint / "adapter").iterdir():
        shutil.copy2(item, out / item.name)
    for name in ("steer.safetensors", "predictions.json"):
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
    step = json.loads((checkpoint / TRAINER_STATE).read_text())["step"]
    (out / EXPORT_FILE).write_text(json.dumps({
        "base_model": config["model"]["path"],
        "distill": config["distill"],
        "lora": config["lora"],
        "step": step,
        "source_checkpoint": str(checkpoint),
    }, indent=2))
    return out


def load_exported(export_dir: str | Path, base_model: str | None = None):
    """Loads base model + exported adapter (+ steer) for inference.

    Returns:
        ``(model, processor, tap)``; ``tap`` applies the steer adapter at its layer (None
        when the run had no steer adapter).
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    from ..core.student import SteerSettings, attach_steer, load_student
    from ..core.tap import DistillationTap

    export_dir = Path(export_dir)
    info = json.loads((export_dir / EXPORT_FILE).read_text())
    base, processor = load_student(base_model or info["base_model"])
    model = PeftModel.from_pretrained(base, str(export_dir))
    tap = None
    steer_settings = SteerSettings.from_dict(info["distill"].get("steer", {}))
    if steer_settings.mode != "off":
        steer = attach_steer(model, steer_settings)
        steer.load_state_dict(load_file(export_dir / "steer.safetensors"))
        tap = DistillationTap(model, info["distill"]["layer"], steer=steer, capture_attention=False)
    model.eval()
    return model, processor, tap
