"""The `oobwatch` command line."""

import asyncio
import io
import ipaddress
import json
import logging
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine

from alerts.incidents import Incidents, list_alerts
from canaries.kinds import CREDENTIAL_FORMATS
from canaries.mint import mint, retire
from canaries.model import HEARTBEAT_SANDBOX, KINDS, SEVERITIES, Canary
from canaries.plant import plant
from oobwatch import output
from oobwatch.api import SCOPES
from oobwatch.config import DEFAULT_CONFIG, Config, ConfigError, load
from oobwatch.remote import Remote
from oobwatch.serve import incidents_for, serve
from store import anchors, ledger, registry, tokens
from store.clock import from_iso, now_us, to_iso
from store.engine import migrate, open_engine
from store.timeline import (
    Incident,
    IpNetwork,
    TimelineQuery,
    find_incident,
    incidents,
    timeline,
)

FOLLOW_SECONDS = 0.5


class State:
    """The group's options, loading the configuration only when a command needs it."""

    def __init__(self, path: Path | None, remote: Remote | None = None) -> None:
        self.path = path
        self.remote = remote
        self._config: Config | None = None

    def local_only(self, what: str) -> None:
        if self.remote is not None:
            raise click.UsageError(f"{what} works on the local store only, not over --api")

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load(self.path)
            except ConfigError as error:
                for line in str(error).splitlines():
                    click.echo(f"config error: {line}", err=True)
                sys.exit(2)
        return self._config

    def engine(self) -> Engine:
        engine = open_engine(self.config.store.url)
        migrate(engine)
        return engine


pass_state = click.make_pass_decorator(State)


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="OOBWATCH_CONFIG",
    help="TOML config file (or OOBWATCH_CONFIG).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.option("--api", "api_url", envvar="OOBWATCH_API", help="Work against this node's admin API.")
