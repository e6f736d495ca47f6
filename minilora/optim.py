"""AdamW, gradient clipping and the learning-rate schedule.

One optimizer serves every fine-tuning strategy. A strategy only decides which
names are trainable; the optimizer keeps moments for exactly those names and
nothing else. That is where LoRA's memory saving shows up: "the optimiser only
needs to maintain states for ΔW", so for LoRA the state holds two small
matrices per adapted layer instead of two copies of the whole model.

State is a plain dict, easy to print and to save:

    {"step": 0, "m": {name: array}, "v": {name: array}}

Arrays may be NumPy or CuPy; each update takes its module from the parameter.
Scalars are Python floats, so a float32 parameter stays float32.
"""

import math
from functools import partial

import numpy

from .backend import array_module, is_device, to_device, to_numpy
from .bounds import GRAD_CLIP
from .threads import parallel_for

EPS_MAX = 1e30  # the largest Adam eps (see _check_eps)


def adamw_init(params, trainable):
    """Create an AdamW state with zero moments for the trainable names only.

    Inputs:
    - params: dict name -> array, every parameter of the model
    - trainable: iterable of names (a subset of params) the optimizer will update

    Returns a dict {"step": 0, "m": {name: zeros}, "v": {name: zeros}}, where each
    moment has the shape, dtype and device of its parameter. Frozen parameters
    get no moments at all.
    """
    if isinstance(trainable, str):
        raise ValueError(f"trainable: expected an iterable of parameter names, got the string {trainable!r}")
    names = list(trainable)
    if not names:
        raise ValueError("trainable: expected at least one parameter name, got none")
    unknown = sorted(n for n in names if n not in params)
    if unknown:
        raise ValueError(f"trainable: expected names of parameters, got unknown names {unknown}")
    m, v = {}, {}
    for name in names:
        xp = array_module(params[name])
        m[name] = xp.zeros_like(params[name])
        v[name] = xp.zeros_like(params[name])
    return {"step": 0, "m": m, "v": v}


def adamw_step(params, grads, state, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0):
    """One AdamW update. Modifies params and state IN PLACE; returns nothing.

    Inputs:
    - params: dict name -> array; the entries named in grads are updated in place
    - grads: dict name -> array of the same shape; its names must all have moments
      in state (a frozen name has none, so passing its gradient is an error)
    - state: the dict from adamw_init; its moments are updated and "step" is
      incremented
    - lr: learning rate (a Python float, e.g. from lr_at)
    - beta1, beta2: decay rates of the first and second moment averages
    - eps: added to sqrt(v_hat) so the division never blows up
    - weight_decay: decoupled decay rate; applied only to matrices (ndim >= 2),
      never to biases or LayerNorm gains and shifts

    The update (Loshchilov & Hutter 2019, "Decoupled Weight Decay
    Regularization", Algorithm 2, with the schedule multiplier folded into lr):

        t     = t + 1
        m     = beta1 * m + (1 - beta1) * g              first moment (mean of g)
        v     = beta2 * v + (1 - beta2) * g**2           second moment (mean of g**2)
        m_hat = m / (1 - beta1**t)                       bias correction: m, v start at 0
        v_hat = v / (1 - beta2**t)
        p     = p - lr * weight_decay * p                decoupled decay (matrices only)
        p     = p - lr * m_hat / (sqrt(v_hat) + eps)

    The decay is "decoupled" because it shrinks p directly instead of being added
    to g, where Adam's 1/sqrt(v_hat) would rescale it differently per weight.
    """
    if lr < 0.0:
        raise ValueError(f"lr: expected a non-negative learning rate, got {lr}")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"beta1, beta2: expected values in [0, 1), got {beta1}, {beta2}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay: expected a non-negative value, got {weight_decay}")
    untracked = sorted(n for n in grads if n not in state["m"])
    if untracked:
        raise ValueError(
            f"grads: expected only names the optimizer state tracks ({len(state['m'])} trainable), "
            f"got gradients for untracked names {untracked}"
        )
    for name, g in grads.items():
        if g.shape != params[name].shape:
            raise ValueError(f"grads[{name!r}]: expected shape {params[name].shape}, got {g.shape}")
    _check_eps(eps, params, grads)

    state["step"] += 1
    t = state["step"]
    # Python floats, computed once per step for every parameter
    bias1 = 1.0 - beta1**t
    bias2 = 1.0 - beta2**t
    for name, g in grads.items():
        xp = array_module(g)
        p, m, v = params[name], state["m"][name], state["v"][name]
        decay = 1.0 - lr * weight_decay if weight_decay != 0.0 and p.ndim >= 2 else None
        update = partial(_adamw_update, beta1=beta1, beta2=beta2, eps=eps, lr=lr, bias1=bias1, bias2=bias2,
                         decay=decay)
        if is_device(xp) or not all(a.flags.c_contiguous for a in (p, g, m, v)):
            # the GPU runs it in one pass per line (it is parallel already); so does a strided array
            update(p, g, m, v, xp.empty_like(g), xp.empty_like(g))
            continue
        # on the CPU the update is elementwise, so the flat arrays are split over the threads
        # (threads.parallel_for) and each part walked a cache-sized BLOCK at a time
        flat = [a.reshape(-1) for a in (p, g, m, v)]  # views: the update writes through them
        parallel_for(g.size, partial(_adamw_blocks, flat, update), grain=BLOCK, scratch=partial(_rows, g.dtype))


