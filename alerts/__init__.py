"""Alerts: turning committed hits into pages, and recording each page's outcome."""
