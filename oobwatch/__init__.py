"""The application shell: configuration, the command line and the `serve` wiring."""
