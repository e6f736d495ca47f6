"""Finite-difference gradient checks: is every hand-written backward right?

A backward is checked against central differences in float64, the
five-point stencil

    df/dx_i ~ (-f(x + 2h e_i) + 8 f(x + h e_i) - 8 f(x - h e_i) + f(x - 2h e_i)) / 12h

whose error is O(h^4). It allows a larger h than the two-point difference,
so round-off (about 1e-16 |f| / h) stays small and even small gradient
entries are checked to a relative 1e-6: h = 1e-3 for single ops, 1e-4 for the
whole model, whose loss curves more sharply (a deep composition) and whose
sampled entries exclude the numerically-zero ones (see check_model).

where f is the op's output projected on a random upstream gradient dout,
f(x) = sum(op(x) * dout), so the whole vector-Jacobian product is checked at
once. Small tensors are checked coordinate by coordinate; large ones along a
random direction u (one directional derivative, compared with <grad, u>) or on
a random sample of coordinates.

`minilora gradcheck` runs every check registered in CHECKS and fails if any
relative error exceeds TOLERANCE.
"""

from dataclasses import dataclass

import numpy as np

from . import methods, ops
from .backend import array_module, to_device, to_numpy

TOLERANCE = 1e-6
FULL_CHECK_MAX_SIZE = 4096  # tensors up to this size are checked at every coordinate


def rel_error(a, n):
    """Max over entries of |a - n| / max(|a| + |n|, 1e-8)."""
    a, n = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(to_numpy(n), dtype=np.float64)
    return float(np.max(np.abs(a - n) / np.maximum(np.abs(a) + np.abs(n), 1e-8)))


def _stencil(value_at, h):
    """(8 (f(h) - f(-h)) - (f(2h) - f(-2h))) / 12h: differences first, so an
    input that does not change f gives exactly 0."""
    return (8.0 * (value_at(h) - value_at(-h)) - (value_at(2 * h) - value_at(-2 * h))) / (12.0 * h)


def numerical_gradient_array(f, x, dout, h=1e-3):
    """d/dx of sum(f() * dout) at every coordinate of x (CS231n's eval_numerical_gradient_array).

    Inputs:
    - f: a function of no arguments returning an array; it must read x
    - x: the array to perturb (in place, restored afterwards)
    - dout: array shaped like f()'s output

    Returns an array shaped like x.
    """
    grad = np.zeros(x.shape)  # on the host: one number per coordinate
    for i in np.ndindex(*x.shape):
        old = float(x[i])

        def value_at(d):
            x[i] = old + d
            return float((f() * dout).sum())

        grad[i] = _stencil(value_at, h)
        x[i] = old
    return grad


def numerical_directional_derivative(f, x, dout, u, h=1e-3):
    """d/dt of sum(f() * dout) at x + t u, t = 0 (x perturbed in place and restored)."""
    old = x.copy()

    def value_at(d):
        x[...] = old + d * u
        return float((f() * dout).sum())

    out = _stencil(value_at, h)
    x[...] = old
    return out


def numerical_gradient_sampled(f, x, coords, h=1e-4):
    """d f() / d x[c] for each flat index c in coords; f returns a scalar."""
    flat = x.reshape(-1)  # a view: writes reach x
    out = np.empty(len(coords))
    for j, c in enumerate(coords):
        old = float(flat[c])

        def value_at(d):
            flat[c] = old + d
            return float(f())

        out[j] = _stencil(value_at, h)
        flat[c] = old
    return out


@dataclass
class CheckResult:
    """One checked derivative: d(op) / d(argument)."""

    op: str
    argument: str
    shape: tuple
    error: float
    method: str  # "full", "projected" or "sampled"

    @property
    def passed(self):
        return self.error <= TOLERANCE


def check_op(op, forward, backward, args, wrt, rng, forward_kwargs=None, backward_kwargs=None):
    """Check an op's backward against finite differences for the arguments named in wrt.

    Inputs:
    - op: a name for the report
    - forward, backward: the op pair
    - args: dict name -> float64 array, the forward's positional arguments in order
    - wrt: {argument name: index of its gradient in backward's return value}
    - rng: numpy Generator for dout and directions

    Returns a list of CheckResult.
    """
    fkw, bkw = forward_kwargs or {}, backward_kwargs or {}
    values = list(args.values())

    def f():
        return forward(*values, **fkw)[0]

    out, cache = forward(*values, **fkw)
    dout = to_device(rng.standard_normal(out.shape), array_module(out))
    grads = backward(dout, cache, **bkw)
    if not isinstance(grads, tuple):
        grads = (grads,)
    results = []
    for name, gi in wrt.items():
        x, analytic = args[name], to_numpy(grads[gi])
        if x.size <= FULL_CHECK_MAX_SIZE:
            num = numerical_gradient_array(f, x, dout)
            results.append(CheckResult(op, name, x.shape, rel_error(analytic, num), "full"))
        else:
            u = rng.standard_normal(x.shape)
            num = numerical_directional_derivative(f, x, dout, to_device(u, array_module(x)))
            results.append(CheckResult(op, name, x.shape, rel_error(np.sum(analytic * u), num), "projected"))
    return results


