"""Who may do what: the roles of API keys and the grant a key carries."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What an API key may use."""

    ADMIN = "admin"  # the admin API (/api, /docs, /openapi.json) and every inference endpoint
    INFERENCE = "inference"  # only /v1/*, optionally limited to some models


@dataclass(frozen=True, slots=True)
class Grant:
    """What one API key allows: its role and, for an inference key, the models it may use."""

    role: Role
    models: frozenset[str] | None = None  # None: every model
    key_id: str | None = None  # the stored key's id; None for a key from the settings

    @classmethod
    def of(cls, role: str, models: Iterable[str] | None, key_id: str | None = None) -> Grant:
        return cls(Role(role), None if models is None else frozenset(models), key_id)

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


ADMIN = Grant(Role.ADMIN)
