"""Knowledge distillation: train a (compressed) student toward a trained teacher's predictions.

``Distillation`` wraps a task and changes only its training loss, to Hinton et al.'s mix of the task's own loss
and the teacher's softened distribution (AntMan, Zhao et al. 2019, pairs compression with it):

    loss = (1 - weight) * CE(student, targets) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per position, scaled as the task scales its own loss (``Task.objective``). Any task works whose ``Task.forward``
gives logits over classes; teacher and student both run through it. The teacher runs in eval mode without
gradients and carries its own recurrent state from batch to batch (a BPTT task's windows), as the student does, so
it predicts every position from the same history; that state rides along with the student's in the trainer's
carried state (and so in mid-epoch checkpoints). Evaluation is the task's own: the student alone, on the task's
metric.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional


@dataclass
class DistillConfig:
    weight: float = 0.5          # share of the teacher's soft targets in the loss (0: the task's loss only)
    temperature: float = 1.0     # softening of both distributions (Hinton's T); the soft term is scaled by T^2

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must lie in [0, 1], got {self.weight}")
        if not self.temperature > 0.0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


class Distillation:
    """``task`` with its training loss mixed with a teacher's soft targets; everything else is ``task``'s.

    ``teacher`` and the student both run through ``task.forward(model, batch, state) -> (logits, loss, state)``.
    ``training_loss`` returns the task's own mean loss as its third element, so that the trainer reports the
    task's training metric rather than the mixed objective.
    """

    def __init__(self, task, teacher: nn.Module, config: DistillConfig | None = None) -> None:
        self.task, self.config = task, config if config is not None else DistillConfig()
        self.teacher = teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

    def __getattr__(self, name: str):
        if name == "task":          # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)   # data, evaluation, metrics, checkpoints: the task's own

    def training_loss(self, model: nn.Module, batch, state):
        student_state, teacher_state = state if state is not None else (None, None)
        logits, task_loss, student_state = self.task.forward(model, batch, student_state)
        with torch.no_grad():
            teacher_logits, _, teacher_state = self.task.forward(self.teacher, batch, teacher_state, with_loss=False)
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"the teacher predicts {tuple(teacher_logits.shape)} logits where the student predicts "
                             f"{tuple(logits.shape)}: distil only from a teacher trained on the same task and data")
        soft = soft_target_loss(logits, teacher_logits, self.config.temperature)
        weight = self.config.weight
        loss = (1.0 - weight) * task_loss + weight * soft
        return self.task.objective(loss, batch), (student_state, teacher_state), task_loss.detach()


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of ``T^2 KL(softmax(teacher / T) || softmax(student / T))``; the last axis is the classes.

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
    """
    classes = logits.shape[-1]
    # in float32 even under bf16 autocast, which leaves log_softmax in bf16: the gradient is a difference of two
    # close distributions, and bf16's 8-bit mantissa would drown it
    student = functional.log_softmax(logits.reshape(-1, classes).float() / temperature, dim=-1)
    teacher = functional.log_softmax(teacher_logits.reshape(-1, classes).float() / temperature, dim=-1)
    return functional.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2
