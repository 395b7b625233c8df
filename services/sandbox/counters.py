"""Counters of what reached the sandbox: the proof, for the tests, that nothing was created (paid) twice.

The sandbox does not deduplicate creates by idempotency key, as the real providers do not: a client
that sends the same create twice gets two tasks, and the counters show it.
"""

from collections import defaultdict
from typing import Any


class Counters:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        # provider -> idempotency key ("" without one) -> tasks created / create requests received
        self._creates: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._create_requests: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        # provider -> task id -> {"gets": n, "cancels": n}, counting requests that reached the task
        self._tasks: defaultdict[str, dict[str, dict[str, int]]] = defaultdict(dict)
        # provider -> operation -> every request received, refused by a fault or not
        self._requests: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))

    def request(self, provider: str, operation: str) -> None:
        self._requests[provider][operation] += 1

    def create_request(self, provider: str, key: str) -> None:
        self._create_requests[provider][key] += 1

    def created(self, provider: str, key: str, task_id: str) -> None:
        self._creates[provider][key] += 1
        self._tasks[provider][task_id] = {"gets": 0, "cancels": 0}

    def task_get(self, provider: str, task_id: str) -> None:
        self._tasks[provider][task_id]["gets"] += 1

    def task_cancel(self, provider: str, task_id: str) -> None:
        self._tasks[provider][task_id]["cancels"] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "creates": {provider: dict(keys) for provider, keys in self._creates.items()},
            "create_requests": {provider: dict(keys) for provider, keys in self._create_requests.items()},
            "tasks": {
                provider: {task_id: dict(counts) for task_id, counts in tasks.items()}
                for provider, tasks in self._tasks.items()
            },
            "requests": {provider: dict(operations) for provider, operations in self._requests.items()},
        }
