"""The web console: server-rendered pages over the operations layer, under `/ui/`.

Served by the admin API's process and port. Pages call the same operations
as the CLI and the JSON API and render their views with Jinja2, every value
autoescaped; a session cookie (not a bearer token) signs a person in as one
API token, whose scope decides what they see and may do.
"""