BLOCK = 2**16  # elements per block of the CPU's update: the block's p, g, m, v and two scratch rows
# (1.5 MiB in float32) stay in a core's L2 cache through the update's dozen passes, where whole arrays
# (wte: 154 MB) would go to memory and back on every pass


def _rows(dtype, start, stop):
    """A part's two scratch rows of at most BLOCK numbers."""
    return numpy.empty(min(BLOCK, stop - start), dtype), numpy.empty(min(BLOCK, stop - start), dtype)


def _adamw_blocks(flat, update, start, stop, rows):
    """Update the flat arrays' elements [start, stop) one BLOCK at a time, in this part's two scratch rows."""
    p, g, m, v = flat
    s1, s2 = rows
    for b0 in range(start, stop, BLOCK):
        b1 = min(b0 + BLOCK, stop)
        update(p[b0:b1], g[b0:b1], m[b0:b1], v[b0:b1], s1[:b1 - b0], s2[:b1 - b0])


def _adamw_update(p, g, m, v, t1, t2, beta1, beta2, eps, lr, bias1, bias2, decay):
    """The AdamW update of p, m, v in place, with t1, t2 scratch arrays of g's shape.

    Every line computes in the scratch arrays (out=) the same operations in the same order as the
    formulas in the comments, so the numbers are those of the formulas, without a fresh temporary per
    operator (and, being elementwise, the same whatever the blocks and threads).
    """
    xp = array_module(g)
    # m = beta1 * m + (1 - beta1) * g, written in place
    m *= beta1
    m += xp.multiply(g, 1.0 - beta1, out=t1)
    # v = beta2 * v + (1 - beta2) * g**2
    v *= beta2
    xp.multiply(g, g, out=t1)
    t1 *= 1.0 - beta2
    v += t1
    if decay is not None:
        # p = p - lr * wd * p (decay = 1 - lr * wd), before the Adam step so it uses the old p
        p *= decay
    # p = p - lr * m_hat / (sqrt(v_hat) + eps)
    xp.divide(v, bias2, out=t1)
    xp.sqrt(t1, out=t1)
    t1 += eps  # sqrt(v_hat) + eps
    xp.divide(m, bias1, out=t2)  # m_hat
    t2 *= lr  # (lr * m_hat) / (sqrt(v_hat) + eps), in the formula's order
    t2 /= t1
    p -= t2


def _check_eps(eps, params, grads):
    """eps must be a normal number of every updated parameter's dtype, and at most EPS_MAX.

    eps is added to sqrt(v_hat) in the parameter's dtype: below its smallest normal number (1.18e-38 for
    float32) it loses bits, and from 1.4e-45 down it is 0, so a weight whose gradient has been exactly 0
    (v = 0) gets 0 / 0 = NaN. Above EPS_MAX sqrt(v_hat) + eps could overflow float32 (sqrt of a finite
    float32 is below 1.9e19), and every step would be ~ m / eps = 0 anyway.
    """
    for dtype in {params[name].dtype for name in grads}:
        tiny = float(numpy.finfo(dtype).tiny) if numpy.issubdtype(dtype, numpy.floating) else 0.0
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not tiny <= eps <= EPS_MAX:
            raise ValueError(f"eps: expected a number in [{tiny:g}, {EPS_MAX:g}] for {dtype} parameters (added to "
                             f"sqrt(v_hat) in {dtype}: a smaller one is subnormal or 0 there, and a weight whose "
                             f"gradient is 0 gets 0 / 0), got {eps!r}")


