"""What every AIPROD service shares: settings, the gRPC service bootstrap, errors, telemetry."""
