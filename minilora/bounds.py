"""The range each float setting accepts, declared once, with the reason it ends where it does.

The dataclasses (TrainConfig, ModelConfig, LoraConfig), the library calls (sampling.decode,
optim.adamw_step) and the CLI's argparse types all check a setting with its Bound here, so a value is
refused in the same words from Python, from a sweep and from the command line:

    lr: expected a learning rate in [1e-30, 10] (AdamW moves ...), got 1e+30

Why ranges at all: a setting given as a Python float (float64) is used in float32 arithmetic, where
it multiplies or divides whole arrays. float32 holds normal numbers from 1.18e-38 to 3.40e38 (with
24 bits), subnormals below that with fewer bits down to 1.4e-45, then 0; float64 the same from
2.2e-308 to 1.8e308, down to 4.9e-324. A setting outside its range does not fail loudly: it turns
weights into inf with only a RuntimeWarning, or silently becomes a 0 that the same option refuses
when typed (a learning rate of 1e-320 is 0 in float32). Each bound below says which of the two it
keeps away from; a setting that cannot go wrong at any finite value (a temperature, a dropout
probability below 1) is computed so that it cannot, and says so.

Bounds that depend on another setting live beside it: the LoRA scale alpha / r (methods/lora.py,
[1e-6, 1e4]), the weight decay (at most 1 / lr) and min_lr (0, or a normal float32 up to lr) in
TrainConfig, Adam's eps against the parameters' dtype in optim.adamw_step.
"""

import math
from dataclasses import dataclass

import numpy as np

FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.18e-38, the smallest normal float32


def _show(x):
    return f"{x:g}"


@dataclass(frozen=True)
class Bound:
    """A finite number in [low, high] (either end open, or high infinite); zero_ok admits 0 besides."""

    name: str  # the setting as the dataclasses call it ("lr"); the CLI names its option instead
    what: str  # what the number is ("a learning rate")
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    zero_ok: bool = False  # 0 means "off" (no clipping), besides the range
    why: str = ""  # the reason for the ends, shown in every refusal

    def describe(self):
        """'a learning rate in [1e-30, 10]'; 'a number >= 0' style when high is infinite."""
        if math.isinf(self.high):
            text = f"{self.what} {'>' if self.low_open else '>='} {_show(self.low)}"
        else:
            text = (f"{self.what} in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                    f"{')' if self.high_open else ']'}")
        return ("0 or " if self.zero_ok else "") + text

    def problem(self, value):
        """None when value is in range, else 'expected ..., got ...' (one line)."""
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            ok = False
        else:
            v = float(value)
            ok = (math.isfinite(v) and (v == 0 and self.zero_ok or (
                (v > self.low if self.low_open else v >= self.low)
                and (v < self.high if self.high_open else v <= self.high))))
        if ok:
            return None
        return f"expected {self.describe()}" + (f" ({self.why})" if self.why else "") + f", got {value!r}"

    def check(self, value, name=None):
        """value as a Python float; ValueError '<name>: expected ..., got ...' when it is out of range."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"{name or self.name}: {problem}")
        return float(value)


# Learning rate. AdamW moves every trained weight by about lr per step (|m_hat| / sqrt(v_hat) is near 1),
# so 1e30 (or 1e300) turns float32 weights into inf in a step or two; 10 already moves a weight of size 0.02
# by 500 times itself. At the low end the schedule's smallest rates, lr / 10 (where the cosine ends) and
# lr / warmup_steps (the first warmup step, up to 10^7 of them), must stay normal float32 numbers: from
# 1e-30 they are (>= 1e-37 > 1.18e-38); below 1.18e-38 a rate loses bits in the float32 update, and from
# 1.4e-45 down it is 0, the rate the option refuses. Any rate under about 1e-9 moves no float32 weight of
# size 0.01 at all (half its ulp), so the low end refuses nothing that trains.
LR = Bound("lr", "a learning rate", 1e-30, 10.0,
           why="AdamW moves each weight by about lr per step: more than 10 overflows float32 within steps, and "
               "below 1e-30 the schedule's rates lr / 10 and lr / warmup_steps are no longer normal float32 numbers")

# Gradient clipping. The clip multiplies every float32 gradient by max_norm / norm. A norm clip_grad_norm can
# compute finite has every |g| < 1.8e19 (else g * g overflows float32 and nothing is clipped), so for up to
# 10^12 parameters norm < 1.8e25, and max_norm >= 1e-12 keeps the factor >= 5e-38, a normal float32. Below
# it the factor can be subnormal or 0 and the clipped gradient is not the one asked for.
GRAD_CLIP = Bound("grad_clip", "a max gradient norm", 1e-12, zero_ok=True,
                  why="0 turns clipping off; below 1e-12 the float32 factor max_norm / norm can be subnormal or 0")

# Dropout probability. p = 1 drops everything and the inverted-dropout scale 1 / (1 - p) divides by 0. Any
# float64 p below 1 has 1 - p >= 2^-53, so the scale is at most 2^53 = 9.0e15, a normal float32, and one kept
# value times it stays far inside float32 (tested at p = 1 - 2^-53). A subnormal p keeps (almost) everything
# with a scale of exactly 1: exact too.
DROPOUT = Bound("dropout", "a probability", 0.0, 1.0, high_open=True,
                why="1 drops everything and its scale 1 / (1 - p) divides by 0")

# Sampling temperature. 0 is greedy. Any other finite temperature is exact: sampling.pick_next subtracts each
# row's largest logit before dividing, so every scaled logit is <= 0 and a tiny temperature can only send the
# others to -inf (probability 0, which exp(-huge) is anyway), never a logit to +inf; a huge one sends them all
# towards 0 (uniform sampling, the limit). So the only bound is the one every float option has: finite.
TEMPERATURE = Bound("temperature", "a temperature", 0.0, why="0 is greedy")

# The fraction of each sweep batch that is pretraining text: round(replay * batch_size) rows, at least one
# task row left (sweep.ReplayBatches checks that against the batch size).
REPLAY = Bound("replay", "a fraction", 0.0, 1.0, high_open=True, why="at least one row of a batch is the task's")
