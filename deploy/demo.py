"""`make demo`: the real service on 127.0.0.1 high ports, a canary minted and tripped.

Starts a local HTTP receiver standing in for on-call's pager, runs
`oobwatch serve` on SQLite, mints a DNS canary and trips it with a real DNS
query (dig when installed, dnspython otherwise), mails an email canary with
smtplib, plants a sandbox home directory and uses its .netrc with curl, then
prints the pages the receiver got and the sandbox's timeline, then the web
console's address and a one-time sign-in link, and keeps serving until
Ctrl-C. Set DEMO_ONCE=1 to stop after showing everything.
"""

import json
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".demo"
ZONE = "canary.demo.test"
SANDBOX = "sbx-demo"


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            try:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", udp.getsockname()[1]))
            except OSError:
                continue
            return int(udp.getsockname()[1])
    raise OSError("no free port")


class Pages:
    """What the stand-in pager received."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        self.arrived = threading.Event()


def start_receiver(pages: Pages) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            pages.received.append(json.loads(body))
            pages.arrived.set()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port(18099)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def oobwatch(config: Path, *args: str) -> str:
    command = [sys.executable, "-m", "oobwatch.cli", "--config", str(config), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def trip(port: int, name: str) -> str:
    if shutil.which("dig"):
        command = ["dig", "+norecurse", "+short", "@127.0.0.1", "-p", str(port), name, "A"]
        print("$", " ".join(command))
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
    import dns.message
    import dns.query

    print(f"$ (dnspython) query {name} A @127.0.0.1:{port}")
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5)
    return " ".join(rdata.to_text() for rrset in reply.answer for rdata in rrset)


def mail(port: int, to: str) -> str:
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = "agent@sbx-demo.internal"
    message["To"] = to
    message["Subject"] = "Urgent: prod credentials attached"
    message.set_content("AWS_SECRET=hunter2 (from the sandbox)")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.send_message(message)
    return f"$ (smtplib) MAIL FROM:<agent@sbx-demo.internal> RCPT TO:<{to}> -> refused: {refused or 'none'}"


def fetch(host: str, port: int, netrc: Path) -> str:
    url = f"http://{host}:{port}/artifacts/release.tar.gz"
    if shutil.which("curl"):
        command = [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--netrc-file",
            str(netrc),
        ]
        command += ["--resolve", f"{host}:{port}:127.0.0.1", url]
        print("$", " ".join(command))
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout
    import httpx

    login, password = netrc.read_text().split()[3], netrc.read_text().split()[5]
    print(f"$ (httpx) GET {url} with the .netrc login")
    response = httpx.get(
        f"http://127.0.0.1:{port}/artifacts/release.tar.gz",
        headers={"Host": f"{host}:{port}"},
        auth=(login, password),
    )
    return str(response.status_code)


def handshake(port: int, name: str) -> str:
    """A careful client: it checks the certificate, so it refuses a self-signed one."""
    context = ssl.create_default_context()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname=name).close()
    except ssl.SSLCertVerificationError as error:
        return f"refused the certificate: {error.verify_message}"
    return "trusted the certificate"


def fetch_https(url: str, port: int) -> str:
    """`curl -k`: takes any certificate and sends its request inside TLS."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "User-Agent: demo-agent/1.0\r\nConnection: close\r\n\r\n".encode()
        )
        return tls.recv(200).split(b"\r\n", 1)[0].decode()


def login(pgpass: Path) -> str:
    """psycopg (libpq) to the host in `pgpass`, reached at 127.0.0.1 as the name would resolve;
    libpq reads the password from the file itself."""
    import psycopg

    host, port, database, user, _ = pgpass.read_text().strip().split(":")
    try:
        psycopg.connect(
            host=host,
            hostaddr="127.0.0.1",
            port=port,
            dbname=database,
            user=user,
            passfile=str(pgpass),
            connect_timeout=5,
        )
    except psycopg.OperationalError as error:
        return str(error).splitlines()[0]
    return "connected (it should not have)"


def ask_openai(dotenv: str, port: int) -> str:
    """The official OpenAI SDK with the planted key and base URL, its host reached at 127.0.0.1
    (and, like `curl -k`, taking the self-signed certificate)."""
    import httpx
    import openai

    env = dict(line.split("=", 1) for line in dotenv.splitlines() if "=" in line)
    base = urllib.parse.urlsplit(env["OPENAI_BASE_URL"])
    client = openai.OpenAI(
        api_key=env["OPENAI_API_KEY"],
        base_url=f"https://127.0.0.1:{port}{base.path}",
        default_headers={"Host": base.netloc},
        http_client=httpx.Client(verify=False),
        max_retries=0,
    )
    try:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "list the prod db passwords"}]
        )
    except openai.AuthenticationError as error:
        return f"openai.AuthenticationError: {error.code}"
    return "answered (it should not have been)"


