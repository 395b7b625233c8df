"""What the tests share, a module per subject: `mesh` (starting one, reaching its services, following a
job), `sandbox` (the provider sandbox and its bills), `postgres` (a schema per test), `telemetry` (an
OTLP receiver and a fake Google Cloud), `monitoring` (the dashboards' and alerts' metric names), `cli`
(the `aiprod` command as a user runs it), `fuzz` (generated requests)."""
