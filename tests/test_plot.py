"""Figures build headless from synthetic logs, are labelled, and save as PNG."""

import json

import numpy as np
import pytest
from matplotlib.figure import Figure

from minilora.plot import ema, plot_comparison, plot_loss_curves, read_log, save_figure, texts_outside


def _log(n=40, seed=0):
    rng = np.random.default_rng(seed)
    records = [{"meta": {"config": {"d_model": 16}}}]
    for step in range(n):
        record = {"step": step, "train_loss": 1.0 + 3.0 * np.exp(-step / 10) + 0.05 * rng.standard_normal(), "lr": 1e-3}
        if step % 10 == 0:
            record["val_loss"] = 1.05 + 3.0 * np.exp(-step / 10)
        records.append(record)
    records.append({"step": n, "val_loss": 1.1})  # an evaluation-only record
    return records


def test_read_log_skips_blank_lines_and_keeps_headers(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"meta": {"seed": 1}}\n\n{"step": 0, "train_loss": 4.2}\n')
    assert read_log(path) == [{"meta": {"seed": 1}}, {"step": 0, "train_loss": 4.2}]


def test_read_log_names_the_bad_line(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "train_loss": 4.2}\n{"step": 1, "train_loss": \n')
    with pytest.raises(ValueError, match=r"run\.jsonl, line 2"):
        read_log(path)
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2.*JSON object"):
        read_log(path)


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0], abs=1e-12)
    # by hand: s1 = 0.5, s2 = 0.5*0.5 + 0.5*3 = 1.75; corrected 0.5/0.5 = 1, 1.75/0.75
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 1.75 / 0.75], abs=1e-12)
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    with pytest.raises(ValueError, match="beta"):
        ema([1.0], 1.0)


def test_loss_curves_have_labels_floor_and_all_series():
    fig = plot_loss_curves({"small": _log(), "large": _log(seed=1)}, floor=1.0, smooth=0.8)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "step"
    assert ax.get_ylabel() == "loss (nats per token)"
    assert ax.get_title()
    floors = [line for line in ax.get_lines() if "entropy floor" in line.get_label()]
    assert len(floors) == 1
    assert list(floors[0].get_ydata()) == [1.0, 1.0] and floors[0].get_linestyle() == "--"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "small train (EMA 0.8)" in labels and "large val" in labels
    # one colour per run: small's train and val lines share it
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert by_label["small train (EMA 0.8)"].get_color() == by_label["small val"].get_color()
    assert by_label["small val"].get_color() != by_label["large val"].get_color()
    # val points come from training records and the evaluation-only record, in step order
    assert list(by_label["small val"].get_xdata()) == [0, 10, 20, 30, 40]


def test_loss_curves_reject_runs_without_training_records():
    with pytest.raises(ValueError, match="runs\\['empty'\\]"):
        plot_loss_curves({"empty": [{"meta": {}}]})
    with pytest.raises(ValueError, match="smooth"):
        plot_loss_curves({"a": _log()}, smooth=1.5)


def _rows():
    return [
        dict(method="full", trainable_params=20000, total_params=20000, metric=0.9, forgetting=0.3,
             optimizer_state_bytes=160000),
        dict(method="LoRA r=2", trainable_params=512, total_params=20512, metric=0.85, forgetting=0.02,
             optimizer_state_bytes=4096),
        dict(method="prompt", trainable_params=64, total_params=20064, metric=0.5, forgetting=0.0,
             optimizer_state_bytes=512),
    ]


def test_comparison_has_three_labelled_panels():
    fig = plot_comparison(_rows())
    assert len(fig.axes) == 3
    ax_p, ax_m, ax_f = fig.axes
    assert ax_p.get_xscale() == "log"
    assert all(ax.get_xlabel() for ax in fig.axes)
    assert [t.get_text() for t in ax_p.get_yticklabels()] == ["full", "LoRA r=2", "prompt"]
    widths = [patch.get_width() for patch in ax_m.patches]
    assert widths == pytest.approx([0.9, 0.85, 0.5])
    assert fig.get_suptitle()


def test_comparison_rejects_bad_rows():
    rows = _rows()
    del rows[1]["forgetting"]
    with pytest.raises(ValueError, match=r"rows\[1\].*forgetting"):
        plot_comparison(rows)
    rows = _rows()
    rows[0]["metric"] = 90.0
    with pytest.raises(ValueError, match=r"rows\[0\]\['metric'\]"):
        plot_comparison(rows)


