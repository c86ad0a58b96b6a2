"""The one error type a user sees for bad input: each problem names the field it is about."""
from __future__ import annotations


class SpecError(Exception):
    """A job spec (or its data, or the cluster it asks for) cannot run as written.

    `problems` is a list of (dotted field path, what was expected) pairs, so the CLI can
    print one clear line per problem and exit 2 before anything starts.
    """

    def __init__(self, problems: list[tuple[str, str]] | str, path: str = ""):
        if isinstance(problems, str):
            problems = [(path, problems)]
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(f"{p}: {m}" if p else m for p, m in self.problems)