@click.option("--token", envvar="OOBWATCH_TOKEN", help="API token for --api (or OOBWATCH_TOKEN).")
@click.pass_context
def main(
    context: click.Context,
    config_path: Path | None,
    verbose: bool,
    api_url: str | None,
    token: str | None,
) -> None:
    """oobwatch: out-of-band canary listeners that page when a sandbox reaches out."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "apscheduler", "apprise", "mail.log", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if api_url is not None and not token:
        raise click.UsageError("--api needs --token (or OOBWATCH_TOKEN)")
    remote = None if api_url is None else Remote(api_url, token or "")
    if remote is not None:
        context.call_on_close(remote.close)
    context.obj = State(config_path, remote)


@main.command()
@click.option(
    "--config",
    "target",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("oobwatch.toml"),
    show_default=True,
    help="Where to write the config.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(target: Path, force: bool) -> None:
    """Write a commented default configuration."""
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; pass --force to overwrite it")
    target.write_text(DEFAULT_CONFIG, encoding="utf-8")
    click.echo(f"wrote {target}")


@main.command(name="serve")
@pass_state
def serve_command(state: State) -> None:
    """Run the listeners, pager and scheduler until SIGINT or SIGTERM."""
    state.local_only("serve")
    asyncio.run(serve(state.config))


def _labels(
    _context: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE")
        labels[key] = text
    return labels


@main.command(name="mint")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--sandbox", required=True, help="The sandbox the canary is planted in.")
@click.option("--location", default="", help="Where in the sandbox it is planted.")
@click.option("--label", "labels", multiple=True, callback=_labels, help="KEY=VALUE, repeatable.")
@click.option("--severity", type=click.Choice(SEVERITIES), default="high", show_default=True)
@click.option("--note", default="", help="A note for whoever gets paged.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(CREDENTIAL_FORMATS),
    help="Credential format (credential only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the canary as JSON.")
@pass_state
def mint_command(
    state: State,
    kind: str,
    sandbox: str,
    location: str,
    labels: dict[str, str],
    severity: str,
    note: str,
    fmt: str | None,
    as_json: bool,
) -> None:
    """Mint a canary of KIND (dns, email, url, credential) and print what to plant."""
    if kind == "credential" and fmt is None:
        raise click.UsageError("credential canaries need --format")
    if state.remote is not None:
        request: dict[str, Any] = {"kind": kind, "sandbox": sandbox, "location": location}
        request["labels"] = labels
        request |= {"severity": severity, "note": note, "format": fmt}
        _print_minted(state.remote.json("POST", "/canaries", json=request), as_json)
        return
    try:
        canary = mint(
            state.engine(),
            kind=kind,
            zone=state.config.dns.zone,
            sandbox=sandbox,
            node=state.config.node.name,
            location=location,
            labels=labels,
            severity=severity,
            note=note,
            fmt=fmt,
            http_port=state.config.http.port,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    _print_minted(output.canary_json(canary), as_json)


def _print_minted(canary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(canary))
    elif canary["kind"] == "credential":
        click.echo(
            f"{canary['id']}  credential {canary['format']}  plant at ~/{canary['path_hint']}:"
        )
        for path, text in (canary["files"] or {}).items():
            click.echo(f"--- ~/{path}\n{text}", nl=False)
    else:
        click.echo(f"{canary['id']}  {canary['kind']}  plant: {canary['value']}")


@main.command(name="plant")
@click.option("--sandbox", required=True, help="The sandbox the bundle is planted in.")
@click.option(
    "--into",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The directory to plant into, as if it were a home directory.",
)
@click.option("--label", "labels", multiple=True, callback=_labels, help="KEY=VALUE, repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as a JSON array.")
@pass_state
def plant_command(
    state: State, sandbox: str, into: Path, labels: dict[str, str], as_json: bool
) -> None:
    """Write a realistic bundle of credential, email and URL canaries into a directory."""
    into.mkdir(parents=True, exist_ok=True)
    if state.remote is not None:
        manifest, skipped = _plant_remote(state.remote, sandbox, labels, into)
        _print_planted(manifest, skipped, into, as_json)
        return
    try:
        planted = plant(
            state.engine(),
            into=into,
            sandbox=sandbox,
            zone=state.config.dns.zone,
            node=state.config.node.name,
            http_port=state.config.http.port,
            labels=labels,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    manifest = [output.canary_json(canary) for canary in planted.canaries]
    _print_planted(manifest, planted.skipped, into, as_json)


def _plant_remote(
    remote: Remote, sandbox: str, labels: dict[str, str], into: Path
) -> tuple[list[dict[str, Any]], list[str]]:
    """Plant through the API: its bundle is extracted without replacing any existing file."""
    response = remote.call("POST", "/plant", json={"sandbox": sandbox, "labels": labels})
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    written, skipped = set(), []
    for name in archive.namelist():
        target = into / name
        if target.exists() or not target.resolve().is_relative_to(into.resolve()):
            skipped.append(name)
            continue
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(archive.read(name))
        written.add(name)
    ids = set(response.headers.get("X-Oobwatch-Canaries", "").split(","))
    canaries = remote.json("GET", "/canaries", params={"sandbox": sandbox})
    manifest = [c for c in canaries if c["id"] in ids and (c["location"] in written or not written)]
    return manifest, skipped


def _print_planted(
    manifest: list[dict[str, Any]], skipped: list[str], into: Path, as_json: bool
) -> None:
    for path in skipped:
        click.echo(f"skipped {path}: it exists already", err=True)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    output.print_table(
        f"planted into {into}",
        ("id", "kind", "format", "location"),
        ((c["id"], c["kind"], c["format"], c["location"]) for c in manifest),
    )


@main.command(name="retire")
@click.argument("canary_id")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def retire_command(state: State, canary_id: str, as_json: bool) -> None:
    """Retire a canary. A hit on it is still recorded and still pages."""
    if state.remote is not None:
        canary = state.remote.json("POST", f"/canaries/{canary_id}/retire")
    else:
        by = os.environ.get("USER", "cli")
        retired = retire(state.engine(), canary_id, node=state.config.node.name, by=by)
        if retired is None:
            raise click.ClickException(f"no canary {canary_id}")
        canary = output.canary_json(retired)
    click.echo(json.dumps(canary) if as_json else f"retired {canary_id} at {canary['retired_at']}")


@main.command(name="list")
@click.option("--sandbox", default=None, help="Only canaries of this sandbox.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_state
def list_command(state: State, sandbox: str | None, as_json: bool) -> None:
    """List minted canaries."""
    if state.remote is not None:
        params = {} if sandbox is None else {"sandbox": sandbox}
        canaries = state.remote.json("GET", "/canaries", params=params)
    else:
        with state.engine().connect() as connection:
            rows = registry.listing(connection, sandbox)
        canaries = [output.canary_json(Canary.from_row(row)) for row in rows]
    if as_json:
        click.echo(json.dumps(canaries, indent=2))
        return
    output.print_table(
        "canaries",
        ("id", "kind", "sandbox", "location", "value", "created"),
        (
            (c["id"], c["kind"], c["sandbox"], c["location"], c["value"], c["created_at"])
            for c in canaries
        ),
    )


def _time(_context: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return from_iso(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None


def _network(
    _context: click.Context, _param: click.Parameter, value: str | None
) -> IpNetwork | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an IP network such as 198.51.100.0/24"
        ) from None


def _query(state: State, **filters: Any) -> TimelineQuery:
    include_heartbeat = filters.pop("include_heartbeat")
    return TimelineQuery(
        **filters, exclude_sandbox=None if include_heartbeat else HEARTBEAT_SANDBOX
    )


@main.command(name="timeline")
@click.option("--sandbox", default=None)
@click.option("--canary", "canary_id", default=None)
@click.option("--since", "since_us", callback=_time, help="ISO 8601; inclusive.")
@click.option("--until", "until_us", callback=_time, help="ISO 8601; exclusive.")
@click.option("--protocol", type=click.Choice(["dns", "smtp", "http"]), default=None)
@click.option("--source", callback=_network, help="Only hits from this network (CIDR).")
@click.option(
    "--kind", type=click.Choice(KINDS), default=None, help="Only events of this canary kind."
)
@click.option("--include-heartbeat", is_flag=True, help="Show the built-in self-test canaries too.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option("--incidents", "as_incidents", is_flag=True, help="Group into incidents per sandbox.")
@click.option("--follow", is_flag=True, help="Keep printing new events as they are committed.")
@pass_state
def timeline_command(
    state: State, /, fmt: str, as_incidents: bool, follow: bool, **filters: Any
) -> None:
    """Everything recorded for a sandbox or canary, oldest first."""
    if state.remote is not None:
        if follow:
            raise click.UsageError("--follow works on the local store only, not over --api")
        _timeline_remote(state.remote, fmt, as_incidents, filters)
        return
    query = _query(state, **filters)
    engine = state.engine()
    with engine.connect() as connection:
        entries = timeline(connection, query)
    if as_incidents:
        grouped = incidents(entries, state.config.timeline.incident_gap)
        output.print_incidents([output.incident_json(i) for i in grouped], fmt)
        return
    output.print_timeline(entries, fmt, stream=follow)
    if follow:
        last = max((entry.seq for entry in entries), default=_head_seq(engine))
        while True:
            time.sleep(FOLLOW_SECONDS)
            with engine.connect() as connection:
                fresh = timeline(connection, replace(query, after_seq=last))
            if fresh:
                output.print_timeline(fresh, fmt, stream=True, header=False)
                last = max(entry.seq for entry in fresh)


def _timeline_remote(remote: Remote, fmt: str, as_incidents: bool, filters: dict[str, Any]) -> None:
    params: dict[str, Any] = {
        "sandbox": filters["sandbox"],
        "canary": filters["canary_id"],
        "since": None if filters["since_us"] is None else to_iso(filters["since_us"]),
        "until": None if filters["until_us"] is None else to_iso(filters["until_us"]),
        "protocol": filters["protocol"],
        "source": None if filters["source"] is None else str(filters["source"]),
        "kind": filters["kind"],
        "include_heartbeat": filters["include_heartbeat"],
        "format": "csv" if fmt == "csv" else "json",
    }
    params = {key: value for key, value in params.items() if value is not None}
    path = "/incidents" if as_incidents else "/timeline"
    if fmt == "csv":
        click.echo(remote.call("GET", path, params=params).text, nl=False)
        return
    found = remote.json("GET", path, params=params)
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
    elif as_incidents:
        output.print_incidents(found, fmt)
    else:
        output.print_timeline(
            [output.entry_from_event(event) for event in found], fmt, stream=False
        )


def _head_seq(engine: Engine) -> int:
    with engine.connect() as connection:
        return ledger.head(connection)[0]


@main.group(name="incident")
def incident_group() -> None:
    """Look at one incident."""


@incident_group.command(name="show")
@click.argument("incident_id")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@pass_state
def incident_show(state: State, incident_id: str, fmt: str) -> None:
    """One incident's full story, hit by hit, with the evidence."""
    if state.remote is not None:
        story = state.remote.json("GET", f"/incidents/{incident_id}")
        if fmt == "json":
            click.echo(json.dumps(story, indent=2))
            return
        entries = [output.entry_from_event(event) for event in story["events"]]
        output.print_incident_story(Incident(story["sandbox"], entries), fmt)
        return
    with state.engine().connect() as connection:
        found = find_incident(connection, incident_id, state.config.timeline.incident_gap)
    if found is None:
        raise click.ClickException(f"no incident {incident_id}")
    output.print_incident_story(found, fmt)


