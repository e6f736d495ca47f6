"""Figures from run logs: loss curves and the fine-tuning comparison.

A run log is a JSON-lines file, one object per line. Training records have
"step" and "train_loss" and may have "val_loss", "lr", "tokens_per_s",
"elapsed_s"; evaluation records may carry "step" and "val_loss" alone. Any
other line (a {"meta": ...} header, say) is kept by read_log and ignored here.

Everything uses matplotlib's object API (Figure, not pyplot), so no global
state is touched, nothing pops up, and it runs on a headless machine. Each
function returns its Figure; only save_figure writes a file.
"""

import json
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from .checkpoint import atomic_open


def read_log(path):
    """Read a JSON-lines run log.

    Inputs:
    - path: the log file

    Returns a list of dicts, one per non-blank line, in file order. Raises
    ValueError naming the path, and the line number of a line that is not a
    JSON object or whose "step", "train_loss" or "val_loss" is not a number.
    """
    records = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")  # "\n" only: U+2028 may sit inside a JSON string
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: expected a readable JSON-lines run log, got {reason}") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got invalid JSON ({e.msg})") from e
        except RecursionError as e:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got one nested too deeply") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
        for key in ("step", "train_loss", "val_loss"):
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}, line {lineno}: expected a number for {key!r}, got {value!r:.40}")
        records.append(record)
    return records


def ema(values, beta):
    """Exponential moving average with bias correction, as a list of floats.

        s_t = beta * s_{t-1} + (1 - beta) * x_t,   s_0 = 0
        out_t = s_t / (1 - beta**t)                (t counts from 1)

    Dividing by 1 - beta**t undoes the pull toward the initial 0 (the same
    correction as Adam's m_hat), so the curve starts at the first value.
    beta = 0 returns the values unchanged.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta: expected a value in [0, 1), got {beta}")
    out, s = [], 0.0
    for t, x in enumerate(values, start=1):
        s = beta * s + (1.0 - beta) * x
        out.append(s / (1.0 - beta**t))
    return out


def _new_figure(figsize):
    """A Figure with its own Agg canvas: no pyplot, works without a display."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records, key):
    """(steps, values) of the records that have both "step" and key, sorted by step."""
    pairs = sorted((r["step"], r[key]) for r in records if "step" in r and r.get(key) is not None)
    return [s for s, _ in pairs], [float(v) for _, v in pairs]


def plot_loss_curves(runs, floor=None, title=None, smooth=0.9, logy=False, ylabel="loss (nats per token)"):
    """Training and validation loss against step, for one or more runs.

    Inputs:
    - runs: dict label -> list of log records (e.g. from read_log)
    - floor: optional entropy of the data source in nats per character; drawn as
      a dashed line, the lowest loss any model can reach on average
    - title: figure title; the default says what to look for
    - smooth: EMA coefficient in [0, 1) for the train curve; when > 0 the raw
      curve is drawn faint and the smoothed one on top (0 draws raw only)
    - logy: log-scale loss axis, which spreads out the region near the floor
    - ylabel: the loss's unit ("loss (nats per example)" for a classification head)

    Returns a matplotlib Figure. Each run keeps one colour: train loss as a line,
    validation loss as circles joined by a line. Runs whose curves are identical
    share one curve and one legend entry that names them all.
    """
    _check_runs(runs, smooth)
    fig = _new_figure((7.5, 4.5))
    ax = fig.add_subplot()
    _draw_loss_curves(ax, runs, floor, smooth, logy, ylabel)
    if title is None:
        title = ("Loss falls toward the entropy floor: the gap left is what the model has not learned"
                 if floor is not None else _default_title(runs))
    ax.set_title(title, fontsize=11)
    return fig


def _check_runs(runs, smooth):
    if not runs:
        raise ValueError("runs: expected a dict label -> list of records with at least one run, got none")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth: expected an EMA coefficient in [0, 1), got {smooth}")
    for label, records in runs.items():
        if not _series(records, "train_loss")[0]:
            raise ValueError(f"runs[{label!r}]: expected records with 'step' and 'train_loss', got none")


def _default_title(runs):
    """A title that promises only the curves drawn: validation is named only when a run logged it."""
    if any(_series(records, "val_loss")[0] for records in runs.values()):
        return "Training and validation loss: curves should fall and stay together"
    return "Training loss per step: it should fall (each step sees new batches, so it also measures fit)"


def _same_curves(a, b):
    return _series(a, "train_loss") == _series(b, "train_loss") and _series(a, "val_loss") == _series(b, "val_loss")


