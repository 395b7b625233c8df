"""The provider sandbox: wire-level emulators of the Runway, Vertex AI (Veo) and Replicate HTTP APIs.

One aiohttp server answers the three APIs under path prefixes (`/runway`, `/vertex`, `/replicate`), so
that each official client, unmodified, reaches it through its base URL. Tasks render real MP4s with the
local renderer's synthesiser, outputs are served with an expiry under `/outputs/`, and a control API
under `/_sandbox/` injects faults, changes timings and prices, reads counters and what each task
would be billed (billing.py), and resets everything.

Trigger words in a prompt:

- `[sandbox:safety]`: the provider's safety refusal. Runway: FAILED, failureCode `SAFETY.INPUT.TEXT`.
  Replicate: `failed` with an error saying NSFW content was detected. Vertex: the operation ends
  `done` with `raiMediaFilteredCount: 1`, a `raiMediaFilteredReasons` entry and no videos, which is how
  Veo reports videos held back by its Responsible AI filters (the client's `rai_media_filtered_*`).
- `[sandbox:fail]`: an internal failure halfway through the render. Runway: FAILED, failureCode
  `INTERNAL`. Replicate: `failed` with an error. Vertex: `done` with `error: {"code": 13, ...}`.
- `[sandbox:never]`: the task runs and never finishes (RUNNING / `processing` / not done); Replicate
  still stops it at its run limit (`max_run_seconds`, 30 min by default) as the real service does.
- `[sandbox:throttle]`: the task waits `throttle_seconds` before running (Runway THROTTLED, Replicate
  `starting`, Vertex not done).
"""