def clip_grad_norm(grads, max_norm):
    """Rescale all gradients together so their global L2 norm is at most max_norm.

    Inputs:
    - grads: dict name -> array; scaled IN PLACE when the norm is over max_norm
    - max_norm: positive float

    Returns the global norm BEFORE clipping, as a 0-d float64 array of the
    gradients' module (float(norm) reads it):

        norm = sqrt(sum over names of sum(g**2))
        if norm > max_norm:  g = g * (max_norm / norm)   for every g

    One factor for all names keeps the direction of the full gradient. A
    non-finite norm (inf or nan) scales nothing, so the caller can see it and
    skip the step. Everything stays on the device: no value is read on the host.
    """
    if not max_norm > 0.0:
        raise ValueError(f"max_norm: expected a positive number, got {max_norm}")
    GRAD_CLIP.check(max_norm, "max_norm")  # a factor max_norm / norm that float32 holds
    if not grads:
        return 0.0
    xp = array_module(*grads.values())
    squares = xp.stack([(g * g).sum().astype(xp.float64) for g in grads.values()])  # one per name
    norm = xp.sqrt(squares.sum())
    # max_norm / max(norm, max_norm) is exactly 1 when no clipping is needed
    scale = xp.where(xp.isfinite(norm), max_norm / xp.maximum(norm, max_norm), 1.0)
    for g in grads.values():
        g *= scale.astype(g.dtype)
    return norm


def lr_at(step, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """The learning rate at a step: linear warmup, then cosine decay.

    Inputs:
    - step: the update about to be taken, counting from 0
    - max_lr: the peak learning rate, reached at the end of warmup
    - warmup_steps: number of warmup updates (0 for none)
    - total_steps: step at which the decay reaches min_lr; after it, lr = min_lr
    - min_lr: the floor of the cosine

    Returns a Python float:

        step < warmup_steps:        max_lr * (step + 1) / warmup_steps
        warmup <= step < total:     min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * q)),
                                    q = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:        min_lr

    The warmup counts step + 1 so the very first update already moves
    (lr = max_lr / warmup_steps, never 0) and the last warmup step uses max_lr.
    The cosine then starts at max_lr (q = 0), passes the midpoint
    (max_lr + min_lr) / 2 halfway, and lands on min_lr at total_steps.
    """
    if step < 0:
        raise ValueError(f"step: expected a non-negative integer, got {step}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps, total_steps: expected 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}"
        )
    if not 0.0 <= min_lr <= max_lr:
        raise ValueError(f"min_lr, max_lr: expected 0 <= min_lr <= max_lr, got {min_lr}, {max_lr}")
    if step >= total_steps:
        return float(min_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    q = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * q))


def optimizer_state_bytes(state):
    """Bytes held by the optimizer's moments (m and v), as an int.

    For AdamW this is 2 * (bytes of the trainable parameters): the number the
    LoRA paper's memory argument is about.
    """
    return int(sum(a.nbytes for a in state["m"].values()) + sum(a.nbytes for a in state["v"].values()))


def state_to_arrays(state):
    """Flatten an optimizer state into named host arrays, ready for a checkpoint.

    Returns a dict with "opt.step" (a 0-d int64 array) and, for each trainable
    name, "opt.m.<name>" and "opt.v.<name>" (NumPy arrays; on the NumPy backend
    they share memory with the state, so save them before the next step).
    """
    arrays = {"opt.step": numpy.array(state["step"], dtype=numpy.int64)}
    for name in state["m"]:
        arrays[f"opt.m.{name}"] = to_numpy(state["m"][name])
        arrays[f"opt.v.{name}"] = to_numpy(state["v"][name])
    return arrays


def state_from_arrays(arrays, params):
    """Rebuild an optimizer state from the arrays state_to_arrays made.

    Inputs:
    - arrays: dict of named arrays (e.g. from load_checkpoint); keys not starting
      with "opt." are ignored
    - params: dict name -> array of the model being resumed; each moment is
      checked against its parameter's shape and placed on its device and dtype

    Returns a state dict as from adamw_init, with the saved step.
    """
    if "opt.step" not in arrays:
        raise ValueError("arrays: expected an 'opt.step' entry (an optimizer state), got none")
    m_names = {k[len("opt.m."):] for k in arrays if k.startswith("opt.m.")}
    v_names = {k[len("opt.v."):] for k in arrays if k.startswith("opt.v.")}
    if m_names != v_names:
        raise ValueError(
            f"arrays: expected the same names under opt.m. and opt.v., got only-m {sorted(m_names - v_names)} "
            f"and only-v {sorted(v_names - m_names)}"
        )
    state = {"step": int(arrays["opt.step"]), "m": {}, "v": {}}
    for name in sorted(m_names):
        if name not in params:
            raise ValueError(f"arrays: expected moments only for model parameters, got 'opt.m.{name}'")
        p = params[name]
        xp = array_module(p)
        for key in ("m", "v"):
            a = arrays[f"opt.{key}.{name}"]
            if a.shape != p.shape:
                raise ValueError(f"arrays['opt.{key}.{name}']: expected shape {p.shape}, got {a.shape}")
            state[key][name] = to_device(a, xp).astype(p.dtype, copy=True)
    return state
