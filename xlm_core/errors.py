"""The one base class of errors a user can fix.

Library code raises a subclass (a damaged shard, a tokenizer that does not fit, a checkpoint that cannot be read) with
a message that says what is wrong, where, and how to fix it; the pipeline's ``run_cli`` prints any of them as the
stage's one ``error: [<stage>] ...`` line. Callers never re-wrap them.
"""
from __future__ import annotations


class XLMError(Exception):
    """A problem the user can fix, described in one line."""

    exit_code = 2
