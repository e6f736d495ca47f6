"""The README's Commands section, run top to bottom in a fresh folder (issue 13, "Must show").

Each command runs as written, with tiny settings appended (argparse keeps the last value of an
option), and gives the result its comment promises. The `evaluate` score equals the score the
fine-tune of that run printed.

The section is read from README.md when it carries the marker below, else from
tests/readme_commands.md (the section as it should read, until it is pasted into the README).
"""

import json
import pathlib
import re
import shlex

from minilora import cli, tasks
from minilora.checkpoint import load_checkpoint
from minilora.corpus import make_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = "<!-- tests/test_readme_commands.py runs every line of this block"
TINY = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2"]
# appended to each subcommand: a smoke-test size of the same command
OVERRIDES = {
    "demo": ["--fast", "--out", "runs"],  # runs/pretrain, as the full demo writes; figures beside them
    "gradcheck": ["--groups", "ops"],
    "pretrain": ["--steps", "3", "--batch-size", "2", "--eval-every", "3", *TINY],
    "generate": ["--max-new-tokens", "5"],
    "finetune": ["--steps", "3", "--batch-size", "4"],
}


def commands_section():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0] if "\n## Commands\n" in readme else ""
    if MARKER not in section:
        section = (ROOT / "tests" / "readme_commands.md").read_text()
    assert MARKER in section
    block = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_commands_section_runs_top_to_bottom_with_the_results_it_promises(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the user's own files the section names
    (tmp_path / "my.txt").write_text(make_text(300, seed=5))
    tasks.save_jsonl(tasks.make_instruction_records("plural", 60, seed=5), tmp_path / "my.jsonl")
    printed_metric = {}  # run folder -> the metric its fine-tune printed
    commands = commands_section()
    assert [c[1] for c in commands] == ["demo", "gradcheck", "pretrain", "pretrain", "generate", "finetune",
                                        "finetune", "generate", "evaluate", "merge", "plot"]
    for argv in commands:
        assert argv[0] == "minilora"
        command = argv[1]
        code = cli.main(argv[1:] + OVERRIDES.get(command, []))
        out, err = capsys.readouterr()
        assert code == 0, (argv, err)
        if command == "demo":
            assert "corpus loss after" in out
            for run in ("pretrain", "finetune-subject-full", "finetune-subject-lora", "finetune-kind-prompt"):
                assert (tmp_path / "runs" / run / "checkpoint.npz").exists(), run
            # the demo writes under its --out only: run in a clone, it leaves `git status` clean
            assert sorted(p.name for p in tmp_path.iterdir()) == ["my.jsonl", "my.txt", "runs"]
            assert (tmp_path / "runs" / "figures" / "finetune_loss.png").exists()
        elif command == "gradcheck":
            assert " 0 failed" in out
        elif command == "pretrain":
            run = tmp_path / argv[argv.index("--out") + 1]
            meta = load_checkpoint(run / "checkpoint.npz")[1]
            assert meta["step"] == 3 and (run / "log.jsonl").exists()
            assert meta["corpus"] == ("my.txt" if "--text" in argv else "toy grammar")
        elif command == "generate" and "--instruction" in argv:
            assert "###" not in out and len(out.splitlines()) == 1  # the answer alone, ended at the end marker
        elif command == "generate":
            assert len(out.splitlines()) >= 5 and out.startswith("the ")
        elif command == "finetune":
            run = re.search(r"^run: (\S+)", out, re.M).group(1)
            metric = re.search(r"metric [\d.]+ -> ([\d.]+)", out).group(1)
            assert metric == f"{json.load(open(tmp_path / run / 'summary.json'))['metric']:.3f}"
            printed_metric[run] = metric
            if "--data" in argv:
                assert run == "runs/finetune-my-lora"
            else:
                assert run == argv[argv.index("--out") + 1]
        elif command == "evaluate":
            score = re.search(r"exact match on \d+ held-out records: ([\d.]+)", out).group(1)
            assert score == printed_metric[argv[2]]  # the score the fine-tune printed
            assert "pretraining-corpus validation loss" in out
        elif command == "merge":
            out_file = tmp_path / argv[argv.index("--out") + 1]
            assert load_checkpoint(out_file)[1]["kind"] == "merged"
        elif command == "plot":
            assert (tmp_path / argv[argv.index("--out") + 1]).read_bytes()[:4] == b"\x89PNG"
