"""`aiprod quote`: what a render would cost now, every backend's estimate, and a quote a job can hold to."""

from aiprod.gateway.v1 import gateway_pb2
from aiprod_cli.gateway import (
    CALL_TIMEOUT_SECONDS,
    DEFAULT_GATEWAY,
    ApiKeyOption,
    GatewayOption,
    connect,
    exit_on_rpc_error,
)
from aiprod_cli.output import (
    JsonOption,
    estimates_table,
    message_to_dict,
    print_json,
    quote_table,
    stderr,
    stdout,
)
from aiprod_cli.spec import (
    AspectRatioOption,
    BackendOption,
    ContinuousOption,
    DeadlineOption,
    DurationOption,
    FirstFrameOption,
    MaxCostOption,
    ModelOption,
    PresetOption,
    PromptArgument,
    QualityFloorOption,
    ReferenceImageOption,
    ResolutionOption,
    SeedOption,
    ShotOption,
    build_spec,
)


def quote(
    prompt: PromptArgument,
    preset: PresetOption = None,
    duration: DurationOption = None,
    aspect_ratio: AspectRatioOption = None,
    resolution: ResolutionOption = None,
    backend: BackendOption = None,
    model: ModelOption = None,
    max_cost: MaxCostOption = None,
    first_frame: FirstFrameOption = None,
    reference_image: ReferenceImageOption = None,
    quality_floor: QualityFloorOption = None,
    deadline: DeadlineOption = None,
    seed: SeedOption = None,
    shot: ShotOption = None,
    continuous: ContinuousOption = False,
    gateway: GatewayOption = DEFAULT_GATEWAY,
    api_key: ApiKeyOption = "",
    json_output: JsonOption = False,
) -> None:
    """Price a render without ordering it, with every backend's estimate.

    Shows the quote's id and expiry, the route, the price, the job's maximum, the saving against the
    baseline backend, and each backend's estimate: whether it qualifies, and why not.

    `aiprod render` with the same prompt and options and `--quote-id` holds the job to the quote.

    Exits 2 when the gateway refuses (a price over the preset's limit names the cheapest price).
    """
    spec = build_spec(
        prompt,
        preset=preset,
        duration=duration,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        backend=backend,
        model=model,
        max_cost=max_cost,
        quality_floor=quality_floor,
        deadline=deadline,
        seed=seed,
        first_frame=first_frame,
        reference_images=reference_image,
        shots=shot,
        continuous=continuous,
    )
    with exit_on_rpc_error(gateway), connect(gateway, api_key) as connection:
        response = connection.stub.QuoteRender(
            gateway_pb2.QuoteRenderRequest(spec=spec), timeout=CALL_TIMEOUT_SECONDS
        )
    if json_output:
        print_json(message_to_dict(response.quote))
        return
    stdout.print(quote_table(response.quote))
    if response.quote.estimates:
        stdout.print(estimates_table(list(response.quote.estimates)))
    if response.quote.quote_id:
        stderr.print(
            f"to hold a job to this quote: `aiprod render` with the same prompt and options and "
            f"--quote-id {response.quote.quote_id}",
            markup=False,
            highlight=False,
        )
