"""The `oobwatch` command line: parses options, calls one operation, renders its view.

Every command works on this host's store or, with `--api URL --token T`, on a
remote node through the same `Operations`. Modules a command does not use
are not imported, so a quick `oobwatch list` stays quick: the server, the
API framework and the alert sinks load only for the commands that need them.
"""

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from canaries.kinds import CREDENTIAL_FORMATS
from canaries.model import KINDS, PROTOCOLS, SEVERITIES
from oobwatch import logs
from oobwatch.config import DEFAULT_CONFIG, Config, ConfigError, find, load
from oobwatch.operations import Invalid, NotFound, Operations, RemoteFailed
from oobwatch.views import (
    SCOPES,
    ActorRequest,
    EventView,
    Filters,
    MintRequest,
    PlantRequest,
    TlsView,
    TokenRequest,
    VerifyView,
    problems,
)

if TYPE_CHECKING:
    from store.ledger import Entry, Verdict

FOLLOW_SECONDS = 0.5


class State:
    """The group's options; the configuration and the operations are made when first needed."""

    def __init__(self, path: Path | None, log_format: str | None, verbose: bool) -> None:
        self.path = path
        # Whether to ask apprise about every alert URL: only a command that sends needs it.
        self.check_sinks = False
        self.log_format = log_format
        self.verbose = verbose
        self.api: tuple[str, str] | None = None
        self._config: Config | None = None
        self._ops: Operations | None = None

    def local_only(self, what: str) -> None:
        if self.api is not None:
            raise click.UsageError(f"{what} works on this host's store only, not over --api")

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load(find(self.path), self.check_sinks)
            except ConfigError as error:
                for line in str(error).splitlines():
                    click.echo(f"config error: {line}", err=True)
                sys.exit(2)
            fmt = self.log_format or self._config.log.format
            level = "debug" if self.verbose else self._config.log.level
            logs.configure(fmt, level)  # type: ignore[arg-type]
        return self._config

    @property
    def ops(self) -> Operations:
        if self._ops is None:
            if self.api is not None:
                from oobwatch.remote import RemoteOperations

                remote = RemoteOperations(*self.api)
                click.get_current_context().call_on_close(remote.close)
                self._ops = remote
            else:
                from oobwatch.operations import LocalOperations

                self._ops = LocalOperations(self.config)
        return self._ops


pass_state = click.make_pass_decorator(State)


