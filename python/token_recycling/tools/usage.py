"""The pieces of the command line that cli.py and tp.py (which cli.py loads for ``--tp``) both use:
:class:`UsageError` and reading ``generate``'s prompt. Kept apart so that neither imports the other."""

from __future__ import annotations

import sys

from . import models

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."


class UsageError(Exception):
    """A bad option value found after argparse (tree, baselines, prompt)."""


def read_prompt(args) -> str:
    """The argument, else stdin when it is not a terminal, else (or when stdin is empty) the example.

    An explicit empty argument is a mistake and stays one; empty stdin is what CI, `docker run`
    without -t or `< /dev/null` give, and means "no prompt", as a terminal does.
    """
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("the prompt is empty")
        return args.prompt
    if sys.stdin is not None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if prompt.strip():
            return prompt
        models.stderr_log(f"[token-recycling] standard input is empty: using the example prompt {DEFAULT_PROMPT!r}")
    return DEFAULT_PROMPT