def _draw_loss_curves(ax, runs, floor, smooth, logy, ylabel):
    """Draw runs on ax; identical runs are drawn once, their labels joined."""
    groups = []  # [labels, records]: a run equal to an earlier one joins its group
    for label, records in runs.items():
        twin = next((g for g in groups if _same_curves(g[1], records)), None)
        if twin is None:
            groups.append([[label], records])
        else:
            twin[0].append(label)
    for i, (labels, records) in enumerate(groups):
        colour = f"C{i % 10}"
        label = " = ".join(labels) + (" (identical)" if len(labels) > 1 else "")
        steps, train = _series(records, "train_loss")
        if smooth > 0.0:
            ax.plot(steps, train, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(steps, ema(train, smooth), color=colour, linewidth=1.6, label=f"{label} train (EMA {smooth:g})")
        else:
            ax.plot(steps, train, color=colour, linewidth=1.2, label=f"{label} train")
        val_steps, val = _series(records, "val_loss")
        if val_steps:
            ax.plot(val_steps, val, "o-", color=colour, markersize=4, linewidth=1.0,
                    markeredgecolor="white", markeredgewidth=0.6, label=f"{label} val")
    if floor is not None:
        ax.axhline(floor, color="0.2", linestyle="--", linewidth=1.2,
                   label=f"entropy floor ({floor:.3f} nats/char)")
    if logy:
        ax.set_yscale("log")
        # plain numbers (2, 3, 4) instead of 2x10^0 on a log axis spanning under a decade
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def log_meta(records):
    """The {"meta": ...} header of a run log ({} when it has none)."""
    meta = next((r["meta"] for r in records if isinstance(r.get("meta"), dict)), {})
    return meta


def loss_unit(records):
    """What a run's loss is per: "example" for a classification head, "token" for next-token losses."""
    meta = log_meta(records)
    return "example" if meta.get("class_names") or meta.get("task") == "kind" else "token"


def toy_corpus_floor(records):
    """The entropy floor a run's loss can be compared with: only a pretraining run on the toy grammar has one.

    The floor is in nats per character, the unit of a character-tokenizer run's loss (per token); a BPE run's
    curves are per token, so they get none. A log that records no tokenizer is a character run's.
    """
    meta = log_meta(records)
    per_character = meta.get("tokenizer", {"kind": "char"}).get("kind") == "char"
    if meta.get("kind") == "pretrain" and meta.get("corpus") == "toy grammar" and per_character:
        floor = meta.get("floor")
        return float(floor) if isinstance(floor, (int, float)) and not isinstance(floor, bool) else None
    return None


def plot_run_logs(runs, show_floor=True, title=None, logy=False, smooth=0.9):
    """Loss curves of any run logs, drawn as their headers say (what `minilora plot` draws).

    Runs are grouped by the unit of their loss (nats per token for next-token
    losses, nats per example for a classification head), one panel per unit, so
    two kinds of loss never share an axis. The entropy floor is drawn only when
    every run of a panel is a pretraining run on the toy grammar, the one source
    whose exact entropy is known, and show_floor is set; the title follows.

    Inputs: runs, dict label -> log records (read_log); show_floor; title (None: one
    that fits the runs); logy; smooth. Returns a matplotlib Figure.
    """
    _check_runs(runs, smooth)
    panels = {}
    for label, records in runs.items():
        panels.setdefault(loss_unit(records), {})[label] = records
    fig = _new_figure((7.5 * len(panels), 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = []
    for ax, (unit, group) in zip(axes, sorted(panels.items(), key=lambda kv: kv[0] != "token")):
        floors = [toy_corpus_floor(records) for records in group.values()]
        floor = floors[0] if show_floor and None not in floors else None
        _draw_loss_curves(ax, group, floor, smooth, logy, f"loss (nats per {unit})")
        if floor is not None:
            titles.append("Loss falls toward the entropy floor: the gap left is what the model has not learned")
        elif all(log_meta(r).get("kind") == "finetune" for r in group.values()):
            titles.append(f"Fine-tuning loss (nats per {unit}) on the task's training batches: it should fall")
        else:
            titles.append(_default_title(group))
    if title is not None:
        fig.suptitle(title, fontsize=11)
    elif len(titles) == 1:
        axes[0].set_title(titles[0], fontsize=11)
    else:
        for ax, text in zip(axes, titles):
            ax.set_title(text, fontsize=9)
    return fig


def _format_count(n):
    """12345 -> '12.3k', 2500000 -> '2.50M'."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _format_bytes(n):
    """1536 -> '1.5 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:g} B"


_COMPARISON_KEYS = ("method", "trainable_params", "total_params", "metric", "forgetting", "optimizer_state_bytes")


def plot_comparison(rows, title=None, metric_label="task accuracy"):
    """The fine-tuning trade-off in three panels, one bar per method.

    Inputs:
    - rows: list of dicts with keys
        method                 name shown on the axis, e.g. "LoRA r=4"
        trainable_params       number of parameters the optimizer updated (> 0)
        total_params           parameters in the fine-tuned model
        metric                 task score in [0, 1] (accuracy or exact match)
        forgetting             pretraining val loss after minus before (nats per token)
        optimizer_state_bytes  bytes of AdamW moments (optim.optimizer_state_bytes)
    - title: figure title; the default states the three questions the panels answer
    - metric_label: what metric measures, for the middle axis

    Returns a matplotlib Figure:
    - left: trainable parameters on a log axis, annotated with their share of the
      model and the optimizer state they cost
    - middle: the task metric (higher is better)
    - right: forgetting (lower is better; 0 means the pretraining loss is unchanged)
    """
    if not rows:
        raise ValueError("rows: expected a non-empty list of dicts, got an empty one")
    for i, row in enumerate(rows):
        missing = [k for k in _COMPARISON_KEYS if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: expected keys {list(_COMPARISON_KEYS)}, got a row missing {missing}")
        if not row["trainable_params"] > 0:
            raise ValueError(f"rows[{i}]['trainable_params']: expected a positive count, got {row['trainable_params']}")
        if not 0.0 <= row["metric"] <= 1.0:
            raise ValueError(f"rows[{i}]['metric']: expected a score in [0, 1], got {row['metric']}")

    methods = [row["method"] for row in rows]
    y = list(range(len(rows)))
    colours = [f"C{i % 10}" for i in y]
    fig = _new_figure((13, 1.6 + 0.6 * len(rows)))
    ax_p, ax_m, ax_f = fig.subplots(1, 3, sharey=True)

    trainable = [row["trainable_params"] for row in rows]
    ax_p.barh(y, trainable, color=colours)
    ax_p.set_xscale("log")
    # leave room on the right of the log axis for the annotations
    ax_p.set_xlim(10 ** math.floor(math.log10(min(trainable))), 10 ** (math.log10(max(trainable)) + 1.2))
    for yi, row in zip(y, rows):
        share = 100.0 * row["trainable_params"] / row["total_params"]
        ax_p.annotate(f" {_format_count(row['trainable_params'])} ({share:.3g}%)\n"
                      f" Adam state {_format_bytes(row['optimizer_state_bytes'])}",
                      (row["trainable_params"], yi), va="center", fontsize=8)
    ax_p.set_yticks(y, methods)
    ax_p.invert_yaxis()  # first row on top
    ax_p.set_xlabel("trainable parameters\n(log scale; share of model, AdamW state)")
    ax_p.set_title("what is trained", fontsize=10)

    ax_m.barh(y, [row["metric"] for row in rows], color=colours)
    ax_m.set_xlim(0.0, 1.12)
    for yi, row in zip(y, rows):
        ax_m.annotate(f" {row['metric']:.3f}", (row["metric"], yi), va="center", fontsize=8)
    ax_m.set_xlabel(f"{metric_label}\n(higher is better)")
    ax_m.set_title("how well it does the task", fontsize=10)

    forgetting = [row["forgetting"] for row in rows]
    ax_f.barh(y, forgetting, color=colours)
    ax_f.axvline(0.0, color="0.2", linewidth=0.8)
    span = max(max(forgetting), 0.0) - min(min(forgetting), 0.0) or 1.0
    ax_f.set_xlim(min(min(forgetting), 0.0) - 0.05 * span, max(max(forgetting), 0.0) + 0.3 * span)
    for yi, f in zip(y, forgetting):
        ax_f.annotate(f" {f:+.3f}", (max(f, 0.0), yi), va="center", fontsize=8)
    ax_f.set_xlabel("pretraining val loss, after - before\n(nats per token, lower is better)")
    ax_f.set_title("how much it forgets", fontsize=10)

    for ax in (ax_p, ax_m, ax_f):
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title or "Fine-tuning trade-off: how much is trained, how well it scores, how much it forgets",
                 fontsize=11)
    return fig


def texts_outside(fig):
    """The texts of fig that do not fit on its canvas: cut off at the PNG's edge (a title wider than the figure).

    Inputs:
    - fig: a matplotlib Figure (drawn here, with its layout, as savefig draws it)

    Returns a list of strings, [] when everything drawn lies on the canvas: each title, axis label, legend entry
    or annotation that reaches past an edge, and "tick labels of axes N" for an axis whose labels do.
    """
    from matplotlib.text import Text

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # the layout (constrained or tight) runs here, as in savefig
    canvas = fig.bbox

    def outside(box):  # one pixel of slack: antialiasing
        return (box.x0 < canvas.x0 - 1 or box.x1 > canvas.x1 + 1 or box.y0 < canvas.y0 - 1 or box.y1 > canvas.y1 + 1)

    found, tick_labels = [], set()
    for i, ax in enumerate(fig.axes):
        axes = [a for a in (ax.xaxis, ax.yaxis) if a.get_visible()]
        if any(b is not None and outside(b) for b in (a.get_tightbbox(renderer) for a in axes)):
            found.append(f"tick labels of axes {i}")  # from the ticks drawn: a tick off the view keeps a stale label
        tick_labels |= {id(label) for a in (ax.xaxis, ax.yaxis) for tick in a.get_major_ticks() + a.get_minor_ticks()
                        for label in (tick.label1, tick.label2)}
    for text in fig.findobj(Text):
        if id(text) in tick_labels or not text.get_visible() or not text.get_text().strip():
            continue
        if outside(text.get_window_extent(renderer)):
            found.append(text.get_text())
    return found


def save_figure(fig, path, dpi=144):
    """Write fig as a PNG, atomically (temporary file, then rename).

    Inputs:
    - fig: a matplotlib Figure
    - path: the .png file to write; parent directories are created
    - dpi: resolution; 144 gives sharp figures of a few hundred KB at most

    Returns nothing. On failure the temporary file is removed and a previous
    file at path is left untouched.
    """
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"path: expected a file name ending in .png, got {path!r}")
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