def test_save_figure_writes_png_atomically(tmp_path):
    path = tmp_path / "figs" / "loss.png"
    log_path = tmp_path / "run.jsonl"
    log_path.write_text("\n".join(json.dumps(r) for r in _log()) + "\n")
    save_figure(plot_loss_curves({"run": read_log(log_path)}, floor=1.0), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_figure(plot_comparison(_rows()), tmp_path / "figs" / "cmp.png")
    assert (tmp_path / "figs" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["cmp.png", "loss.png"]  # no temp left
    with pytest.raises(ValueError, match="path.*png"):
        save_figure(Figure(), tmp_path / "x.pdf")


def _run_log(kind, corpus="toy grammar", classification=False, seed=0, val=True):
    """A log as a run writes it: its header says what kind of run it was."""
    meta = {"kind": kind, "floor": 0.532, "corpus": corpus} if kind == "pretrain" else \
        {"kind": kind, "task": "kind" if classification else "subject",
         "class_names": ["animal", "person", "thing"] if classification else None}
    records = _log(seed=seed)
    if not val:
        records = [{k: v for k, v in r.items() if k != "val_loss"} for r in records]
    return [{"meta": meta}, *[r for r in records[1:] if "train_loss" in r or val]]


def _floors(ax):
    return [line for line in ax.get_lines() if "entropy floor" in line.get_label()]


def test_plot_run_logs_draws_the_floor_only_for_toy_corpus_pretraining():
    from minilora.plot import plot_run_logs

    (ax,) = plot_run_logs({"pre": _run_log("pretrain")}).axes
    assert len(_floors(ax)) == 1 and "entropy floor" in ax.get_title()
    for runs in ({"text": _run_log("pretrain", corpus="my.txt")},  # another text: its entropy is unknown
                 {"ft": _run_log("finetune", val=False)},
                 {"pre": _run_log("pretrain"), "ft": _run_log("finetune", val=False, seed=1)}):
        (ax,) = plot_run_logs(runs).axes
        assert not _floors(ax) and "floor" not in ax.get_title(), list(runs)
    (ax,) = plot_run_logs({"pre": _run_log("pretrain")}, show_floor=False).axes
    assert not _floors(ax) and "floor" not in ax.get_title()


def test_plot_run_logs_titles_promise_only_what_is_drawn():
    from minilora.plot import plot_run_logs

    (ax,) = plot_run_logs({"ft": _run_log("finetune", val=False)}).axes
    assert "validation" not in ax.get_title().lower() and "Fine-tuning" in ax.get_title()
    (ax,) = plot_run_logs({"text": _run_log("pretrain", corpus="my.txt")}).axes
    assert "validation" in ax.get_title().lower()  # the run logged val_loss
    fig = plot_run_logs({"ft": _run_log("finetune", val=False)}, title="mine")
    assert fig._suptitle.get_text() == "mine"


def test_plot_run_logs_never_puts_two_kinds_of_loss_on_one_axis():
    from minilora.plot import plot_run_logs

    fig = plot_run_logs({"lm": _run_log("finetune", val=False), "cls": _run_log("finetune", classification=True)})
    assert sorted(ax.get_ylabel() for ax in fig.axes) == ["loss (nats per example)", "loss (nats per token)"]


def test_identical_runs_share_one_curve_and_one_legend_entry():
    from minilora.plot import plot_run_logs

    (ax,) = plot_run_logs({"a": _run_log("finetune", val=False), "b": _run_log("finetune", val=False),
                           "c": _run_log("finetune", val=False, seed=2)}).axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a = b (identical) train (EMA 0.9)", "c train (EMA 0.9)"]
    assert len([line for line in ax.get_lines() if not line.get_label().startswith("_")]) == len(labels)


def test_texts_outside_finds_a_title_cut_off_at_the_canvas_edge_and_nothing_on_a_figure_that_fits():
    """A title wider than its figure is cut off in the PNG (the site's fast-mode titles were, issue 29)."""
    long_title = "a title far wider than a figure four inches wide can show [fast mode: a smoke test, not a result]"
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.set_title(long_title)
    assert texts_outside(fig) == [long_title]
    ax.set_title(long_title.replace(" [", "\n[").replace("far wider", "\nfar wider"), fontsize=8)
    fig.set_layout_engine("constrained")
    assert texts_outside(fig) == []
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1])
    ax.annotate("a note placed past the right edge", (0.9, 0.5))
    assert texts_outside(fig) == ["a note placed past the right edge"]
    ax.set_yticks([0, 1], ["0", "a tick label that reaches past the left edge of the canvas"])
    assert texts_outside(fig) == ["tick labels of axes 0", "a note placed past the right edge"]
    rows = [{"method": "full", "trainable_params": 1000, "total_params": 1000, "metric": 1.0, "forgetting": 0.5,
             "optimizer_state_bytes": 8000}]
    assert texts_outside(plot_comparison(rows)) == []
