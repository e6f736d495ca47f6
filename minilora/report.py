"""Tables and figures of finished sweeps (`minilora report DIR`).

Every number is a mean ± standard deviation over seeds (n given). Learning
rates and settings are chosen on the validation metric; the test metric is
reported. Forgetting is the rise of the pretraining-corpus loss (nats/char)
over the base model's; "at matched skill" means at the first evaluation whose
validation exact match reached studies.MATCHED_SKILL. A chosen rate that is
still the largest or the smallest its setting tried is marked "(EDGE: ...)"
in its table and listed under it (studies.rate_edges): the best rate may lie
beyond it. A diverged cell (studies.diverged) is listed, and never chosen.
"""

import json
import os

import numpy as np
from matplotlib.figure import Figure

from . import methods
from .studies import FORMATS, MATCHED_SKILL, best_setting, diverged, final_val, rate_edge, rate_edges
from .sweep import read_results

METHOD_COLORS = {name: m.color for name, m in methods.METHODS.items()}


def methods_in(records):
    """The methods the records hold, in methods.METHODS' order (the order of every table and legend)."""
    present = {r["cell"]["method"] for r in records}
    return [m for m in methods.METHODS if m in present]


def mean_spread(values, digits=3):
    """'m ± s (n=k)' with the sample standard deviation; '-' for no values."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    s = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {s:.{digits}f} (n={len(values)})"


def forgetting_at_skill(record, level=MATCHED_SKILL):
    """Forgetting at the first evaluation whose validation metric reached level, or None."""
    for e in record["evals"]:
        if e["val_metric"] >= level:
            return e["forgetting"]
    return None


def steps_to_skill(record, level=MATCHED_SKILL):
    for e in record["evals"]:
        if e["val_metric"] >= level:
            return e["step"]
    return None


def _table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _group(records, key):
    groups = {}
    for r in records:
        groups.setdefault(key(r["cell"]), []).append(r)
    return groups


def _mean_delta(record):
    d = record["evals"][-1]["delta"]
    adapted = [v for v in d.values() if v > 0]
    return float(np.mean(adapted)) if adapted else 0.0


def method_rows(records):
    """Per method: the learning rate chosen on validation and its results over seeds.

    A two-stage study (kind: every rate at seed 0, then more seeds at the best) is read as its grid chose:
    on seed 0's validation metric, so the rate reported is the one its seeds 1.. ran at.
    """
    rows, chosen = [], {}
    pool = [r for r in records if r["cell"]["seed"] == 0] if records and records[0]["cell"]["study"] == "kind" \
        else records
    for m in methods_in(records):
        lr = best_setting(pool, lambda c, m=m: c["method"] == m, lambda c: c["lr"])
        if lr is None:
            continue
        chosen[m] = lr
        rs = [r for r in records if r["cell"]["method"] == m and r["cell"]["lr"] == lr]
        at = [forgetting_at_skill(r) for r in rs]
        mine = [r for r in pool if r["cell"]["method"] == m]
        rows.append((m, f"{rs[0]['trainable_params']:,}", f"{lr:g}" + _edge_mark(mine),
                     mean_spread([final_val(r) for r in rs]),
                     mean_spread([r["test_metric"] for r in rs]),
                     mean_spread([r["evals"][-1]["forgetting"] for r in rs]),
                     mean_spread(at) + f", reached {sum(a is not None for a in at)}/{len(at)}",
                     mean_spread([_mean_delta(r) for r in rs])))
    head = ("method", "trainable", "lr (chosen on val)", "val metric", "test metric", "forgetting at end",
            f"forgetting at val >= {MATCHED_SKILL}", "mean ||dW||/||W||")
    return _table(head, rows), chosen


def _edge_mark(records):
    """' (EDGE: the largest tried)' when the rate the records choose is at an edge of the rates they tried, else ''."""
    edge = rate_edge({r["cell"]["lr"] for r in records}, records)
    return f" (EDGE: the {edge} tried)" if edge else ""


def edge_lines(records):
    """The report's word on rates: which cells diverged, and every chosen rate still at an edge of its ladder."""
    lines = []
    gone = [r for r in records if diverged(r)]
    if gone:
        lines.append("Diverged (tried, never chosen): " + "; ".join(
            f"{r['cell']['method']} lr {r['cell']['lr']:g} seed {r['cell']['seed']}" for r in gone) + ".")
    edges = rate_edges(records)
    if edges:
        lines.append("Chosen rates still at an edge of the rates tried (the best may lie beyond; "
                     "`minilora sweep` extends the ladder): " + "; ".join(
                         f"{label}: {lr:g}, the {edge} of {', '.join(f'{x:g}' for x in rates)}"
                         for label, lr, edge, rates in edges) + ".")
    return lines


