"""Running the command line in-process for the bad-input tests: ``main()`` returns 2 for a
UsageError, argparse exits with SystemExit(2)."""

from __future__ import annotations

import re

from xlstm_metal.cli import main

#: The last line of a refusal: ours (`xlstm-metal: error: ...`) or argparse's (`xlstm-metal
#: generate: error: ...`).
ERROR_LINE = re.compile(r"^xlstm-metal( [\w-]+)*: error: ")


def run_main(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``xlstm-metal ARGV``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_rejected(argv, capsys, *words) -> str:
    """``xlstm-metal ARGV`` exits 2 with an error line last, no traceback, and every one of
    ``words`` in its stderr (returned)."""
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err, err
    assert ERROR_LINE.match(err.strip().splitlines()[-1]), err
    for word in words:
        assert word in err, err
    return err
