"""Who owns a training job, and who may see and control it.

A request without `X-Ollama-Ft-User` comes from the operator: whoever holds the bridge's
API key (or anyone on a loopback bridge without one). The operator sees and controls every
job. A front end that serves several people with the one key, as the Open WebUI trainer
does, passes the person with each request: `X-Ollama-Ft-User` (their id there) and
`X-Ollama-Ft-Role` (`admin` or `user`). A job belongs to whoever created it; a user sees and
controls their own jobs, an admin all of them. Another's job answers 404, as a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ollama_ft.serve.http import HTTPError

USER_HEADER = "X-Ollama-Ft-User"
ROLE_HEADER = "X-Ollama-Ft-Role"
MAX_ID = 256


@dataclass(frozen=True)
class Caller:
    user: str | None  # None: the operator
    admin: bool

    @classmethod
    def of(cls, headers) -> "Caller":
        user = (headers.get(USER_HEADER) or "").strip()
        if not user:
            return cls(None, True)
        if len(user) > MAX_ID or not user.isprintable():
            raise HTTPError(400, f"{USER_HEADER} must be a printable id of at most {MAX_ID} "
                                 "characters")
        role = (headers.get(ROLE_HEADER) or "user").strip().lower()
        return cls(user, role == "admin")

    def may_see(self, job: dict) -> bool:
        return self.admin or job.get("owner") == self.user

    @property
    def owner(self) -> str | None:
        """What a job this caller creates records as its owner."""
        return self.user