def skill_rows(records):
    """Every (method, lr): how many seeds reached the skill level, when, and what they had forgotten by then."""
    rows = []
    for (m, lr), rs in sorted(_group(records, lambda c: (c["method"], c["lr"])).items(),
                              key=lambda kv: (list(methods.METHODS).index(kv[0][0]), kv[0][1])):
        at = [forgetting_at_skill(r) for r in rs]
        steps = [steps_to_skill(r) for r in rs]
        rows.append((m, f"{lr:g}", f"{sum(a is not None for a in at)}/{len(at)}", mean_spread(steps, 0),
                     mean_spread(at), mean_spread([r["test_metric"] for r in rs])))
    return _table(("method", "lr", f"seeds reaching val >= {MATCHED_SKILL}", "at step",
                   "forgetting then", "test metric at the end"), rows)


def figure_forgetting(records, title_note=""):
    """Learning against forgetting at every evaluation, one colour per method (Biderman et al. 2024's plot)."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for m in methods_in(records):
        color = METHOD_COLORS[m]
        rs = [r for r in records if r["cell"]["method"] == m]
        lrs = sorted({r["cell"]["lr"] for r in rs})
        for r in rs:
            shade = 0.35 + 0.65 * lrs.index(r["cell"]["lr"]) / max(1, len(lrs) - 1)
            f = [e["forgetting"] for e in r["evals"]]
            v = [e["val_metric"] for e in r["evals"]]
            ax.plot(f, v, "-o", color=color, alpha=shade, ms=2.5, lw=0.8)
        if rs:
            ax.plot([], [], "-o", color=color, label=f"{m} (lr {', '.join(f'{x:g}' for x in lrs)}; darker = larger)")
    ax.axhline(MATCHED_SKILL, color="gray", ls=":", lw=1)
    ax.set_xlabel("forgetting: pretraining-corpus loss - base loss (nats/char)")
    ax.set_ylabel("validation accuracy" if records[0]["cell"]["task"] == "kind" else "validation exact match")
    ax.set_title("Every evaluation of every run")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: the runs fill the axes
    _, chosen = method_rows(records)
    names = [m for m in methods_in(records) if m in chosen]
    for i, m in enumerate(names):
        rs = [r for r in records if r["cell"]["method"] == m and r["cell"]["lr"] == chosen[m]]
        at = [a for a in (forgetting_at_skill(r) for r in rs) if a is not None]
        end = [r["evals"][-1]["forgetting"] for r in rs]
        for j, (vals, label) in enumerate(((at, f"at val >= {MATCHED_SKILL}"), (end, "at the end"))):
            if vals:
                bx.bar(i + 0.38 * j, np.mean(vals), 0.36, yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0,
                       color=METHOD_COLORS[m], alpha=1.0 - 0.5 * j, capsize=3,
                       label=label if i == 0 else None)
                bx.plot([i + 0.38 * j] * len(vals), vals, "k.", ms=4)
    bx.set_xticks([i + 0.19 for i in range(len(names))], [f"{m}\nlr {chosen[m]:g}" for m in names])
    bx.set_ylabel("forgetting (nats/char), mean ± sd over seeds")
    bx.set_title("Each method at its best learning rate (chosen on val)")
    bx.legend(fontsize=8)
    fig.suptitle(f"Learning versus forgetting on '{records[0]['cell']['task']}'" + title_note)
    return fig


def format_rows(records):
    rows = []
    for m in methods_in(records):
        for name, (end, replay) in FORMATS.items():
            rs = [r for r in records if r["cell"]["method"] == m and r["cell"]["end_marker"] == end
                  and r["cell"]["replay"] == replay]
            if not rs:
                continue
            at = [forgetting_at_skill(r) for r in rs]
            rows.append((m, name, f"{rs[0]['cell']['lr']:g}", mean_spread([r["test_metric"] for r in rs]),
                         mean_spread(at) + f", reached {sum(a is not None for a in at)}/{len(at)}",
                         mean_spread([r["evals"][-1]["forgetting"] for r in rs])))
    return _table(("method", "format", "lr", "test metric", f"forgetting at val >= {MATCHED_SKILL}",
                   "forgetting at end"), rows)


def figure_format(records, title_note=""):
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    names = list(FORMATS)
    markers = dict(zip(names, "os^D"))
    for i, m in enumerate(methods_in(records)):
        for j, name in enumerate(names):
            end, replay = FORMATS[name]
            rs = [r for r in records if r["cell"]["method"] == m and r["cell"]["end_marker"] == end
                  and r["cell"]["replay"] == replay]
            bx.scatter([r["evals"][-1]["forgetting"] for r in rs], [r["test_metric"] for r in rs],
                       color=METHOD_COLORS[m], marker=markers[name], s=40, label=f"{m}, {name}")
            vals = [a for a in (forgetting_at_skill(r) for r in rs) if a is not None]
            x = j + 0.4 * i
            if vals:
                ax.bar(x, np.mean(vals), 0.38, yerr=np.std(vals, ddof=1) if len(vals) > 1 else 0, capsize=3,
                       color=METHOD_COLORS[m], label=m if j == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", ms=4)
            ax.text(x, 0.05, f"{len(vals)}/{len(rs)}", ha="center", fontsize=7)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.set_ylabel(f"forgetting at val exact match >= {MATCHED_SKILL} (nats/char)")
    ax.set_title(f"At matched skill (k/n: seeds that reached {MATCHED_SKILL})")
    ax.legend()
    bx.set_xlabel("forgetting at the end (nats/char)")
    bx.set_ylabel("test exact match at the end")
    bx.set_title("What each fix costs: every run, 600 steps")
    bx.legend(fontsize=7)
    fig.suptitle("Where forgetting comes from: the response format, and replay of corpus text" + title_note)
    return fig


def energy_ranks(singular_values, fraction=0.9):
    """How many singular directions hold `fraction` of the squared Frobenius norm."""
    s2 = np.asarray(singular_values) ** 2
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), fraction) + 1)


def rank_rows(records, full_records):
    rows = []
    for rs_flag in (False, True):
        for r_ in sorted({r["cell"]["rank"] for r in records}):
            lr = best_setting(records, lambda c: c["rank"] == r_ and c["rslora"] == rs_flag, lambda c: c["lr"])
            if lr is None:
                continue
            rs = [r for r in records if r["cell"]["rank"] == r_ and r["cell"]["rslora"] == rs_flag
                  and r["cell"]["lr"] == lr]
            mine = [r for r in records if r["cell"]["rank"] == r_ and r["cell"]["rslora"] == rs_flag]
            rows.append(("rsLoRA 16/sqrt(r)" if rs_flag else "LoRA 16/r", r_, f"{lr:g}" + _edge_mark(mine),
                         mean_spread([final_val(r) for r in rs]), mean_spread([r["test_metric"] for r in rs]),
                         mean_spread([_mean_delta(r) for r in rs])))
    table = _table(("scaling", "r", "lr (val)", "val metric", "test metric", "mean ||sBA||/||W||"), rows)
    energy = []
    for rec in full_records:
        for prefix, sv in rec.get("singular_values", {}).items():
            energy.append((prefix, energy_ranks(sv), len(sv)))
    return table, energy


def figure_rank(records, full_records, title_note=""):
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for rec in full_records[:1]:
        for prefix, sv in rec.get("singular_values", {}).items():
            s2 = np.asarray(sv) ** 2
            ax.plot(np.arange(1, len(s2) + 1), np.cumsum(s2) / s2.sum(), lw=1, label=prefix)
    ax.axhline(0.9, color="gray", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("k, number of singular directions")
    ax.set_ylabel("fraction of ||dW||_F^2 in the top k")
    ax.set_title("Full fine-tuning's dW (best-lr run, seed 0)")
    ax.legend(fontsize=6, ncol=2)
    for rs_flag, style in ((False, "-o"), (True, "--s")):
        xs, ms, ss = [], [], []
        for r_ in sorted({r["cell"]["rank"] for r in records}):
            lr = best_setting(records, lambda c: c["rank"] == r_ and c["rslora"] == rs_flag, lambda c: c["lr"])
            rs = [r["test_metric"] for r in records if r["cell"]["rank"] == r_ and r["cell"]["rslora"] == rs_flag
                  and r["cell"]["lr"] == lr]
            if rs:
                xs.append(r_)
                ms.append(np.mean(rs))
                ss.append(np.std(rs, ddof=1) if len(rs) > 1 else 0.0)
        bx.errorbar(xs, ms, yerr=ss, fmt=style, capsize=3, label="rsLoRA, s = 16/sqrt(r)" if rs_flag else "LoRA, s = 16/r")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("LoRA rank r (q, k, v, o)")
    bx.set_ylabel("test exact match (lr chosen per r on val)")
    seeds = len({r["cell"]["seed"] for r in records})
    bx.set_title(f"Task score against rank ({seeds} seed{'s' * (seeds > 1)}, {records[0]['cell']['steps']} steps)")
    bx.legend()
    fig.suptitle("Intrinsic rank: how many directions does fine-tuning use?" + title_note)
    return fig


def prompt_rows(records):
    rows = []
    for key, rs in sorted(_group(records, lambda c: (c["prompt_init"], c["n_prompt"], c["lr"])).items()):
        rows.append((key[0], key[1], f"{key[2]:g}", mean_spread([final_val(r) for r in rs]),
                     mean_spread([r["test_metric"] for r in rs]), mean_spread([r["evals"][-1]["forgetting"] for r in rs])))
    return _table(("init", "P", "lr", "val metric", "test metric", "forgetting at end"), rows)


def figure_prompt(records, title_note=""):
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    grid = [r for r in records if r["cell"]["prompt_init"] == "vocab"]
    lrs = sorted({r["cell"]["lr"] for r in grid})
    ps = sorted({r["cell"]["n_prompt"] for r in grid})
    M = np.full((len(ps), len(lrs)), np.nan)
    for (p, lr), rs in _group(grid, lambda c: (c["n_prompt"], c["lr"])).items():
        M[ps.index(p), lrs.index(lr)] = np.mean([final_val(r) for r in rs])
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(len(ps)):
        for j in range(len(lrs)):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
    ax.set_yticks(range(len(ps)), ps)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("prompt length P")
    ax.set_title("Validation exact match (init: vocab)")
    fig.colorbar(im, ax=ax)
    inits = _group([r for r in records if r["cell"]["n_prompt"] == 16 and r["cell"]["lr"] == 1e-1],
                   lambda c: c["prompt_init"])
    names = [n for n in ("vocab", "random", "text") if n in inits]
    bx.bar(names, [np.mean([r["test_metric"] for r in inits[n]]) for n in names], color="tab:green")
    bx.set_ylabel("test exact match")
    bx.set_title("Init at lr 0.1, P = 16")
    fig.suptitle("Prompt tuning, tuned" + title_note)
    return fig


def scale_rows(records):
    rows = []
    for base in ("small", "default", "large"):
        for m in methods_in(records):
            rs = [r for r in records if r["cell"]["base"] == base and r["cell"]["method"] == m]
            if rs:
                rows.append((base, m, f"{rs[0]['cell']['lr']:g}", rs[0]["trainable_params"],
                             mean_spread([r["test_metric"] for r in rs]),
                             mean_spread([r["evals"][-1]["forgetting"] for r in rs])))
    return _table(("base model", "method", "lr", "trainable", "test metric", "forgetting at end"), rows)


def figure_scale(records, sizes, title_note=""):
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for m in methods_in(records):
        color = METHOD_COLORS[m]
        xs, ys = [], []
        for base in ("small", "default", "large"):
            rs = [r["test_metric"] for r in records if r["cell"]["base"] == base and r["cell"]["method"] == m]
            if rs and base in sizes:
                xs.append(sizes[base])
                ys.append(np.mean(rs))
        ax.plot(xs, ys, "-o", color=color, label=m)
    ax.set_xscale("log")
    ax.set_xlabel("base model parameters")
    ax.set_ylabel("test exact match")
    ax.legend()
    fig.suptitle("Does prompt tuning catch up as the model grows? (three toy sizes)" + title_note)
    return fig


def figure_hyper(records, title_note=""):
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax, bx, cx = fig.subplots(1, 3)
    small = [r for r in records if r["cell"]["n_train"] in (100, 1000) and r["cell"]["batch_size"] == 16
             and r["cell"]["alpha"] == 16.0 and r["cell"]["steps"] == 20 * max(1, r["cell"]["n_train"] // 16)]
    tx = ax.twinx()
    for r in small:
        per_epoch = r["cell"]["eval_every"]
        ev = r["evals"][1:]
        epochs = [e["step"] / per_epoch for e in ev]
        n = r["cell"]["n_train"]
        ax.plot(epochs, [e["val_metric"] for e in ev], "-o", ms=3, label=f"val exact match, {n} examples")
        tx.plot(epochs, [e["train_loss"] for e in ev], ":", label=f"train loss, {n} examples")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation exact match")
    tx.set_ylabel("training loss (nats/token, response)")
    # one legend for both axes, under the panel, where it covers no curve
    handles = ax.get_legend_handles_labels()[0] + tx.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, ncols=2, loc="upper center",
              bbox_to_anchor=(0.5, -0.16))
    ax.set_title("Epochs on a small dataset")
    batch = _group([r for r in records if r["cell"]["steps"] * r["cell"]["batch_size"] == 3200],
                   lambda c: c["batch_size"])
    bs = sorted(batch)
    bx.plot(bs, [np.mean([r["test_metric"] for r in batch[b]]) for b in bs], "-o")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("batch size (3,200 examples seen in all)")
    bx.set_ylabel("test exact match")
    bx.set_title("Batch size at equal examples")
    alpha = _group([r for r in records if r["cell"]["steps"] * r["cell"]["batch_size"] != 3200
                    and r["cell"]["n_train"] == 2000], lambda c: c["alpha"])
    al = sorted(alpha)
    cx.plot(al, [np.mean([r["test_metric"] for r in alpha[a]]) for a in al], "-o", label="test exact match")
    cx.plot(al, [np.mean([r["evals"][-1]["forgetting"] for r in alpha[a]]) for a in al], "-s",
            label="forgetting (nats/char)")
    cx.set_xscale("log", base=2)
    cx.set_xlabel("alpha (r = 8, so s = alpha / 8)")
    cx.set_title("Alpha at fixed rank")
    cx.legend(fontsize=8)
    fig.suptitle("The post's hyperparameter table, measured (LoRA)" + title_note)
    return fig


def hyper_rows(records):
    rows = []
    for r in records:
        c = r["cell"]
        rows.append((c["n_train"], c["batch_size"], c["steps"], c["alpha"], f"{c['lr']:g}",
                     f"{r['evals'][-1]['train_loss']:.3f}", f"{max(e['val_metric'] for e in r['evals']):.3f}",
                     f"{final_val(r):.3f}", f"{r['test_metric']:.3f}", f"{r['evals'][-1]['forgetting']:.3f}"))
    return _table(("examples", "batch", "steps", "alpha", "lr", "final train loss", "best val", "final val",
                   "test", "forgetting"), sorted(rows))


def budget_size(cell):
    """What sizes a method in the budget study, as a label: P prompt vectors, P prefix positions, LoRA's rank."""
    return {"prompt": f"P {cell['n_prompt']}", "prefix": f"P {cell.get('n_prefix')}",
            "lora": f"r {cell['rank']}"}.get(cell["method"], "")


