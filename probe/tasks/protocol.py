"""The task protocol: everything `probe/` and `steering/` know about a task.

`probe` never imports a concrete task (the concrete tasks are its siblings in `probe.tasks`). A task reaches the
library as an object with these four methods. Prompts and completions are plain strings: the
completion is the decoded text of the generated tokens, without the end-of-sequence token or
padding. Token roles are given per *completion token*, as the tokenizer split it.

This module is the contract, not an implementation: see `probe.tasks.countdown` for one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, Protocol, runtime_checkable

Role = Literal["planning", "execution", "other"]
ROLES: tuple[Role, ...] = ("planning", "execution", "other")


@runtime_checkable
class Task(Protocol):
    """A verifiable task with many valid answers.

    - `verify(prompt, completion)`: True iff the completion is a valid answer to the prompt.
    - `canonical(prompt, completion)`: a hashable key such that two valid completions are the same
      solution iff their keys are equal (e.g. commutative operands sorted); None if invalid.
    - `n_solutions(prompt)`: how many distinct valid solutions the prompt has (by `canonical`),
      or None when the task cannot enumerate them.
    - `token_roles(tokens)`: one role per completion token: "planning" (a real choice),
      "execution" (forced by the rules) or "other".
    """

    def verify(self, prompt: str, completion: str) -> bool: ...

    def canonical(self, prompt: str, completion: str) -> Hashable | None: ...

    def n_solutions(self, prompt: str) -> int | None: ...

    def token_roles(self, tokens: Sequence[str]) -> list[Role]: ...
