"""The MedAlign training objective: ``L = L_LM + sum_k weight_k * term_k``.

The distillation terms are named and weighted from config the way torchdistill keeps a
weighted sum of named losses: :data:`LOSS_TERMS` lists each term's name (what the loop
logs, ``train/<name>``), the :class:`DistillSettings` field holding its weight, what it
needs from the layer-L tap, and the function computing it. Today's terms are MedAlign's
two, ``spatial`` (``lambda_align``) and ``attention`` (``lambda_attn``). Adding a term is
one :class:`LossTerm` entry beside its loss function plus its weight field below; the
objective and the training loop handle whatever terms exist.

The student quantities come from a :class:`~medalign_platform.core.tap.DistillationTap`
at layer ``L``; the teacher targets are formed on the fly from native-grid teacher outputs
(patch tokens and CLS attention), so only ~0.3 MiB per image is ever stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from ..common.settings import Settings, setting
from .losses import (
    attention_distillation_loss,
    spatial_alignment_loss,
    teacher_attention_map,
    teacher_similarity,
)
from .student import SteerSettings, attach_steer
from .tap import DistillationTap, TapOutputs


class TeacherTargets(Protocol):
    """Native-grid teacher outputs for a batch (e.g. ``teacher.TeacherOutputs``).

    An optional ``prompt_attention`` ``[B, h*w]`` (question-conditioned map) replaces
    ``cls_attention`` as the attention target when present and not None.
    """

    patch_tokens: torch.Tensor  # [B, h*w, D_t]
    cls_attention: torch.Tensor  # [B, h*w]
    grid: tuple[int, int]


def teacher_attention_source(teacher: TeacherTargets) -> torch.Tensor:
    """``prompt_attention`` when the targets carry one, else ``cls_attention`` (``[B, h*w]``)."""
    prompt = getattr(teacher, "prompt_attention", None)
    return prompt if prompt is not None else teacher.cls_attention


def attention_token_weights(attention: torch.Tensor) -> torch.Tensor:
    """Per-visual-token weights from a teacher attention map: ``w = a / mean(a)`` per sample.

    Normalising to mean 1 keeps the weighted spatial loss on the scale of the unweighted one
    and makes it independent of any constant rescaling of ``a`` (such as the max-division).

    Args:
        attention: ``[B, N]`` non-negative maps on the student grid.

    Returns:
        ``[B, N]`` float32 weights with mean 1 per sample (detached: a target, not a path
        for gradients).
    """
    attention = attention.detach().float().clamp_min(0)
    return attention / attention.mean(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class DistillSettings(Settings):
    """Where and how strongly MedAlign distils the teacher into the student."""

    section: ClassVar[str] = "distill"

    layer: int = setting(20, "Distillation layer L, 0-based HF decoder index, 1..depth-1.", ge=1)
    lambda_align: float = setting(1.0, "Weight of the spatial-aware alignment loss (term 'spatial').", ge=0)
    lambda_attn: float = setting(0.06, "Weight of the attention-aware distillation loss (term 'attention').", ge=0)
    attention_normalize: Literal["l2", "probability"] = setting(
        "probability", "probability: proper KL; l2: the original code's L2-normalised variant.")
    teacher_max_normalize: bool = setting(
        True, "Display only: divide the teacher attention map by its max in TensorBoard panels. Neither loss can "
              "change with it (probability and L2 normalisation, and the mean-1 token weights, all remove a "
              "constant scale), so it is not a search-space key.")
    token_weights: Literal["none", "teacher_attention"] = setting(
        "none", "none | teacher_attention: weight entry (i, j) of the spatial loss by w_i w_j with w = teacher "
                "attention / its mean (on the student grid).")
    steer: SteerSettings = setting(factory=SteerSettings, help="Steer adapter on the visual span at layer L.")


@dataclass(frozen=True)
class TermInputs:
    """What a loss term may read: the tap's capture and the teacher targets on the student's grid.

    Attributes:
        captured: the tap's outputs (``visual_states [B, N, D]``, ``attention [B, N]``).
        teacher_similarity: ``[B, N, N]`` teacher cosine-similarity target.
        teacher_attention: ``[B, N]`` teacher attention target.
        token_weights: optional ``[B, N]`` per-visual-token weights.
        settings: the distillation settings (e.g. ``attention_normalize``).
    """

    captured: TapOutputs
    teacher_similarity: torch.Tensor
    teacher_attention: torch.Tensor
    token_weights: torch.Tensor | None
    settings: DistillSettings


@dataclass(frozen=True)
class LossTerm:
    """One named distillation term.

    Attributes:
        name: the term's name in the objective's output and the logs (``train/<name>``).
        weight: the :class:`DistillSettings` field holding its weight; weight 0 skips it.
        needs_attention: whether the tap must capture block L's text-to-image attention.
        compute: ``TermInputs -> scalar`` float32 loss.
    """

    name: str
    weight: str
    needs_attention: bool
    compute: Callable[[TermInputs], torch.Tensor]


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("spatial", "lambda_align", False,
             lambda x: spatial_alignment_loss(x.captured.visual_states, x.teacher_similarity, x.token_weights)),
    LossTerm("attention", "lambda_attn", True,
             lambda x: attention_distillation_loss(x.captured.attention, x.teacher_attention,
                                                   normalize=x.settings.attention_normalize)),
)


def term_weights(settings: DistillSettings) -> dict[str, float]:
    """``{term name: weight}`` of every registered term."""
    return {term.name: float(getattr(settings, term.weight)) for term in LOSS_TERMS}


class MedAlignObjective:
    """Computes the MedAlign loss terms for a student batch and its teacher targets.

    Building the objective attaches the steer adapter (if configured) and the layer-L tap
    to ``model``; call :meth:`remove` to detach the hooks.

    Args:
        model: the peft-wrapped LLaVA-family student.
        settings: distillation layer, loss weights and steer adapter.

    Example:
        >>> objective = MedAlignObjective(model, DistillSettings(layer=2))
        >>> terms = objective(batch, teacher_outputs)
        >>> terms["loss"].backward()
    """

    def __init__(self, model: nn.Module, settings: DistillSettings):
        self.model = model
        self.settings = settings
        self.weights = term_weights(settings)
        self.active = [term for term in LOSS_TERMS if self.weights[term.name] > 0]
        self.steer = attach_steer(model, settings.steer)
        self.tap = DistillationTap(model, settings.layer, steer=self.steer,
                                   capture_attention=any(term.needs_attention for term in self.active))
        self.student_grid = self.tap.grid

    @property
    def term_names(self) -> list[str]:
        """Names of every term the objective returns besides ``loss``: ``lm`` then the distillation terms."""
        return ["lm", *(term.name for term in LOSS_TERMS)]

    def remove(self) -> None:
        self.tap.remove()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA and steer parameters: everything the optimiser should update."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def targets(self, teacher: TeacherTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher similarity ``[B, N, N]`` and attention ``[B, N]`` on the student's grid
        (the question-conditioned map when the targets carry one)."""
        similarity = teacher_similarity(teacher.patch_tokens, teacher.grid, self.student_grid)
        attention = teacher_attention_map(
            teacher_attention_source(teacher), teacher.grid, self.student_grid,
            max_normalize=self.settings.teacher_max_normalize,
        )
        return similarity, attention

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        teacher: TeacherTargets | None,
        token_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Runs the student on ``batch`` and returns the loss and its terms.

        Args:
            batch: processor output with ``input_ids``, ``attention_mask``, ``pixel_values``
                and ``labels`` (``-100`` on prompt and padding).
            teacher: native-grid teacher targets for the batch's images; may be None only
                when every distillation weight is 0.
            token_weights: optional ``[B, N]`` per-visual-token weights for the spatial loss;
                when None and ``distill.token_weights`` is ``teacher_attention`` they come from
                the teacher's attention map (:func:`attention_token_weights`).

        Returns:
            ``{"loss", "lm", <each term of LOSS_TERMS>}``; the distillation terms are
            detached float32 scalars (zero tensors when their weight is 0 and nothing was
            computed), ``loss`` is the weighted sum that carries gradients.
        """
        # No KV cache in training: it would hold every layer's keys and values for nothing
        # (and, under torch.compile, make each block's graph depend on the cache's state).
        output = self.model(**{"use_cache": False, **batch})
        lm = output.loss
        captured = self.tap.pop()
        zero = lm.new_zeros((), dtype=torch.float32)
        values = {term.name: zero for term in LOSS_TERMS}
        loss = lm
        if self.active:
            if teacher is None:
                raise ValueError("teacher targets are required when a distillation weight "
                                 f"({', '.join(t.weight for t in self.active)}) is > 0")
            similarity, attention = self.targets(teacher)
            if token_weights is None and self.settings.token_weights == "teacher_attention":
                token_weights = attention_token_weights(attention).to(lm.device)
            inputs = TermInputs(captured, similarity.to(lm.device), attention.to(lm.device), token_weights,
                                self.settings)
            for term in self.active:
                values[term.name] = term.compute(inputs)
                loss = loss + self.weights[term.name] * values[term.name]
        return {"loss": loss, "lm": lm.detach(), **{name: value.detach() for name, value in values.items()}}
