"""Rendering console pages: the Jinja2 environment, the stylesheet and the security headers.

Every value is autoescaped, and shown with control and direction characters
made visible, since most of what the console shows was written by whatever
tripped a canary. The stylesheet goes inline in every page, allowed by its
hash, so the sign-in page needs no asset a visitor without a session could
fetch; the one script is a file of this package, served to sessions only.
"""

import base64
import hashlib
from importlib import resources
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from oobwatch.output import escaped

STYLESHEET = resources.files(__package__).joinpath("static/console.css").read_text()
SCRIPT = resources.files(__package__).joinpath("static/console.js").read_bytes()
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLESHEET.encode()).digest()).decode()

# No inline script, no framing, no third party; forms post only here.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self'; "
    f"style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


environment = Environment(
    loader=PackageLoader(__package__),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters["shown"] = escaped
# A time to the second, for narrow screens; the full one stays in its title.
environment.filters["short"] = lambda iso: (iso or "")[:19].replace("T", " ")
# One path segment, whatever the text holds (`/`, `?`, `#` included).
environment.filters["segment"] = lambda text: quote(str(text), safe="")
environment.globals["stylesheet"] = Markup(STYLESHEET)  # noqa: S704 - this package's own file


def page(name: str, **context: Any) -> str:
    return environment.get_template(name).render(**context)
