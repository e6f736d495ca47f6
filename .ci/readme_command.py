"""Print one of the README's two set-up commands, exactly as written: `demo` (the first) or `test` (the second).

.ci/run runs what this prints, so CI runs the commands a newcomer copies, not a copy of them.
"""

import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def setup_commands():
    section = README.read_text(encoding="utf-8").split("\n## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


if __name__ == "__main__":
    which = {"demo": 0, "test": 1}
    if len(sys.argv) != 2 or sys.argv[1] not in which:
        sys.exit("usage: python .ci/readme_command.py demo|test")
    commands = setup_commands()
    if len(commands) != 2 or any("\n" in c for c in commands):
        sys.exit(f"README.md: expected exactly two one-line set-up commands under '## Set up', got {commands!r}")
    print(commands[which[sys.argv[1]]])
