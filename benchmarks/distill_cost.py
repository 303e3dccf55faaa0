"""Cost of distillation per training step: one BPTT window (35 x 20) forward and backward of a student, with and
without a dense 2x650 teacher's forward pass, in float32 and with the forward pass in bfloat16 (autocast, as
``TrainConfig.precision`` runs it), interleaved, medians of 7 (after one warm-up). Random weights and tokens: the
cost does not depend on them. Ratios are to the plain float32 step.

    OMP_NUM_THREADS=1 python benchmarks/distill_cost.py
"""
import statistics
import time

import torch

from leanlstm.tasks.distill import Distillation, DistillConfig
from leanlstm.tasks.lm import LMConfig, WordLM
from leanlstm.tasks.ptb import Corpus, LanguageModelTask


def main(repeats: int = 8) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = WordLM(LMConfig(10000, 650, [650, 650], 0.5, 0.05))
    stream = torch.randint(0, 10000, (35 * 20 + 20,))          # one window of random tokens, no corpus files
    task = LanguageModelTask(Corpus([str(i) for i in range(10000)], stream, stream, stream), batch_size=20, bptt=35)
    window = next(task.train_batches())
    for sizes in ([219, 405], [650, 650]):
        student = WordLM(LMConfig(10000, 650, sizes, 0.3, 0.05))
        tasks = {"plain": task, "distill": Distillation(task, teacher, DistillConfig())}
        times = {(name, bf16): [] for name in tasks for bf16 in (False, True)}
        for _ in range(repeats):
            for name, bf16 in times:
                student.zero_grad()
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = tasks[name].training_loss(student, window, None)[0]
                loss.backward()
                times[name, bf16].append(time.perf_counter() - started)
        median = {key: statistics.median(samples[1:]) for key, samples in times.items()}
        plain = median["plain", False]
        print(f"student {sizes}: plain {plain:.3f} s; ratio to it: with teacher "
              f"{median['distill', False] / plain:.2f}, bf16 {median['plain', True] / plain:.2f}, "
              f"bf16 with teacher {median['distill', True] / plain:.2f}")


if __name__ == "__main__":
    main()
