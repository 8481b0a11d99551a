"""How many connections each tenant holds on this instance: WebSockets and SSE streams, each kind up to
a limit per tenant. Counted per process, in memory: N instances behind a load balancer admit up to N
times a tenant's limit, and a restart forgets nothing that still exists (its connections are gone)."""

from __future__ import annotations


class TenantSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, tenant: str) -> bool:
        """Hold one more slot for the tenant; False, holding nothing, if it has all of them already."""
        held = self._held.get(tenant, 0)
        if held >= self.limit:
            return False
        self._held[tenant] = held + 1
        return True

    def give_back(self, tenant: str) -> None:
        held = self._held.get(tenant, 0) - 1
        if held > 0:
            self._held[tenant] = held
        else:
            self._held.pop(tenant, None)

    def held(self, tenant: str) -> int:
        return self._held.get(tenant, 0)