def _op_checks(rng, xp=np):
    """Every op, every input and every parameter, at random non-degenerate float64 points.

    The points are drawn on the host and moved to xp (numpy, cupy, ...)."""

    def dev(a):
        return to_device(a, xp)

    def n(shape):
        return dev(rng.standard_normal(shape))
    B, T, C, V, NH = 2, 5, 8, 11, 2
    res = []
    ids = dev(rng.integers(0, V, size=(B, T)))
    res += check_op("embedding", lambda i, w: ops.embedding_forward(i, w), ops.embedding_backward,
                    {"ids": ids, "wte": n((V, C))}, {"wte": 0}, rng)
    res += check_op("linear", ops.linear_forward, ops.linear_backward,
                    {"x": n((B, T, C)), "W": n((6, C)), "b": n(6)}, {"x": 0, "W": 1, "b": 2}, rng)
    res += check_op("linear (frozen)", ops.linear_forward, ops.linear_backward,
                    {"x": n((B, T, C)), "W": n((6, C)), "b": n(6)}, {"x": 0}, rng,
                    backward_kwargs={"param_grads": False})
    res += check_op("layer_norm", ops.layer_norm_forward, ops.layer_norm_backward,
                    {"x": 2.0 * n((B, T, C)) + 0.5, "g": 1.0 + 0.3 * n(C), "b": n(C)},
                    {"x": 0, "g": 1, "b": 2}, rng)
    # GELU's slope (tanh form) is zero near x = -0.75246 and vanishes in the far negative tail, where
    # 1 + tanh(u) also loses digits to cancellation: there every relative error is noise
    x = rng.uniform(-3.0, 3.0, (B, T, C))
    x[abs(x + 0.75246) < 0.1] += 0.3
    res += check_op("gelu", ops.gelu_forward, ops.gelu_backward, {"x": dev(x)}, {"x": 0}, rng)
    res += check_op("softmax", ops.softmax_forward, ops.softmax_backward, {"x": 2.0 * n((B, T, C))}, {"x": 0}, rng)
    res += check_op("attention", lambda q, k, v: ops.attention_forward(q, k, v, NH), ops.attention_backward,
                    {"q": n((B, T, C)), "k": n((B, T, C)), "v": n((B, T, C))}, {"q": 0, "k": 1, "v": 2}, rng)
    keep = dev(rng.random((B, T, C)) >= 0.3)
    res += check_op("dropout", lambda x: ops.dropout_forward(x, 0.3, mask=keep), ops.dropout_backward,
                    {"x": n((B, T, C))}, {"x": 0}, rng)
    targets = dev(rng.integers(0, V, size=(B, T)))
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[0, 0] = 1.0
    mask = dev(mask)
    res += check_op("cross_entropy", lambda z: ops.cross_entropy_forward(z, targets, mask),
                    ops.cross_entropy_backward, {"logits": 2.0 * n((B, T, V))}, {"logits": 0}, rng)
    # the tied LM head's chunked loss: B * T = 10 tokens in chunks of 4 (the last one partial), masked positions
    for name, kwargs in (("tied_head_cross_entropy (chunked)", {"chunk_rows": 4}),
                         ("tied_head_cross_entropy (one chunk)", {})):
        res += check_op(name, lambda h, w, kw=kwargs: ops.tied_head_cross_entropy_forward(h, w, targets, mask, **kw),
                        ops.tied_head_cross_entropy_backward, {"h": n((B, T, C)), "wte": n((V, C))},
                        {"h": 0, "wte": 1}, rng)
    for m in methods.METHODS.values():  # each method's own op pairs (LoRA's linear, ...)
        if m.op_checks is not None:
            res += m.op_checks(rng, xp)
    return res


TINY = dict(vocab_size=11, context_length=7, d_model=8, n_heads=2, n_layers=2, d_ff=12)
SAMPLED_COORDS = 6  # coordinates checked per parameter tensor in the whole-model checks


def tiny_model(rng):
    """A tiny float64 model at a random, non-degenerate point (not the init: gains,
    biases and weights all random and O(1), so no gradient vanishes by symmetry)."""
    from .model import ModelConfig, param_shapes

    config = ModelConfig(**TINY)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(".g"):
            params[name] = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            params[name] = 0.4 * rng.standard_normal(shape)
    return config, params


def longer_context(params, config, extra, rng):
    """The model with `extra` more positions (new random wpe rows, O(1) like the rest): room for P virtual
    tokens that take positions (peft_positions) beside a batch of context_length real tokens.

    Returns (params, config), a new dict and a new config; the other arrays are shared.
    """
    from dataclasses import replace

    wpe = params["wpe"]
    rows = rng.standard_normal((extra, wpe.shape[1])).astype(wpe.dtype)
    more = {**params, "wpe": np.concatenate([to_numpy(wpe), 0.4 * rows])}
    return more, replace(config, context_length=config.context_length + extra)