def _budget_points(records):
    """(method, size, trainable parameters, [test metrics over seeds]) per method and size, by parameters."""
    groups = _group(records, lambda c: (c["method"], budget_size(c)))
    points = [(m, size, rs[0]["trainable_params"], [r["test_metric"] for r in rs]) for (m, size), rs in groups.items()]
    return sorted(points, key=lambda p: (list(methods.METHODS).index(p[0]), p[2]))


def budget_rows(records):
    """Per method and size: the trainable parameters, the learning rate (the forgetting study's) and the scores."""
    rows = []
    for m, size, n, tests in _budget_points(records):
        rs = [r for r in records if r["cell"]["method"] == m and budget_size(r["cell"]) == size]
        rows.append((m, size or "-", f"{n:,}", f"{rs[0]['cell']['lr']:g}", mean_spread([final_val(r) for r in rs]),
                     mean_spread(tests), mean_spread([r["evals"][-1]["forgetting"] for r in rs])))
    return _table(("method", "size", "trainable", "lr (chosen in study 1)", "val metric", "test metric",
                   "forgetting at end"), rows)


def figure_budget(records, title_note="", longer=()):
    """Test score against trainable parameters, one curve per method, each point a size (mean ± sd over seeds).

    longer: the forgetting study's records, drawn as open markers: each method at its default size and chosen
    rate after that study's longer training (600 steps), beside the budget study's 250.
    """
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    points = _budget_points(records)
    if longer:
        _, chosen = method_rows(longer)
        for m in methods_in(records):
            rs = [r for r in longer if r["cell"]["method"] == m and r["cell"]["lr"] == chosen.get(m)]
            if rs:
                tests = [r["test_metric"] for r in rs]
                ax.errorbar([rs[0]["trainable_params"]], [np.mean(tests)], yerr=[np.std(tests, ddof=1)], fmt="o",
                            mfc="white", color=METHOD_COLORS[m], capsize=3, ms=7,
                            label=f"{m}, {rs[0]['cell']['steps']} steps (study 1)")
    for m in methods_in(records):
        mine = [p for p in points if p[0] == m]
        x = [p[2] for p in mine]
        y = [np.mean(p[3]) for p in mine]
        e = [np.std(p[3], ddof=1) if len(p[3]) > 1 else 0.0 for p in mine]
        ax.errorbar(x, y, yerr=e, fmt="-o", color=METHOD_COLORS[m], capsize=3, label=m)
        for xi, yi, (_, size, _, _) in zip(x, y, mine):
            if size:
                ax.annotate(size, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test exact match, mean ± sd over seeds")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    steps = sorted({r["cell"]["steps"] for r in records})
    ax.set_title(f"What each method learns of 'subject' at a given size, {'/'.join(map(str, steps))} steps"
                 + title_note)
    return fig


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _method_results(studies_dir):
    """Per method of the forgetting study, in methods.METHODS' order, the records the summary reads: a list of
    (method, its rate on `subject`, the forgetting study's records at that rate, its rate on `kind` or None,
    the kind study's records at that rate)."""
    forget = read_results(os.path.join(studies_dir, "forgetting", "results.jsonl"))
    kind = read_results(os.path.join(studies_dir, "kind", "results.jsonl"))
    _, chosen = method_rows(forget)
    _, chosen_kind = method_rows(kind) if kind else (None, {})
    found = []
    for m in methods_in(forget):
        if m not in chosen:
            continue
        rs = [r for r in forget if r["cell"]["method"] == m and r["cell"]["lr"] == chosen[m]]
        ks = [r for r in kind if r["cell"]["method"] == m and r["cell"]["lr"] == chosen_kind.get(m)]
        found.append((m, chosen[m], rs, chosen_kind.get(m), ks))
    return found


def method_summary(studies_dir):
    """One row per method across the comparison studies, for the front page. Returns (markdown table, rows).

    Per method: its trainable parameters; its test exact match on `subject` and its
    forgetting at matched skill (forgetting study), and its test accuracy on `kind`
    (kind study), each at the learning rate chosen on validation in that study; then its
    measured step time, every method's steps timed in turn (benchmarks/step_costs.json, default
    config, batch 16 x 128), and the peak memory of a step (benchmarks/memory.json), read beside
    studies_dir when present.
    Spreads are over 3 seeds unless an (n=k) says otherwise.
    """
    bench = os.path.dirname(os.path.abspath(studies_dir))
    speed = _read_json(os.path.join(bench, "step_costs.json")).get("strategies", {})
    memory = _read_json(os.path.join(bench, "memory.json")).get("strategies", {})

    def short(values):
        return mean_spread(values).replace(" (n=3)", "")

    def at_skill(at):
        reached = [a for a in at if a is not None]
        if not reached:
            return f"not reached (0 of {len(at)} seeds)"
        text = mean_spread(reached).split(" (n=")[0]
        return text if len(reached) == len(at) else f"{text} ({len(reached)} of {len(at)} seeds reached it)"

    rows = []
    for m, lr, rs, lr_kind, ks in _method_results(studies_dir):
        at = [forgetting_at_skill(r) for r in rs]
        step = speed.get(m)
        peak = memory.get(m, {}).get("peak_step_tracemalloc")
        rows.append((m, f"{rs[0]['trainable_params']:,}",
                     f"{lr:g}" + (f" / {lr_kind:g}" if lr_kind is not None else ""),
                     short([r["test_metric"] for r in rs]),
                     at_skill(at),
                     short([r["test_metric"] for r in ks]),
                     "-" if step is None else f"{step['ms']:.0f} ({step['over_full']:.2f})",
                     "-" if peak is None else f"{peak / 2**20:.1f}"))
    head = ("method", "trainable", "lr (`subject` / `kind`)", "`subject` test exact match",
            f"forgetting at val >= {MATCHED_SKILL}", "`kind` test accuracy", "step, ms (× full's)", "peak memory (MiB)")
    return _table(head, rows), rows


def figure_methods(studies_dir, title_note=""):
    """Every method side by side, as the front page shows them: what it trains, how well it learns `subject`
    (study 1) and `kind` (study 7), and what it forgets of pretraining on the way; each at the learning rate
    chosen on validation in that study. Bars are means over seeds, whiskers one sd, dots the seeds."""
    results = _method_results(studies_dir)
    fig = Figure(figsize=(8.0, 6.4), layout="constrained")
    (ax_p, ax_s), (ax_k, ax_f) = fig.subplots(2, 2, sharey=True)
    names = [m for m, *_ in results]
    y = np.arange(len(names))
    colors = [METHOD_COLORS[m] for m in names]

    trainable = [rs[0]["trainable_params"] for _, _, rs, _, _ in results]
    ax_p.barh(y, trainable, color=colors)
    ax_p.set_xscale("log")
    ax_p.set_xlim(5e2, 5e6)  # room on the right for the counts
    for yi, n in zip(y, trainable):
        ax_p.annotate(f" {n:,}", (n, yi), va="center", fontsize=8)
    ax_p.set_xlabel("trainable parameters (log scale)")
    ax_p.set_title("what it trains", fontsize=10)

    def bars(ax, per_method, xlabel, title, xmax=1.0):
        for yi, values, color in zip(y, per_method, colors):
            values = [v for v in values if v is not None]
            if not values:
                ax.annotate(" not reached", (0.0, yi), va="center", fontsize=8, color="0.3")
                continue
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.barh(yi, np.mean(values), xerr=sd, color=color, alpha=0.85, capsize=3)
            ax.plot(values, [yi] * len(values), "k.", ms=4)
            if len(values) < len(per_method[yi]):
                ax.annotate(f"  {len(values)} of {len(per_method[yi])} seeds", (np.mean(values) + sd, yi), va="center",
                            fontsize=8, color="0.3")
        ax.set_xlim(0.0, xmax)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)

    bars(ax_s, [[r["test_metric"] for r in rs] for _, _, rs, _, _ in results],
         "test exact match (higher is better)", f"learns 'subject' ({results[0][2][0]['cell']['steps']} steps)", 1.05)
    bars(ax_k, [[r["test_metric"] for r in ks] for *_, ks in results], "test accuracy (higher is better)",
         "learns 'kind', a head on top" + (f" ({ks[0]['cell']['steps']} steps)" if (ks := results[0][4]) else ""),
         1.05)
    forgetting = [[forgetting_at_skill(r) for r in rs] for _, _, rs, _, _ in results]
    most = max((v for vs in forgetting for v in vs if v is not None), default=1.0)
    bars(ax_f, forgetting, "pretraining-corpus loss - base's (nats/char;\nlower is better)",
         f"forgets on 'subject', at val >= {MATCHED_SKILL}", 1.15 * most)
    for ax in (ax_p, ax_s, ax_k, ax_f):
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_yticks(y, names)
    ax_p.invert_yaxis()  # the first method on top (the y axis is shared)
    n_seeds = len(results[0][2])
    fig.suptitle(f"{len(names)} ways to fine-tune, each at its learning rate chosen on validation\n"
                 f"bars: mean over {n_seeds} seeds, whiskers: ± sd, dots: the seeds" + title_note, fontsize=10)
    return fig