@main.group(name="alerts")
def alerts_group() -> None:
    """List, acknowledge and resolve alerts."""


def _incidents(state: State) -> Incidents:
    return incidents_for(state.config, state.engine(), state.config.policy())


@alerts_group.command(name="list")
@click.option("--open", "open_only", is_flag=True, help="Only alerts not yet resolved.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_state
def alerts_list(state: State, open_only: bool, as_json: bool) -> None:
    """Alerts, oldest first."""
    if state.remote is not None:
        rows = state.remote.json("GET", "/alerts", params={"open": open_only})
    else:
        rows = [output.alert_json(row) for row in list_alerts(state.engine(), open_only)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    output.print_table(
        "alerts",
        ("id", "status", "canary", "sandbox", "hits", "opened", "last hit", "acked by"),
        (
            (
                a["id"],
                a["status"],
                a["canary_id"],
                a["sandbox"],
                a["hit_count"],
                a["opened_at"],
                a["last_hit_at"],
                a["acked_by"],
            )
            for a in rows
        ),
    )


@alerts_group.command(name="ack")
@click.argument("alert_id")
@click.option("--by", default=lambda: os.environ.get("USER", "unknown"), help="Who acknowledges.")
@pass_state
def alerts_ack(state: State, alert_id: str, by: str) -> None:
    """Acknowledge an alert: stops its escalation, acknowledges it in PagerDuty."""
    _settle(state, alert_id, by, "ack")
    click.echo(f"acknowledged {alert_id} by {by}")


@alerts_group.command(name="resolve")
@click.argument("alert_id")
@click.option("--by", default=lambda: os.environ.get("USER", "unknown"), help="Who resolves.")
@pass_state
def alerts_resolve(state: State, alert_id: str, by: str) -> None:
    """Resolve an alert: later hits of its canary open a new one; resolves it in PagerDuty."""
    _settle(state, alert_id, by, "resolve")
    click.echo(f"resolved {alert_id}")


def _settle(state: State, alert_id: str, by: str, action: str) -> None:
    if state.remote is not None:
        state.remote.json("POST", f"/alerts/{alert_id}/{action}", json={"by": by})
        return
    incidents_of = _incidents(state)
    settle = incidents_of.acknowledge if action == "ack" else incidents_of.resolve
    try:
        settle(alert_id, by, now_us())
    except (LookupError, ValueError) as error:
        raise click.ClickException(str(error)) from None


@main.group(name="token")
def token_group() -> None:
    """Admin API tokens."""


@token_group.command(name="create")
@click.option("--scope", type=click.Choice(SCOPES), required=True)
@click.option("--name", required=True, help="Who or what the token is for; unique.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def token_create(state: State, scope: str, name: str, as_json: bool) -> None:
    """Create a token. It is shown once and stored only as a hash."""
    state.local_only("token create")
    try:
        token, text = tokens.create(state.engine(), name, scope)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"name": token.name, "scope": token.scope, "token": text}))
    else:
        click.echo(f"{token.name} ({token.scope}): {text}\nStore it now: it is not shown again.")