def check_model(op, loss_fn, params, trainable, rng):
    """Compare the model's gradients of a scalar loss with finite differences at
    SAMPLED_COORDS random coordinates of every trainable tensor.

    Inputs:
    - loss_fn(params, trainable) -> (loss, grads)
    - params: float64 parameter dict; trainable: the names to check
    """
    _, grads = loss_fn(params, trainable)
    if set(grads) != set(trainable):
        raise AssertionError(f"{op}: gradients for {sorted(set(grads) ^ set(trainable))} missing or extra")
    results = []
    for name in sorted(trainable):
        x = params[name]
        g = to_numpy(grads[name]).reshape(-1)
        # sample among entries that are not numerically zero next to the tensor's largest:
        # a difference quotient of an entry 1e-7 times smaller than its neighbours
        # measures only the loss's round-off (an all-zero gradient keeps every entry)
        live = np.flatnonzero(np.abs(g) >= 1e-3 * np.abs(g).max()) if g.any() else np.arange(g.size)
        coords = rng.choice(live, size=min(SAMPLED_COORDS, live.size), replace=False)
        num = numerical_gradient_sampled(lambda: loss_fn(params, ())[0], x, coords)
        analytic = g[coords]
        results.append(CheckResult(op, name, x.shape, rel_error(analytic, num), "sampled"))
    return results


def _model_checks(rng, xp=np, checkpoint_activations=False):
    """The whole model: every parameter, under every method, for both heads (parameters moved to xp).

    checkpoint_activations: the backward that recomputes each block (model.loss_and_grads's option),
    checked with dropout on: every loss evaluation draws its masks from a generator at the same seed,
    so the loss is a smooth function of the parameters and the recomputed masks must be the same.
    """
    from dataclasses import replace

    from . import model

    config, base = tiny_model(rng)
    B, T = 3, TINY["context_length"]
    x = rng.integers(0, config.vocab_size, (B, T))
    y = rng.integers(0, config.vocab_size, (B, T))
    mask = (rng.random((B, T)) < 0.7).astype(np.float64)
    mask[:, -1] = 1.0
    last = rng.integers(1, T, B)
    labels = rng.integers(0, 3, B)
    with_head = model.add_head(base, 3, seed=1)
    with_head["cls.b"] = 0.4 * rng.standard_normal(3)

    def loss(cfg, batch):
        if not checkpoint_activations:
            return lambda p, tr: model.loss_and_grads(p, cfg, batch, tr)
        cfg = replace(cfg, dropout=0.1)
        return lambda p, tr: model.loss_and_grads(p, cfg, batch, tr, rng=np.random.default_rng(11), train=True,
                                                  checkpoint_activations=True)

    label = "checkpointed model" if checkpoint_activations else "model"
    res = []
    # each method at its own random non-degenerate point (e.g. LoRA's B != 0), on a model with a head; the LM
    # loss never reads the head, so the LM check trains the method's names only. Then each variant a method
    # computes (e.g. "prompt (PEFT positions)"), at its own point, drawn after all the methods' points
    setups = [(name, m.gradcheck_setup) for name, m in methods.METHODS.items()]
    setups += [(f"{name} ({v})", setup) for name, m in methods.METHODS.items() for v, setup in m.gradcheck_variants]
    for case, setup in setups:
        params, cfg, trainable = setup(dict(with_head), config, rng)
        params = model.params_to(params, xp)
        if not methods.method(case.split(" (")[0]).needs_head:  # the head alone: no LM case, nothing to train
            res += check_model(f"{label}: {case}, LM", loss(cfg, {"x": x, "y": y, "mask": mask}), params,
                               trainable - set(model.HEAD_NAMES), rng)
        res += check_model(f"{label}: {case}, classifier", loss(cfg, {"x": x, "last": last, "labels": labels}),
                           params, trainable | set(model.HEAD_NAMES), rng)
    return res


def _checkpointed_model_checks(rng, xp=np):
    """The whole model with activation checkpointing and dropout: every method, both heads."""
    return _model_checks(rng, xp, checkpoint_activations=True)


CHECKS = {"ops": _op_checks, "model": _model_checks, "checkpoint": _checkpointed_model_checks}


def run_checks(groups=None, seed=0, xp=np):
    """Run the registered checks on the array module xp; returns a list of CheckResult."""
    names = list(CHECKS) if groups is None else groups
    results = []
    for name in names:
        results += CHECKS[name](np.random.default_rng(seed), xp)
    return results


def format_results(results):
    """The table `minilora gradcheck` prints: one row per checked derivative."""
    rows = [("op", "argument", "shape", "method", "max rel error", "result")]
    for r in results:
        rows.append((r.op, r.argument, "x".join(map(str, r.shape)), r.method, f"{r.error:.2e}",
                     "pass" if r.passed else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
