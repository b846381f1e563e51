"""The HF Trainer with the SFT logs we want: interval tokens/s and eval perplexity.

Loss, learning rate and gradient norm are logged by the Trainer itself (TensorBoard under
``OUTPUT/runs``); tokens are counted by the Trainer (``include_num_input_tokens_seen=non_padding``,
gathered over ranks), so ``tokens_per_second`` is the whole job's rate over the last log interval.
"""

from __future__ import annotations

import math
import time

from transformers import Trainer, TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Remembers (time, tokens seen) at the last training log, starting when training starts."""

    def __init__(self) -> None:
        self.mark: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # Runs after a resumed state is loaded, so the first window starts from the restored count.
        self.mark = (time.perf_counter(), state.num_input_tokens_seen)

    def rate(self, tokens_seen: int) -> float | None:
        """Tokens per second since the previous call (or training start); moves the mark."""
        if self.mark is None:
            return None
        now = time.perf_counter()
        then, seen = self.mark
        self.mark = (now, tokens_seen)
        return (tokens_seen - seen) / max(now - then, 1e-9)


class SFTTrainer(Trainer):
    """``Trainer`` adding ``tokens_per_second`` to training logs and ``eval_perplexity`` to eval logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.throughput = ThroughputCallback()
        self.add_callback(self.throughput)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            rate = self.throughput.rate(self.state.num_input_tokens_seen)
            if rate is not None:
                logs["tokens_per_second"] = round(rate, 1)
        if "eval_loss" in logs:
            # exp overflows past ~709; a diverged run still logs a finite, obviously bad value.
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)
