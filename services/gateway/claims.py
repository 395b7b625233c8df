"""This gateway replica's claims on the jobs it drives.

Each unfinished job is driven by one replica at a time: the one holding its claim in the job store, a
lease it renews every third of its length. A claim is counted here before it is taken (a stop meanwhile
lets go of it too), with the number of its taking: a renewal answered after a job was let go of and
claimed again says nothing about the new claim.
"""

import asyncio
import os
import secrets
import socket

import structlog

from aiprod_gateway.store import Claimed, JobStore

log = structlog.get_logger()

# How long a stopping gateway tries to let go of its claims (else they run out).
_RELEASE_TIMEOUT = 5.0


def owner_id() -> str:
    """This gateway process's name on the claims it holds: its host (the pod), its pid, and a random part
    (a restarted container may get its pid again)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class Claims:
    def __init__(self, store: JobStore, owner: str, lease_seconds: float) -> None:
        self._store = store
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._held: dict[str, int] = {}
        self._taken = 0

    def hold(self, job_id: str) -> None:
        """Counts a claim as this replica's before it is taken."""
        self._taken += 1
        self._held[job_id] = self._taken

    def drop(self, job_id: str) -> None:
        """Stops counting a claim (let go of, lost, or ended with its job)."""
        self._held.pop(job_id, None)

    def holds(self, job_id: str) -> bool:
        return job_id in self._held

    async def claim(self, job_id: str) -> Claimed | None:
        """Takes a job's claim in the store: the job as claimed when this replica holds it, else None.
        Raises what the store does."""
        self.hold(job_id)
        try:
            claimed = await self._store.claim(job_id, self.owner, self.lease_seconds)
        except Exception:
            self.drop(job_id)
            raise
        if claimed is None:
            self.drop(job_id)
        return claimed

    async def renew(self) -> list[str]:
        """Renews every claim held; returns the jobs whose claims were lost meanwhile (another replica
        took them, or they ended), leaving out those let go of, and maybe claimed again, since."""
        held = dict(self._held)
        if not held:
            return []
        renewed = await self._store.renew_claims(self.owner, sorted(held), self.lease_seconds)
        return [job_id for job_id in held.keys() - renewed if self._held.get(job_id) == held[job_id]]

    async def release(self, job_id: str) -> None:
        """Lets go of one job's claim in the store; best effort (else it runs out)."""
        self.drop(job_id)
        try:
            await self._store.release_claims(self.owner, [job_id])
        except Exception as error:
            log.warning("claim not released; it expires", job_id=job_id, error=str(error))

    async def release_all(self) -> None:
        """For a stopping gateway: another replica, or the next start, takes the jobs over at once."""
        held = sorted(self._held)
        self._held.clear()
        try:
            await asyncio.wait_for(self._store.release_claims(self.owner, held), _RELEASE_TIMEOUT)
        except Exception as error:
            log.warning("claims not released; they expire", count=len(held), error=str(error))
