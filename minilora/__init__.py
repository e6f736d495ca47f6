"""minilora: fine-tuning by hand, a tiny GPT in pure NumPy (or CuPy)."""

import os

# Read by OpenBLAS once, when NumPy loads it, so it is set here, before anything of minilora imports NumPy.
# After each product OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) before they sleep, on the
# very cores that minilora's own elementwise threads (threads.py) need next: at GPT-2 small's shapes on
# 2 threads the spinning cost a step 10 to 15% (docs/hardware.md). 2^4 cycles gives the cores back at
# once; a wake-up then costs microseconds per product. A value already set is kept, and a program that
# loaded NumPy before importing minilora keeps OpenBLAS's default.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
