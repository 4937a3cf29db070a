"""Listeners: one module per protocol, each turning traffic into recorded hits."""