@main.group(name="ledger")
def ledger_group() -> None:
    """Inspect the hash-chained ledger."""


@ledger_group.command(name="verify")
@click.option(
    "--anchor",
    "anchor_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Saved heads (JSON lines) the chain must still contain.",
)
@click.option(
    "--file",
    "export_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Verify an exported chain (JSONL) instead of the store.",
)
@pass_state
def verify_command(state: State, anchor_file: Path | None, export_file: Path | None) -> None:
    """Recompute the whole chain; exit 1 naming the first bad row."""
    if state.remote is not None:
        if anchor_file is not None or export_file is not None:
            raise click.UsageError("--anchor and --file work on the local store only")
        result = state.remote.json("POST", "/ledger/verify")
        verdict = ledger.Verdict(
            result["count"],
            result["count"],
            result["head_hash"],
            result["bad_seq"],
            result["problem"],
        )
        _report(verdict, verdict.problem, [])
        return
    try:
        saved = [] if anchor_file is None else anchors.load(anchor_file)
        if export_file is not None:
            verdict, problem = _verify_export(export_file, saved)
        else:
            with state.engine().connect() as connection:
                verdict = ledger.verify(connection)
                problem = verdict.problem or ledger.missed_anchor(connection, saved)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    _report(verdict, problem, saved)


