"""The design rules, checked on the source: a strategy is params plus trainable names, and the library returns."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minilora"


def _functions():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, node


def test_no_function_takes_a_lora_side_channel():
    # the adapters' settings live in ModelConfig.lora; nothing rides beside params
    offenders = [f"{name}:{fn.name}" for name, fn in _functions()
                 for a in fn.args.args + fn.args.kwonlyargs if a.arg == "lora"]
    assert offenders == []


def test_the_training_loop_takes_no_loss_closure():
    train = next(fn for name, fn in _functions() if name == "train.py" and fn.name == "train")
    assert [a.arg for a in train.args.args][:5] == ["params", "trainable", "model_config", "batches", "config"]
    assert not any("loss" in a.arg for a in train.args.args)


def test_only_the_cli_prints():
    printing = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{path.name}:{node.lineno}")
    assert printing == []


def test_nothing_writes_the_environment():
    for path in sorted(PACKAGE.glob("*.py")):
        assert "os.environ[" not in path.read_text(), path.name


def test_the_install_takes_every_subpackage():
    """A non-editable install (the README's) must carry minilora.methods too: setuptools finds every package."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["minilora*"]
    from setuptools import find_packages

    found = set(find_packages(str(root), include=["minilora*"]))
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "minilora").rglob("__init__.py")}
    assert on_disk <= found and "minilora.methods" in found
