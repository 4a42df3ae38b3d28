"""The application around the library: CLI, reports, model registry, demos and the digits data."""
