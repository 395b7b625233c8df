"""What became of a provider task, in the product's terms: the render state of a task still going, the
failure reason of one that ended badly, and the charge of each by the adapter's billing rules.

Invariants: safety refusals and refused inputs are final (not retryable); other provider failures may
succeed on another attempt. A create that may have reached the provider is PROVIDER_UNCERTAIN and is
never sent again under its key. A task not known to have ended is charged at the rules' worst case.
"""

from aiprod.common.v1 import render_pb2
from aiprod.renderer.v1 import renderer_pb2
from aiprod_kit.failures import Reason, failure
from aiprod_kit.rendering.provider import ErrorKind, Provider, ProviderTask, TaskState
from aiprod_kit.rendering.record import ProviderRender

# A task still going, as a render state.
GOING = {
    TaskState.PENDING: renderer_pb2.RENDER_STATE_PENDING,
    TaskState.RUNNING: renderer_pb2.RENDER_STATE_RUNNING,
}
# A create the provider did not take: the reason, and whether another attempt could succeed.
CREATE_FAILURES = {
    ErrorKind.REFUSED: (Reason.PROVIDER_REFUSED, False),
    ErrorKind.AUTH: (Reason.PROVIDER_AUTH, True),
    ErrorKind.RATE_LIMITED: (Reason.PROVIDER_RATE_LIMITED, True),
    ErrorKind.UNAVAILABLE: (Reason.PROVIDER_UNAVAILABLE, True),
    # The create may have reached the provider: it is not sent again under this key.
    ErrorKind.AMBIGUOUS: (Reason.PROVIDER_UNCERTAIN, False),
    ErrorKind.NOT_FOUND: (Reason.PROVIDER_REFUSED, False),
}


def failure_of(task: ProviderTask) -> render_pb2.RenderFailure:
    """A provider's task failure in the product's terms: safety refusals are final, the rest may succeed
    on another attempt."""
    code = task.failure_code
    if code.upper().startswith("SAFETY"):
        reason = Reason.PROVIDER_SAFETY_INPUT if ".INPUT" in code.upper() else Reason.PROVIDER_SAFETY_OUTPUT
        return failure(reason, task.failure_message or code, False, code)
    if code.upper().startswith("ASSET"):
        return failure(Reason.PROVIDER_BAD_INPUT, task.failure_message or code, False, code)
    return failure(
        Reason.PROVIDER_FAILED, task.failure_message or code or "the provider failed the task", True, code
    )


def charge_of(
    provider: Provider, render: ProviderRender, task: ProviderTask | None, *, cancelled: bool = False
) -> int:
    """The provider's bill for the render's task by the adapter's rules; task None: not known to have
    ended (lost, or given up on), which the rules price at the worst case."""
    shot = render.shot
    if not shot.duration_seconds:
        # Re-attached without its request: the output's length stands in.
        shot = render_pb2.Shot(duration_seconds=render.output_seconds)
    if task is not None and task.state in GOING and not cancelled:
        task = None
    return provider.charge_micros(shot, task, model=render.model, cancelled=cancelled)
