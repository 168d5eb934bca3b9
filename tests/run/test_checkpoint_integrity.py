"""Checkpoints are written atomically and verified by checksum: a full disk, a kill or an in-place
rewrite never leaves a folder that resume or export would use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medalign_platform.run.checkpoint import (MANIFEST, CheckpointError, IncompleteCheckpointWarning,
                                              latest_checkpoint, load_checkpoint, save_checkpoint, seal_checkpoint,
                                              verify_checkpoint)

@pytest.fixture(scope="module")
def trained(tiny_student_dir):
    """The tiny student with LoRA, an AdamW and its schedule after one step."""
    import torch
    from medalign_platform.core.student import LoraSettings, apply_lora, load_student
    from medalign_platform.run.optimization import cosine_schedule

    torch.manual_seed(0)
    model, _ = load_student(str(tiny_student_dir))
    model = apply_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trained = (model, optimizer, cosine_schedule(optimizer, 1, 10))
    _step(trained)
    return trained


def _save(run: Path, step: int, trained) -> Path:
    model, optimizer, scheduler = trained
    folder = save_checkpoint(run / f"checkpoint_{step:06d}", model, None, optimizer, scheduler,
                             {"step": step, "evaluations": [step]})
    (folder / "predictions.json").write_text(json.dumps({"val": [{"id": "a", "prediction": "yes"}]}))
    return seal_checkpoint(folder)  # what the runner does before a checkpoint is reported


def test_a_saved_checkpoint_is_sealed_with_every_file_and_its_sha256(tmp_path, trained):
    folder = _save(tmp_path, 2, trained)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(files) == on_disk and "predictions.json" in files and "rng.safetensors" in files
    assert all(len(entry["sha256"]) == 64 and entry["size"] == (folder / name).stat().st_size
               for name, entry in files.items())
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary sibling left behind
    verify_checkpoint(folder)
    state = load_checkpoint(folder, *trained[:1], None, *trained[1:])
    assert state["step"] == 2


def test_a_full_disk_during_a_save_leaves_no_checkpoint_folder(tmp_path, trained):
    """A real write failure in the middle of the second save (a forked child lowers its file-size
    limit, so the kernel refuses the write with EFBIG): only the first checkpoint exists afterwards."""
    import os
    import resource
    import signal

    model, optimizer, scheduler = trained
    save_checkpoint(tmp_path / "checkpoint_000002", model, None, optimizer, scheduler, {"step": 2, "evaluations": [2]})
    pid = os.fork()
    if pid == 0:  # the child: fail the save, report how it ended through the exit status
        status = 3
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of killing us
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
            save_checkpoint(tmp_path / "checkpoint_000004", model, None, optimizer, scheduler,
                            {"step": 4, "evaluations": [2, 4]})
            status = 1  # saved: the limit did not bite
        except BaseException:  # noqa: BLE001 - the expected failure
            status = 0
        finally:
            os._exit(status)
    _, code = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(code) == 0, "the save in the child did not fail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000002"]  # no partial or temporary folder
    assert latest_checkpoint(tmp_path).name == "checkpoint_000002"


def _step(trained) -> None:
    """One more optimiser step: the next checkpoint's optimiser state differs from the last one's."""
    model, optimizer, scheduler = trained
    loss = sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _corrupt_cases(newer: Path, older: Path) -> dict:
    return {
        "0-byte rng.safetensors": lambda: (newer / "rng.safetensors").write_bytes(b""),
        "truncated trainer_state.json": lambda: (newer / "trainer_state.json").write_text('{"step": 4, "evalu'),
        # a folder rewritten in place, file by file: one file is already the other checkpoint's (same size)
        "half old, half new": lambda: shutil.copy2(older / "optimizer.pt", newer / "optimizer.pt"),
        "missing adapter": lambda: (newer / "adapter" / "adapter_model.safetensors").unlink(),
    }


@pytest.mark.parametrize("case", ["0-byte rng.safetensors", "truncated trainer_state.json", "half old, half new",
                                  "missing adapter"])
def test_an_incomplete_checkpoint_is_skipped_with_a_warning_and_never_exported(tmp_path, trained, case):
    from medalign_platform.run.export import EXPORT_FILE, export_run

    run = tmp_path / "run"
    older = _save(run, 2, trained)
    _step(trained)
    newer = _save(run, 4, trained)
    (run / "config.json").write_text(json.dumps({"model": {"path": "m"}, "distill": {}, "lora": {}}))
    _corrupt_cases(newer, older)[case]()
    with pytest.raises(CheckpointError, match=str(newer)):
        verify_checkpoint(newer)
    with pytest.warns(IncompleteCheckpointWarning, match="checkpoint_000004"):
        assert latest_checkpoint(run) == older
    with pytest.warns(IncompleteCheckpointWarning):
        out = export_run(run, tmp_path / "export")
    assert json.loads((out / EXPORT_FILE).read_text())["step"] == 2
    with pytest.raises(CheckpointError):
        load_checkpoint(newer, trained[0], None, *trained[1:])


def test_a_checkpoint_written_before_manifests_existed_still_loads(tmp_path, trained):
    folder = _save(tmp_path, 2, trained)
    (folder / MANIFEST).unlink()
    verify_checkpoint(folder)  # every needed file there and non-empty
    (folder / "rng.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="rng.safetensors is missing or empty"):
        verify_checkpoint(folder)


def test_a_restarted_ray_train_worker_resumes_from_the_newest_complete_checkpoint_of_its_run(tmp_path, trained):
    """Ray persists a reported checkpoint before its controller records it: a worker that dies in
    between must not make the next attempt redo those steps (nor use a half-copied folder)."""
    from types import SimpleNamespace

    from medalign_platform.run.ray_train import resume_source

    run = tmp_path / "run"
    recorded = _save(run, 2, trained)
    _step(trained)
    newer = _save(run, 4, trained)
    partial = run / "checkpoint_2030-01-01_00-00-00.000000"  # a copy cut short by the kill
    shutil.copytree(newer, partial)
    (partial / "trainer_state.json").write_text(json.dumps({"step": 6}))

    def ray_checkpoint(folder: Path):
        return SimpleNamespace(path=str(folder), filesystem=SimpleNamespace(type_name="local"),
                               to_directory=lambda target: str(folder))

    scratch = tmp_path / "scratch"
    with pytest.warns(IncompleteCheckpointWarning, match=partial.name):
        assert resume_source(ray_checkpoint(recorded), run)(scratch) == newer
    with pytest.warns(IncompleteCheckpointWarning):
        assert resume_source(None, run)(scratch) == newer  # Ray recorded none at all
    shutil.rmtree(partial)
    assert resume_source(ray_checkpoint(newer), run)(scratch) == newer  # Ray's own, copied as before
    assert resume_source(None, tmp_path / "fresh") is None
