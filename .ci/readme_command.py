"""Print one of the README's two set-up commands, exactly as written: `demo` (the first) or `test` (the second);
or `tutorial_08_install`, the one install line tutorial 08 gives for the Hugging Face clients.

.ci/run runs what this prints, so CI runs the commands a newcomer copies, not a copy of them.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TUTORIAL_08 = ROOT / "tutorials" / "08_from_minilora_to_hugging_face.py"


def setup_commands():
    section = README.read_text(encoding="utf-8").split("\n## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def tutorial_08_install():
    """The indented command after 'one line installs them:' in tutorial 08's opening markdown."""
    text = TUTORIAL_08.read_text(encoding="utf-8").split("\n# %%\n", 1)[0]
    found = re.findall(r"one line installs them:\n#\n#     (.+)\n", text)
    if len(found) != 1:
        sys.exit(f"{TUTORIAL_08.name}: expected one install line after 'one line installs them:', got {found!r}")
    return found[0]


if __name__ == "__main__":
    which = {"demo": 0, "test": 1}
    if len(sys.argv) == 2 and sys.argv[1] == "tutorial_08_install":
        print(tutorial_08_install())
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] not in which:
        sys.exit("usage: python .ci/readme_command.py demo|test|tutorial_08_install")
    commands = setup_commands()
    if len(commands) != 2 or any("\n" in c for c in commands):
        sys.exit(f"README.md: expected exactly two one-line set-up commands under '## Set up', got {commands!r}")
    print(commands[which[sys.argv[1]]])