class Commands(click.Group):
    """Turns an operation's refusal into one line and exit 1, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (NotFound, Invalid, RemoteFailed) as error:
            raise click.ClickException(str(error)) from None
        except ValidationError as error:
            raise click.UsageError(problems(error)) from None


@click.group(cls=Commands)
@click.version_option(package_name="oobwatch", prog_name="oobwatch")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="OOBWATCH_CONFIG",
    help="TOML config file (or OOBWATCH_CONFIG; default ./oobwatch.toml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default=None,
    help="Log lines as text or JSON objects (default: [log] format).",
)
@click.option("--api", "api_url", envvar="OOBWATCH_API", help="Work against this node's admin API.")
@click.option("--token", envvar="OOBWATCH_TOKEN", help="API token for --api (or OOBWATCH_TOKEN).")
@click.pass_context
def main(
    context: click.Context,
    config_path: Path | None,
    verbose: bool,
    log_format: str | None,
    api_url: str | None,
    token: str | None,
) -> None:
    """oobwatch: out-of-band canary listeners that page when a sandbox reaches out."""
    logs.configure(log_format or "console", "debug" if verbose else "info")  # type: ignore[arg-type]
    if api_url is not None and not token:
        raise click.UsageError("--api needs --token (or OOBWATCH_TOKEN)")
    state = State(config_path, log_format, verbose)
    if api_url is not None:
        state.api = (api_url, token or "")
    context.obj = state


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
    import asyncio

    from oobwatch.serve import BindFailed, serve

    state.local_only("serve")
    state.check_sinks = True
    config = state.config
    try:
        asyncio.run(serve(config))
    except ConfigError as error:
        click.echo(f"config error: {error}", err=True)
        sys.exit(2)
    except BindFailed as error:
        logging.getLogger("oobwatch.serve").error(
            "%s",
            error,
            extra={"fields": {"event.action": "bind-failed", "oobwatch.listener": error.name}},
        )
        sys.exit(2)


@main.command(name="doctor")
@click.option(
    "--resolver",
    default=None,
    metavar="IP[:PORT]",
    help="Whom to ask about the zone's delegation (default: the system's resolver).",
)
@click.option("--send-test-page", is_flag=True, help="Send a test page through every sink.")
@click.option("--json", "as_json", is_flag=True, help="A list of {check, ok, detail}.")
@pass_state
def doctor_command(state: State, resolver: str | None, send_test_page: bool, as_json: bool) -> None:
    """Check this node before canaries rely on it: exit 0 when every check passes, else 1."""
    from oobwatch import doctor

    state.local_only("doctor")
    try:
        config = load(find(state.path))
    except ConfigError as error:
        checks = [doctor.Check("config", False, str(error).replace("\n", "; "))]
    else:
        address = None if resolver is None else doctor.parse_resolver(resolver)
        checks = doctor.run(config, address, send_test_page)
    if as_json:
        click.echo(json.dumps([check.as_dict() for check in checks], indent=2))
    else:
        for check in checks:
            click.echo(doctor.line(check))
    sys.exit(0 if all(check.ok for check in checks) else 1)


@main.command(name="migrate")
@pass_state
def migrate_command(state: State) -> None:
    """Bring the store's schema to this version's (serve does too; this is for a one-shot)."""
    from store.engine import HEAD_REVISION, open_store

    state.local_only("migrate")
    open_store(state.config.store.url).dispose()
    click.echo(f"store at revision {HEAD_REVISION}")


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


def _json(value: Any) -> None:
    from oobwatch.output import as_json

    click.echo(as_json(value))


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
@click.option(
    "--scheme",
    type=click.Choice(["http", "https"]),
    default=None,
    help="URL scheme (url only; https needs [https] enabled). Default http.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the canary as JSON.")
@pass_state
def mint_command(state: State, /, fmt: str | None, as_json: bool, **fields: Any) -> None:
    """Mint a canary of KIND (dns, email, url, credential) and print what to plant."""
    if fields["kind"] == "credential" and fmt is None:
        raise click.UsageError("credential canaries need --format")
    canary = state.ops.mint(MintRequest.model_validate({"format": fmt, **fields}))
    if as_json:
        _json(canary)
    elif canary.kind == "credential":
        click.echo(f"{canary.id}  credential {canary.format}  plant at ~/{canary.path_hint}:")
        from oobwatch.output import print_files

        print_files(canary)
    else:
        click.echo(f"{canary.id}  {canary.kind}  plant: {canary.value}")


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
    from canaries.plant import bundle_paths, present_in, write

    present = present_in(into, bundle_paths())
    bundle = state.ops.plant(PlantRequest(sandbox=sandbox, labels=labels, present=present))
    wrote, skipped = write(into, bundle.files)
    for path in bundle.skipped:
        click.echo(f"skipped {path}: it exists already", err=True)
    for path in skipped:
        click.echo(f"skipped {path}: it exists or cannot be created there", err=True)
    manifest = bundle.written(wrote)
    if as_json:
        _json(manifest)
        return
    from oobwatch.output import print_table

    print_table(
        f"planted into {into}",
        ("id", "kind", "format", "location"),
        ((c.id, c.kind, c.format, c.location) for c in manifest),
    )


def _by() -> str:
    return os.environ.get("USER", "cli")


@main.command(name="retire")
@click.argument("canary_id")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def retire_command(state: State, canary_id: str, as_json: bool) -> None:
    """Retire a canary. A hit on it is still recorded and still pages."""
    retired = state.ops.retire(canary_id, ActorRequest(by=_by()))
    if as_json:
        _json(retired)
    elif retired.already:
        click.echo(f"{canary_id} was retired already, at {retired.canary.retired_at}")
    else:
        click.echo(f"retired {canary_id} at {retired.canary.retired_at}")


@main.command(name="list")
@click.option("--sandbox", default=None, help="Only canaries of this sandbox.")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only canaries of this kind.")
@click.option(
    "--state",
    "wanted",
    type=click.Choice(["active", "retired", "expired"]),
    default=None,
    help="Only canaries in this state.",
)
@click.option("--show-files", is_flag=True, help="Also print each credential's planted files.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_state
def list_command(
    state: State,
    sandbox: str | None,
    kind: str | None,
    wanted: str | None,
    show_files: bool,
    as_json: bool,
) -> None:
    """List minted canaries with their state and hits."""
    canaries = [
        canary
        for canary in state.ops.canaries(sandbox, kind)
        if wanted is None or canary.state == wanted
    ]
    if as_json:
        _json(canaries)
        return
    from oobwatch.output import print_canaries

    print_canaries(canaries, show_files)


@main.command(name="timeline")
@click.option("--sandbox", default=None)
@click.option("--canary", default=None)
@click.option("--since", help="ISO 8601; inclusive.")
@click.option("--until", help="ISO 8601; exclusive.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default=None)
@click.option("--source", help="Only hits from this network (CIDR).")
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
    state: State, /, fmt: str, as_incidents: bool, follow: bool, **fields: Any
) -> None:
    """Everything recorded for a sandbox or canary, oldest first."""
    from oobwatch import output

    filters = Filters(**fields)
    if as_incidents:
        if follow:
            raise click.UsageError("--follow shows events, not incidents")
        output.print_incidents(state.ops.incidents(filters), fmt)
        return
    events = state.ops.timeline(filters)
    output.print_timeline(events, fmt, stream=follow)
    if follow:
        for fresh in _following(state.ops, filters, events):
            output.print_timeline(fresh, fmt, stream=True, header=False)


def _following(
    ops: Operations, filters: Filters, seen: list[EventView]
) -> Iterator[list[EventView]]:
    last = max((event.seq for event in seen), default=ops.head().seq)
    while True:
        time.sleep(FOLLOW_SECONDS)
        fresh = ops.timeline(filters.model_copy(update={"after": last}))
        if fresh:
            last = max(event.seq for event in fresh)
            yield fresh


@main.group(name="incident", cls=Commands)
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
    from oobwatch.output import print_incident_story

    print_incident_story(state.ops.incident(incident_id), fmt)


@main.group(name="alerts", cls=Commands)
def alerts_group() -> None:
    """List, acknowledge and resolve alerts."""


@alerts_group.command(name="list")
@click.option("--open", "open_only", is_flag=True, help="Only alerts not yet resolved.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_state
def alerts_list(state: State, open_only: bool, as_json: bool) -> None:
    """Alerts, oldest first."""
    alerts = state.ops.alerts(open_only)
    if as_json:
        _json(alerts)
        return
    from oobwatch.output import print_alerts

    print_alerts(alerts)


@alerts_group.command(name="ack")
@click.argument("alert_id")
@click.option("--by", default=_by, help="Who acknowledges.")
@pass_state
def alerts_ack(state: State, alert_id: str, by: str) -> None:
    """Acknowledge an alert: stops its escalation; tells PagerDuty, webhooks and chat sinks."""
    settled = state.ops.ack(alert_id, ActorRequest(by=by))
    alert = settled.alert
    if not settled.already:
        click.echo(f"acknowledged {alert_id} by {by}")
    elif alert.status == "resolved":
        click.echo(f"{alert_id} is resolved already (at {alert.resolved_at})")
    else:
        click.echo(f"{alert_id} was acknowledged already, by {alert.acked_by} at {alert.acked_at}")


@alerts_group.command(name="resolve")
@click.argument("alert_id")
@click.option("--by", default=_by, help="Who resolves.")
@pass_state
def alerts_resolve(state: State, alert_id: str, by: str) -> None:
    """Resolve an alert: later hits of its canary open a new one; tells every sink."""
    settled = state.ops.resolve(alert_id, ActorRequest(by=by))
    if settled.already:
        click.echo(f"{alert_id} was resolved already, at {settled.alert.resolved_at}")
    else:
        click.echo(f"resolved {alert_id}")


@main.group(name="token", cls=Commands)
def token_group() -> None:
    """Admin API tokens: create, list, revoke, rotate."""


def _print_new_token(created: Any, as_json: bool) -> None:
    if as_json:
        _json(created)
        return
    click.echo(f"{created.name} ({created.scope}, id {created.id}): {created.token}")
    click.echo("Store it now: it is not shown again.")


@token_group.command(name="create")
@click.option("--scope", type=click.Choice(SCOPES), required=True)
@click.option("--name", required=True, help="Who or what the token is for; unique.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def token_create(state: State, scope: str, name: str, as_json: bool) -> None:
    """Create a token. It is shown once and stored only as a hash."""
    _print_new_token(state.ops.create_token(TokenRequest(name=name, scope=scope)), as_json)  # type: ignore[arg-type]


@token_group.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def token_list(state: State, as_json: bool) -> None:
    """Every token (never a secret), revoked ones included."""
    found = state.ops.tokens()
    if as_json:
        _json(found)
        return
    from oobwatch.output import print_table

    print_table(
        "tokens",
        ("id", "name", "scope", "created", "revoked"),
        ((t.id, t.name, t.scope, t.created_at, t.revoked_at or "") for t in found),
    )


@token_group.command(name="revoke")
@click.argument("token_id")
@pass_state
def token_revoke(state: State, token_id: str) -> None:
    """Revoke a token: its next request is refused."""
    revoked = state.ops.revoke_token(token_id)
    token = revoked.token
    if revoked.already:
        click.echo(f"{token.id} ({token.name}) was revoked already, at {token.revoked_at}")
    else:
        click.echo(f"revoked {token.id} ({token.name})")


@token_group.command(name="rotate")
@click.argument("token_id")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def token_rotate(state: State, token_id: str, as_json: bool) -> None:
    """A new secret for a token, same name and scope; the old secret is refused at once."""
    _print_new_token(state.ops.rotate_token(token_id), as_json)


@token_group.command(name="login-link")
@click.argument("token_id")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def token_login_link(state: State, token_id: str, as_json: bool) -> None:
    """A one-time link that signs the web console in as a token (see [api] public_url)."""
    link = state.ops.login_link(token_id)
    if as_json:
        _json(link)
        return
    click.echo(link.url)
    click.echo(f"Open it once, before {link.expires_at}; it signs in as token {link.token_id}.")


@main.group(name="tls", cls=Commands)
def tls_group() -> None:
    """The certificate the TLS listeners serve."""


def _tls_report(view: TlsView, as_json: bool) -> None:
    if as_json:
        click.echo(view.model_dump_json())
        return
    lines = [
        ("source", view.source),
        ("subject", view.subject),
        ("names", ", ".join(view.sans)),
        ("issuer", view.issuer),
        ("valid", f"{view.not_before} to {view.not_after}"),
    ]
    if view.source == "self-signed":
        lines.append(
            ("note", "clients that check certificates refuse it; their SNI is still a hit")
        )
    if view.renewal_due:
        lines.append(("renewal due", view.renewal_due))
    if view.acme_error:
        lines.append(("last ACME failure", f"{view.acme_failed_at}: {view.acme_error}"))
    for name, value in lines:
        click.echo(f"{name + ':':<19}{value}")


@tls_group.command(name="status")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tls_status(state: State, as_json: bool) -> None:
    """Subject, names, issuer, expiry and source (acme, file, self-signed) of the certificate."""
    _tls_report(state.ops.tls(), as_json)


@tls_group.command(name="renew")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def tls_renew(state: State, as_json: bool) -> None:
    """Have a serving node order a new ACME certificate now, and wait for it."""
    _tls_report(state.ops.renew_tls(), as_json)


@main.group(name="ledger", cls=Commands)
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
    from store import anchors, ledger

    if anchor_file is None and export_file is None:
        _report(state.ops.verify(), 0)
        return
    state.local_only("--anchor and --file")
    try:
        saved = [] if anchor_file is None else anchors.load(anchor_file)
        if export_file is not None:
            verdict, problem = _verify_export(export_file, saved)
            _report(VerifyView.of(verdict, problem), len(saved))
            return
        from oobwatch.operations import LocalOperations

        assert isinstance(state.ops, LocalOperations)
        with state.ops.engine.connect() as connection:
            verdict = ledger.verify(connection)
            problem = verdict.problem or ledger.missed_anchor(connection, saved)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    _report(VerifyView.of(verdict, problem), len(saved))


def _report(verdict: VerifyView, anchored: int) -> None:
    if verdict.problem is None:
        checked = f", {anchored} anchored heads present" if anchored else ""
        click.echo(f"ledger intact: {verdict.count} entries, head {verdict.head_hash}{checked}")
        return
    where = f"at row {verdict.bad_seq}: " if verdict.bad_seq is not None else ""
    click.echo(
        f"ledger BROKEN {where}{verdict.problem} ({verdict.count} entries verified before it)",
        err=True,
    )
    sys.exit(1)


def _verify_export(path: Path, saved: list[tuple[int, str]]) -> "tuple[Verdict, str | None]":
    from store import ledger

    with path.open(encoding="utf-8") as handle:
        hashes = {}
        wanted = dict(saved)

        def remember(entries: "Iterator[Entry]") -> "Iterator[Entry]":
            for entry in entries:
                if entry.seq in wanted:
                    hashes[entry.seq] = entry.hash
                yield entry

        verdict = ledger.walk(remember(ledger.read_export(handle)))
    if verdict.problem:
        return verdict, None
    for seq, digest in saved:
        if hashes.get(seq) != digest:
            return verdict, f"anchored head {seq} ({digest[:16]}…) is not in the export"
    return verdict, None


@ledger_group.command(name="head")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def head_command(state: State, as_json: bool) -> None:
    """The current head: sequence number and hash."""
    head = state.ops.head()
    click.echo(head.model_dump_json() if as_json else f"{head.seq} {head.hash}")


@ledger_group.command(name="anchor")
@pass_state
def anchor_command(state: State) -> None:
    """Save the current head to the anchor file and route now."""
    head = state.ops.anchor()
    click.echo(f"anchored head {head.seq} {head.hash}")


@ledger_group.command(name="export")
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (default stdout).",
)
@pass_state
def export_command(state: State, output: Path | None) -> None:
    """Write the whole chain as JSON lines, hashes included, for archiving and offline verify."""
    with click.open_file(str(output or "-"), "w") as handle:
        handle.writelines(state.ops.ledger_export())


if __name__ == "__main__":
    main()
