"""model.dtype, gradient checkpointing and torch.compile of the student, with the tap's hooks attached.

The compile tests use a CPU-fast backend (``aot_eager``: dynamo + AOTAutograd, no code
generation; set ``MEDALIGN_TEST_COMPILE_BACKEND=inductor`` to run them with inductor, which
takes minutes per graph on a 2-core machine). Recompiles are a dynamo matter, the same for
every backend.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import make_batch, random_teacher_targets

from medalign_platform.core.objective import DistillSettings, MedAlignObjective
from medalign_platform.core.student import LoraSettings, apply_lora, decoder_layers, load_student, torch_dtype
from medalign_platform.run.acceleration import compile_blocks, eager

BACKEND = os.environ.get("MEDALIGN_TEST_COMPILE_BACKEND", "aot_eager")


def test_auto_dtype_is_bf16_on_a_gpu_and_fp32_on_the_cpu():
    assert torch_dtype("auto", torch.device("cpu")) == torch.float32
    assert torch_dtype("auto") == torch.float32
    assert torch_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert torch_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert torch_dtype("float32", torch.device("cuda")) == torch.float32


def test_the_preflight_reads_auto_as_what_the_workers_load():
    from medalign_platform.run.preflight import PreflightReport, _check_dtype_and_attention, compute_dtype_of
    from medalign_platform.run.settings import RunSettings

    gpu = RunSettings.from_config({"ray": {"use_gpu": True}})
    assert gpu.model.dtype == "auto" and compute_dtype_of(gpu) == ("bfloat16", "bfloat16")
    for settings, warned in ((gpu, False), (RunSettings.from_config({"ray": {"use_gpu": True},
                                                                     "model": {"dtype": "float32"}}), True)):
        report = PreflightReport()
        _check_dtype_and_attention(settings, report)
        assert any("keeps fp32 weights" in w for w in report.warnings) == warned
    report = PreflightReport()
    _check_dtype_and_attention(RunSettings.from_config({}), report)  # auto on a CPU run: float32, no warning
    assert not any("on CPU is slow" in w for w in report.warnings)


def _student(tiny_student_dir, compiled: bool, backend: str = BACKEND):
    model, processor = load_student(tiny_student_dir)
    torch.manual_seed(3)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.train()
    objective = MedAlignObjective(model, DistillSettings(layer=2, lambda_align=1.0, lambda_attn=0.5))
    if compiled:
        compile_blocks(model, backend=backend)
    return model, processor, objective


def _cut(batch: dict, drop: int) -> dict:
    """The batch with its last ``drop`` positions removed (another sequence length, same answers' start)."""
    return {k: (v[:, : v.shape[1] - drop] if k != "pixel_values" else v) for k, v in batch.items()}


def _steps(model, processor, objective, images, drops):
    batch = make_batch(processor, images, "right")
    results = []
    for drop in drops:
        terms = objective(_cut(batch, drop), random_teacher_targets(3, grid=(4, 4)))
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results.append(({k: float(v.detach()) for k, v in terms.items()}, grads))
    return results


@pytest.mark.slow
def test_compiled_and_eager_losses_and_gradients_agree(tiny_student_dir, random_images):
    torch._dynamo.reset()
    eager_results = _steps(*_student(tiny_student_dir, compiled=False), random_images, drops=(0,))
    compiled_results = _steps(*_student(tiny_student_dir, compiled=True), random_images, drops=(0,))
    torch._dynamo.reset()
    for (terms_e, grads_e), (terms_c, grads_c) in zip(eager_results, compiled_results):
        assert terms_c["attention"] > 0 and terms_c["spatial"] > 0  # the hooks ran inside the compiled block
        for key in ("loss", "lm", "spatial", "attention"):
            assert terms_c[key] == pytest.approx(terms_e[key], rel=1e-4, abs=1e-6), key
        for name in grads_e:
            assert torch.allclose(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-6), name


@pytest.mark.slow
def test_the_taps_hooks_cause_no_recompiles_per_step(tiny_student_dir, random_images):
    """After the first two sequence lengths (static, then dynamic) no step compiles anything."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, processor, objective = _student(tiny_student_dir, compiled=True, backend="eager")
    reference_model, _, reference = _student(tiny_student_dir, compiled=False)
    batch = make_batch(processor, random_images, "right")
    graphs = []
    for drop in (0, 1, 2, 3):
        cut = _cut(batch, drop)
        terms = objective(cut, random_teacher_targets(3, grid=(4, 4)))
        terms["loss"].backward()
        graphs.append(counters["stats"]["unique_graphs"])
        with torch.no_grad():
            expected = reference(cut, random_teacher_targets(3, grid=(4, 4)))
        assert float(terms["attention"]) == pytest.approx(float(expected["attention"]), rel=1e-5)
    assert graphs[0] > 0 and graphs[1] > graphs[0]
    assert graphs[2:] == [graphs[1]] * 2, graphs
    # Block L has its own graph (hook guards): without them it would reuse an unhooked block's
    # graph and the attention capture would silently vanish.
    assert torch._dynamo.config.skip_nnmodule_hook_guards is False
    # Evaluation runs eagerly: generate() compiles nothing, whatever its lengths.
    before = counters["stats"]["unique_graphs"]
    prompts = make_batch(processor, random_images, "left", with_answers=False)
    model.eval()
    with torch.no_grad(), eager():
        tokens = model.generate(**prompts, max_new_tokens=3, do_sample=False)
    assert counters["stats"]["unique_graphs"] == before and tokens.shape[0] == 3
    objective.tap.pop()
    torch._dynamo.reset()


# --------------------------------------------------------------------------- through the run's settings


@pytest.fixture(scope="module")
def mini_config(tmp_path_factory):
    from medalign_platform.run.compose import compose_config
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    cache = tmp_path_factory.mktemp("medalign_cache")
    prepare_mini_synthmed(cache)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache))
    try:
        yield lambda overrides: compose_config(
            ["experiment=synthmed_vqa", "trainer.batch_size=4", "trainer.max_steps=2", "lora.rank=4",
             "lora.dropout=0.1", "distill.lambda_attn=0.5", "distill.steer.mode=low_rank", "distill.steer.rank=4",
             "trainer.data_workers=0", *overrides])
    finally:
        patch.undo()


def _built(config):
    from medalign_platform.run.loop import RunContext, build_run
    from medalign_platform.run.settings import RunSettings

    return build_run(RunSettings.from_config(config), RunContext(report=lambda m, c: None))


@pytest.mark.slow
def test_bf16_student_keeps_fp32_adapters_trains_and_evaluates_in_bf16(mini_config):
    from medalign_platform.data.splits import evaluation_items, load_split
    from medalign_platform.run.evaluation import evaluate_items
    from medalign_platform.run.loop import train_step

    parts = _built(mini_config(["model.dtype=bfloat16", "trainer.gradient_checkpointing=true"]))
    model = parts.model
    assert parts.dtype == torch.bfloat16
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}  # LoRA and steer stay fp32
    assert parts.objective.steer.up.dtype == torch.float32
    assert model.is_gradient_checkpointing
    batches = iter(parts.micro_batches(0, 1))
    terms, grad_norm, samples = train_step(parts, batches, 0)
    assert samples == 4 and torch.isfinite(terms).all() and float(grad_norm) > 0
    assert all(v > 0 for v in terms.tolist())  # loss, lm, spatial, attention
    seen = []
    handle = decoder_layers(model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    items = evaluation_items(load_split(parts.settings.data, "val"), 2)
    with torch.no_grad():
        metrics = evaluate_items(model, parts.processor, parts.objective.tap, items, max_new_tokens=2)
    handle.remove()
    parts.objective.remove()
    assert seen and set(seen) == {torch.bfloat16}  # generation ran on the bf16 weights
    assert any(key in metrics for key in ("closed_accuracy", "open_recall"))


@pytest.mark.slow
def test_trainer_compile_compiles_every_decoder_block_and_evaluates_eagerly(mini_config, monkeypatch):
    from medalign_platform.run import acceleration
    from medalign_platform.run.loop import RunContext, run_training

    monkeypatch.setattr(acceleration, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    reports = []
    config = mini_config(["trainer.compile=true", "trainer.eval_every=0", "trainer.val_size=2",
                          "trainer.test_size=2", "trainer.max_new_tokens=2", "trainer.log_every=1"])
    built = []
    original = acceleration.compile_blocks

    def spy(model, backend=None):
        built.append(model)
        return original(model, backend)

    monkeypatch.setattr("medalign_platform.run.loop.compile_blocks", spy)
    final = run_training(config, RunContext(report=lambda m, c: reports.append(m)))
    (model,) = built
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert [m["step"] for m in reports] == [1, 2]
    assert final["train/attention"] > 0 and "test/closed_accuracy" in final
    torch._dynamo.reset()
