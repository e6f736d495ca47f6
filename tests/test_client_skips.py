"""CI's second environment runs exactly the tests the README's environment skipped for a missing client: the
record conftest.py keeps (MINILORA_CLIENT_SKIPS) must hold a whole module skipped as it is collected (test_hf.py
requires torch at its top) as well as a test that skips when it runs."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_the_record_holds_skipped_modules_and_skipped_tests(tmp_path):
    (tmp_path / "conftest.py").write_text(  # the two hooks of tests/conftest.py, nothing else of it
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {TESTS!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {os.path.join(TESTS, 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(suite)\n"
        "pytest_collectreport, pytest_runtest_logreport = suite.pytest_collectreport, suite.pytest_runtest_logreport\n")
    (tmp_path / "test_whole_module.py").write_text(
        "import clients\nclients.require('no_such_client_here')\n\ndef test_a():\n    pass\n")
    (tmp_path / "test_one_test.py").write_text(
        "import clients\n\ndef test_needs_it():\n    clients.require('no_such_client_here')\n\n"
        "def test_needs_nothing():\n    pass\n")
    record = tmp_path / "skips.txt"
    env = {**os.environ, "MINILORA_CLIENT_SKIPS": str(record), "PYTHONPATH": TESTS + os.pathsep + str(tmp_path)}
    env.pop("MINILORA_REQUIRE_CLIENTS", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
                           "--rootdir", str(tmp_path), str(tmp_path)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(record.read_text().split()) == ["test_one_test.py::test_needs_it", "test_whole_module.py"], \
        record.read_text()
