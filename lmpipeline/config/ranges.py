"""Settings the schema's types accept but a run cannot use, checked in the same validation pass.

The schema's Field bounds say what a value may be at all (learning_rate > 0, 0 <= warmup_ratio < 1) and
refuse NaN and infinity for every float; this table adds the few limits that come from how the value
is used later (a seed numpy must accept, a step count that is either "use epochs" or a real count),
so that nothing fails minutes into a run with a traceback. Each rule says why, in the message.
Path keys may not be empty strings: an empty path reads the current folder, which is never meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Rule:
    ok: Callable[[object], bool]
    message: str


RULES: dict[str, Rule] = {
    "seed": Rule(lambda v: 0 <= v < 2**32, "must be in [0, 2**32 - 1] (numpy and CUDA seeds are 32-bit)"),
    "max_steps": Rule(lambda v: v == -1 or v > 0, "must be a positive step count, or -1 to train num_train_epochs"),
    "learning_rate": Rule(lambda v: v <= 1, "a peak learning rate above 1 diverges at once with AdamW; "
                                            "did you mean e.g. 2e-4?"),
    "loss_spike_factor": Rule(lambda v: v == 0 or v >= 1, "must be 0 (off) or at least 1: below 1 every ordinary "
                                                          "step would be reported as a spike"),
}


PATH_KEYS = ("dataset_name_or_path", "eval_dataset_name_or_path", "chat_template_path", "golden_set", "eval_dataset",
             "base_model")


def unusable_values(config) -> list[tuple[str, str]]:
    """[(key, message)] for every value of a validated stage config that breaks a rule above."""
    found = [(key, "is an empty path: give a file or folder, or leave the key out")
             for key in PATH_KEYS if isinstance(getattr(config, key, None), str) and not getattr(config, key).strip()]
    for key, rule in RULES.items():
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not rule.ok(value):
            found.append((key, f"{value!r} {rule.message}"))
    return found