def _report(verdict: ledger.Verdict, problem: str | None, saved: list[tuple[int, str]]) -> None:
    if problem is None:
        checked = f", {len(saved)} anchored heads present" if saved else ""
        click.echo(f"ledger intact: {verdict.count} entries, head {verdict.head_hash}{checked}")
        return
    where = f"at row {verdict.bad_seq}: " if verdict.problem else ""
    click.echo(
        f"ledger BROKEN {where}{problem} ({verdict.count} entries verified before it)", err=True
    )
    sys.exit(1)


def _verify_export(path: Path, saved: list[tuple[int, str]]) -> tuple[ledger.Verdict, str | None]:
    with path.open(encoding="utf-8") as handle:
        hashes = {}
        wanted = dict(saved)

        def remember(entries: Iterator[ledger.Entry]) -> Iterator[ledger.Entry]:
            for entry in entries:
                if entry.seq in wanted:
                    hashes[entry.seq] = entry.hash
                yield entry

        verdict = ledger.walk(remember(ledger.read_export(handle)))
    if verdict.problem:
        return verdict, verdict.problem
    for seq, digest in saved:
        if hashes.get(seq) != digest:
            return verdict, f"anchored head {seq} ({digest[:16]}…) is not in the export"
    return verdict, None


@ledger_group.command(name="head")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def head_command(state: State, as_json: bool) -> None:
    """The current head: sequence number and hash."""
    if state.remote is not None:
        head = state.remote.json("GET", "/ledger/head")
        seq, digest = head["seq"], head["hash"]
    else:
        with state.engine().connect() as connection:
            seq, digest = ledger.head(connection)
    click.echo(json.dumps({"seq": seq, "hash": digest}) if as_json else f"{seq} {digest}")


@ledger_group.command(name="export")
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (default stdout).",
)
@pass_state
def export_command(state: State, output: Path | None) -> None:
    """Write the whole chain as JSON lines, hashes included, for archiving and offline verify."""
    state.local_only("ledger export")
    with state.engine().connect() as connection, click.open_file(str(output or "-"), "w") as handle:
        for entry in ledger.entries(connection):
            handle.write(ledger.export_line(entry) + "\n")


if __name__ == "__main__":
    main()
