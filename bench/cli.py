"""CLI start-up benchmark: median wall time of everyday commands, beside their floors.

Runs each command `--runs` times as a new process (as a user's shell would)
against a fresh SQLite store in a temporary folder, holding `--canaries`
canaries with a few hits each and a config with one alert URL, and prints
median, min and max seconds. Baselines in the same table: `python -c pass`
(the interpreter alone) and `python -c "import click, pydantic, sqlalchemy"`
(the floor any command of this stack pays before doing anything).

Usage: python bench/cli.py [--runs N] [--canaries N]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from canaries.mint import mint
from listeners.base import hit_event
from store import ledger
from store.engine import open_store

ZONE = "canary.example.test"


def timed(command: list[str], cwd: Path, runs: int) -> list[float]:
    samples = []
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OOBWATCH_")}
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=environment, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return samples


def fill(folder: Path, canaries: int) -> None:
    (folder / "oobwatch.toml").write_text(
        f'[store]\nurl = "sqlite:///oobwatch.db"\n[dns]\nzone = "{ZONE}"\n'
        '[alerts]\nurls = ["json://127.0.0.1:9/hook"]\n'
    )
    engine = open_store(f"sqlite:///{folder / 'oobwatch.db'}")
    minted = [
        mint(engine, kind="dns", zone=ZONE, sandbox=f"sbx-{n % 20}", node="bench")
        for n in range(canaries)
    ]
    with engine.begin() as connection:
        ledger.append(
            connection,
            [
                hit_event(c, protocol="dns", peer=("198.51.100.7", 5353), node="bench", evidence={})
                for c in minted
                for _ in range(3)
            ],
        )
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--canaries", type=int, default=200)
    args = parser.parse_args()
    oobwatch = [sys.executable, "-m", "oobwatch.cli"]
    commands = {
        "python -c pass (baseline)": [sys.executable, "-c", "pass"],
        "import click, pydantic, sqlalchemy (floor)": [
            sys.executable,
            "-c",
            "import click, pydantic, sqlalchemy",
        ],
        "oobwatch --version": [*oobwatch, "--version"],
        "oobwatch list": [*oobwatch, "list"],
        "oobwatch list --json": [*oobwatch, "list", "--json"],
        "oobwatch mint dns": [*oobwatch, "mint", "dns", "--sandbox", "bench", "--json"],
        "oobwatch timeline --sandbox": [*oobwatch, "timeline", "--sandbox", "sbx-1"],
    }
    with tempfile.TemporaryDirectory(prefix="oobwatch-cli-bench-") as directory:
        folder = Path(directory)
        fill(folder, args.canaries)
        print(f"{args.runs} runs each; {args.canaries} canaries, {3 * args.canaries} hits\n")
        print("| command | median s | min s | max s |")
        print("|---|---|---|---|")
        for name, command in commands.items():
            samples = timed(command, folder, args.runs)
            print(
                f"| {name} | {statistics.median(samples):.3f} | {min(samples):.3f} "
                f"| {max(samples):.3f} |"
            )


if __name__ == "__main__":
    main()