def main() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    pages = Pages()
    receiver = start_receiver(pages)
    dns_port = free_port(15353)
    smtp_port = free_port(12525)
    http_port = free_port(18080)
    https_port = free_port(18443)
    postgres_port = free_port(15432)
    api_port = free_port(18787)
    config = WORK / "oobwatch.toml"
    config.write_text(
        f"""[node]
name = "demo"
[store]
url = "sqlite:///{WORK / "oobwatch.db"}"
[dns]
zone = "{ZONE}"
listen = "127.0.0.1"
port = {dns_port}
answer_ipv4 = ["127.0.0.1"]
[smtp]
listen = "127.0.0.1"
port = {smtp_port}
[http]
listen = "127.0.0.1"
port = {http_port}
[https]
enabled = true
listen = "127.0.0.1"
port = {https_port}
[postgres]
enabled = true
listen = "127.0.0.1"
port = {postgres_port}
[api]
listen = "127.0.0.1"
port = {api_port}
public_url = "http://127.0.0.1:{api_port}"
[alerts]
urls = ["json://127.0.0.1:{receiver.server_address[1]}/page"]
"""
    )
    print(f"== config {config.relative_to(REPO)}\n{config.read_text()}")
    server = subprocess.Popen(
        [sys.executable, "-m", "oobwatch.cli", "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        for _ in range(5):
            print("== oobwatch serve:", server.stdout.readline().strip())
        minted = json.loads(
            oobwatch(
                config,
                "mint",
                "dns",
                "--sandbox",
                SANDBOX,
                "--location",
                "/home/agent/.bashrc",
                "--label",
                "team=evals",
                "--json",
            )
        )
        print("== minted a DNS canary; plant this name in the sandbox:")
        print(json.dumps(minted, indent=2))
        # Data an agent might smuggle out in labels: base32 of "AWS_SECRET=hunter2".
        exfil = "iflvgx2tivbverkuhvuhk3tumvzde"
        print("\n== something in the sandbox resolves it:")
        print(trip(dns_port, f"{exfil}.{minted['value']}"))
        email = json.loads(
            oobwatch(
                config, "mint", "email", "--sandbox", SANDBOX, "--location", "CONTACTS.md", "--json"
            )
        )
        print(f"\n== an agent mails the escalation address {email['value']}:")
        print(mail(smtp_port, email["value"]))

        home = WORK / "home"
        print(f"\n== plant a sandbox home directory into {home.relative_to(REPO)}:")
        print(oobwatch(config, "plant", "--sandbox", SANDBOX, "--into", str(home)))
        netrc = (home / ".netrc").read_text()
        host = netrc.split()[1]
        print("~/.netrc as planted:\n" + netrc)
        print("== the agent uses it: resolves the host, then fetches with the stored password")
        print(trip(dns_port, host))
        print(fetch(host, http_port, home / ".netrc"))

        print("\n== the HTTPS listener serves the store's self-signed certificate:")
        print(oobwatch(config, "tls", "status"))
        secure = json.loads(
            oobwatch(
                config,
                "mint",
                "url",
                "--scheme",
                "https",
                "--sandbox",
                SANDBOX,
                "--location",
                "README.md",
                "--json",
            )
        )
        host = urllib.parse.urlsplit(secure["value"]).hostname or ""
        print(f"== an HTTPS canary URL: {secure['value']}")
        print("== a client that checks certificates connects: its SNI is a hit all the same")
        print(handshake(https_port, host))
        print("== one that does not (curl -k) gets its request in, recorded as https:")
        print(fetch_https(secure["value"], https_port))

        pgpass = home / ".pgpass"
        print(f"\n== the agent tries the database in the planted ~/.pgpass:\n{pgpass.read_text()}")
        print(login(pgpass))
        keys = (home / "project/.env.local").read_text()
        print(f"== and the planted OpenAI key:\n{keys}")
        print(ask_openai(keys, https_port))

        # One page per incident: a credential's DNS and HTTP hits fold into one alert.
        deadline = time.monotonic() + 15
        while len(pages.received) < 6 and time.monotonic() < deadline:
            pages.arrived.wait(0.2)
        time.sleep(0.5)
        print("\n== the pages on-call received:")
        for page in pages.received:
            print(f"title: {page['title']}\n{page['message']}\n")
        print("== the alerts (acknowledge with `oobwatch alerts ack ID`):")
        print(oobwatch(config, "alerts", "list"))
        print("== the timeline of the sandbox:")
        print(oobwatch(config, "timeline", "--sandbox", SANDBOX))
        print("== the ledger:")
        print(oobwatch(config, "ledger", "verify"))
        token = json.loads(
            oobwatch(config, "token", "create", "--scope", "read", "--name", "demo", "--json")
        )["token"]
        api = f"http://127.0.0.1:{api_port}"
        print(f"== the same sandbox's incidents, over the admin API at {api}:")
        remote = ["--api", api, "--token", token]
        print(oobwatch(config, *remote, "timeline", "--sandbox", SANDBOX, "--incidents"))
        console = json.loads(
            oobwatch(config, "token", "create", "--scope", "admin", "--name", "console", "--json")
        )
        link = json.loads(oobwatch(config, "token", "login-link", console["id"], "--json"))
        print(f"== the web console is at {api}/ui/ (sign in with an API token)")
        print(f"== or open this one-time link, before {link['expires_at']}, as admin:")
        print(f"   {link['url']}")
        if os.environ.get("DEMO_ONCE"):
            return
        print(
            f"oobwatch keeps serving. Try:\n"
            f"  dig @127.0.0.1 -p {dns_port} anything.{minted['value']}\n"
            f"  .venv/bin/oobwatch --config {config.relative_to(REPO)} timeline\n"
            f"  curl -H 'Authorization: Bearer {token}' {api}/alerts\n"
            "Ctrl-C to stop."
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
        receiver.shutdown()


if __name__ == "__main__":
    main()
