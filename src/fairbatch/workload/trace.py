"""One request of a workload trace, and the error every trace reader raises."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceEntry:
    """One request as a trace describes it.

    ``arrival`` is in seconds from the trace start (the first arrival is 0.0).
    ``tag`` is a class label the trace itself carries (e.g. BurstGPT's "Log Type"),
    usable to give requests different SLO classes.
    ``hash_ids`` names the prompt's 512-token blocks as Mooncake's traces do (equal ids,
    equal prefix up to the end of that block; the last block may be partial), or None
    when the trace says nothing of shared prefixes (``kv.trace_block_hashes``).
    """

    arrival: float
    prompt_len: int
    output_len: int
    tag: str | None = None
    hash_ids: tuple[int, ...] | None = None


class TraceError(ValueError):
    """A trace file a user gave is unusable: the message names file, line and problem.

    ``line`` is 1-based as a text editor shows it, or None when the problem is the
    file as a whole (missing, unreadable, no requests).
    """

    def __init__(self, file: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.file = os.fspath(file)
        self.line = line
        self.problem = problem
        where = self.file if line is None else f"{self.file} line {line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[TraceError], tuple[str, int | None, str]]:
        # The default exception pickling would call __init__(message): keep it picklable
        # for worker processes.
        return (TraceError, (self.file, self.line, self.problem))