def summary(studies_dir, figures_dir=None):
    """The comparison of every method across studies (`minilora report benchmarks/studies`): the front page's
    table (method_summary) and figure (figure_methods, methods.png). Returns (text, {name: Figure})."""
    for study in ("forgetting", "kind"):
        if not os.path.isfile(os.path.join(studies_dir, study, "results.jsonl")):
            raise ValueError(f"DIR: expected the studies folder, with {study}/results.jsonl, got {studies_dir}")
    table, _ = method_summary(studies_dir)
    figs = {"methods.png": figure_methods(studies_dir)}
    if figures_dir:
        from .plot import save_figure

        for name, fig in figs.items():
            save_figure(fig, os.path.join(figures_dir, name))
    return "## every method, studies 1 (forgetting) and 7 (kind)\n\n" + table, figs


def report(study_dir, figures_dir=None, title_note=""):
    """Tables (markdown text) and figures of a finished study folder; returns (text, {name: Figure})."""
    study = os.path.basename(os.path.normpath(study_dir))
    records = read_results(os.path.join(study_dir, "results.jsonl"))
    if not records:
        raise ValueError(f"DIR: expected a study folder with results.jsonl, got {study_dir} without results")
    parent = os.path.dirname(os.path.abspath(study_dir))
    wall = sum(r.get("wall_s") or 0.0 for r in records)
    text = [f"## {study}: {len(records)} cells, {wall / 60:.1f} min of cell time"]
    figs = {}
    if study in ("forgetting", "qlora", "kind"):
        table, _ = method_rows(records)
        text.append(table)
        text.append(skill_rows(records))
        note = " (LoRA on the float32 base vs on its NF4 quantization)" if study == "qlora" else ""
        figs[f"study_{study}.png"] = figure_forgetting(records, note + title_note)
    elif study == "budget":
        text.append(budget_rows(records))
        figs["study_budget.png"] = figure_budget(records, title_note,
                                                 read_results(os.path.join(parent, "forgetting", "results.jsonl")))
    elif study == "format":
        text.append(format_rows(records))
        figs["study_format.png"] = figure_format(records, title_note)
    elif study == "rank":
        forget = read_results(os.path.join(parent, "forgetting", "results.jsonl"))
        _, chosen = method_rows(forget) if forget else (None, {})
        full = [r for r in forget if r["cell"]["method"] == "full" and r["cell"]["lr"] == chosen.get("full")]
        table, energy = rank_rows(records, full)
        text.append(table)
        if energy:
            ks = [k for _, k, _ in energy]
            text.append(f"Full fine-tuning's dW (forgetting study, best lr, {len(full)} seeds, "
                        f"{len(energy)} matrices): 90% of the energy lies in the top {min(ks)} to {max(ks)} "
                        f"of {energy[0][2]} directions (median {int(np.median(ks))}).")
        figs["study_rank.png"] = figure_rank(records, full, title_note)
    elif study == "prompt":
        text.append(prompt_rows(records))
        figs["study_prompt.png"] = figure_prompt(records, title_note)
    elif study == "scale":
        from .sweep import BASES
        from .model import param_shapes

        sizes = {b: int(sum(np.prod(s) for s in param_shapes(BASES[b].model).values())) for b in BASES}
        text.append(scale_rows(records))
        figs["study_scale.png"] = figure_scale(records, sizes, title_note)
    elif study == "hyper":
        text.append(hyper_rows(records))
        figs["study_hyper.png"] = figure_hyper(records, title_note)
    else:
        raise ValueError(f"DIR: expected a folder named after a study, got {study!r}")
    text += edge_lines(records)
    if figures_dir:
        from .plot import save_figure

        for name, fig in figs.items():
            save_figure(fig, os.path.join(figures_dir, name))
    return "\n\n".join(text), figs
