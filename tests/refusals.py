"""The one check of a command-line refusal, shared by the tests that make them.

A refusal is exit code 2 and one line on stderr, in the CLI's own words (no traceback), naming what was wrong;
where the command would have written `out`, nothing is there.
"""

import os

from minilora import cli


def refused(capsys, argv, words=(), out=None):
    """Run `minilora ARGV`; assert a one-line refusal holding each of `words`, and that `out` was not made.
    Returns the line."""
    capsys.readouterr()  # what the test's own setup printed (transformers' progress bars)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    if out is not None:
        assert not os.path.exists(out), f"{out} was written"
    return err
