"""The CPU's elementwise work, split over the BLAS pool's threads.

BLAS runs a matrix product on every thread the pool has (`--threads`), but a NumPy
ufunc (exp, multiply, sqrt, ...) runs on one core. At 2 threads the elementwise
work of a step (AdamW's update, the softmax of the LM head's loss, GELU, layer
norm) then costs as much as at 1, while the products take half as long, and it
becomes the larger share of the step (docs/hardware.md profiles it). PyTorch
splits the same loops over its intra-op threads; here a loop over independent
pieces of an array is handed to a pool of Python threads, one per BLAS thread.
NumPy releases the GIL inside a ufunc's loop, so the pieces run at the same time.

Only loops whose pieces are independent are split (each element, or each row, is
computed by the same operations whatever the split), so the numbers do not depend
on the thread count: unlike BLAS's sums, which do. A device array is never split:
the GPU runs the whole loop in parallel already, and many small kernels would be slower.
"""

import os
from concurrent.futures import ThreadPoolExecutor

from .backend import array_module, is_device

_POOLS = {}  # (process id, thread count) -> ThreadPoolExecutor, made on first use and kept (a forked child,
# such as a sweep's worker, has none of its parent's threads, so it makes its own)
_BLAS = []  # the BLAS library's threadpoolctl controller, looked up once


def cpu_threads():
    """The BLAS pool's thread count now (1 if threadpoolctl sees no BLAS): what the products use."""
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        found = ThreadpoolController().select(user_api="blas").lib_controllers
        _BLAS.append(found[0] if found else None)
    return 1 if _BLAS[0] is None else max(1, int(_BLAS[0].get_num_threads()))


def split_range(n, pieces, grain=1):
    """[(start, stop), ...]: [0, n) in at most `pieces` contiguous parts of whole multiples of grain (the
    last takes what is left); [(0, n)] when one part is asked for or n is at most one grain."""
    per = -(-n // max(1, pieces))  # ceil
    per = -(-per // grain) * grain  # rounded up to whole grains
    return [(s, min(s + per, n)) for s in range(0, n, per)] if n > 0 else []


def parallel_for(n, body, like=None, grain=1, products=False, scratch=None):
    """Run body(start, stop) over [0, n) split in contiguous parts, one per BLAS thread, and wait for all.

    Inputs:
    - n: the length of the loop (rows of an array, elements of a flat one)
    - body: a function of (start, stop) that computes that part in place (writes through out= or slices);
      its return value is ignored, and an exception in any part is raised here
    - like: an array of the loop: a device array runs as one part (the GPU is parallel already)
    - grain: parts are whole multiples of it (a cache-sized block; the rows of one softmax)
    - products: body calls BLAS on small matrices (attention's, one sequence at a time). While the parts
      run, the BLAS pool is set to one thread, so that each part's products run on its own core instead
      of every small product being split over all of them; it is set back after
    - scratch: None, or a function of (start, stop) making the buffers one part works in; then body is
      called as body(start, stop, its buffers). Every part's are made here, before any part starts, so
      that the memory a loop holds is the same however the threads happen to be scheduled (the memory
      plan, memplan.py, counts them all)

    With one thread, or n of one grain or less, body(0, n) runs in the calling thread.
    """
    threads = 1 if like is not None and is_device(array_module(like)) else cpu_threads()
    parts = split_range(n, threads, grain)
    args = [(s, e) if scratch is None else (s, e, scratch(s, e)) for s, e in parts]
    if len(parts) <= 1:
        if args:
            body(*args[0])
        return
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="minilora")
    blas = _BLAS[0] if products else None
    if blas is not None:
        blas.set_num_threads(1)
    try:
        futures = [pool.submit(body, *a) for a in args[1:]]
        body(*args[0])  # the first part in this thread, which would only wait
        for future in futures:
            future.result()
    finally:
        if blas is not None:
            blas.set_num_threads(threads)
