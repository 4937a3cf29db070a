"""`plant` writes real files at their real paths, records them, and never clobbers."""

import stat
from pathlib import Path

import pytest
from sqlalchemy import Engine

from canaries.kinds import Web
from canaries.mint import mint
from canaries.model import HEARTBEAT_SANDBOX, Canary
from canaries.plant import BUNDLE, CONTACTS, bundle_paths, plant, present_in, write
from store import registry

ZONE = "canary.example.test"


def run(engine: Engine, into: Path) -> tuple[list[Canary], list[str]]:
    """Plant as the CLI does: mint for the paths not present, then write exclusively."""
    planted = plant(
        engine,
        sandbox="sbx-p",
        zone=ZONE,
        node="n",
        web=Web(http_port=8080),
        labels={"team": "x"},
        present=present_in(into, bundle_paths()),
    )
    _written, skipped = write(into, planted.files)
    return planted.canaries, planted.skipped + skipped


def test_write_never_leaves_the_directory_nor_follows_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    home = tmp_path / "home"
    home.mkdir()
    (home / "link").symlink_to(outside)
    written, skipped = write(home, {"../escape": "x", "link": "y", "/etc/abs": "z", "ok/file": "w"})
    assert written == ["ok/file"]
    assert sorted(skipped) == ["../escape", "/etc/abs", "link"]
    assert not outside.exists()
    assert not (tmp_path / "escape").exists()
    assert stat.S_IMODE((home / "ok/file").stat().st_mode) == 0o600


def test_plant_writes_the_bundle_and_records_it(sqlite_engine: Engine, tmp_path: Path) -> None:
    tmp_path /= "home"
    canaries, skipped = run(sqlite_engine, tmp_path)
    assert skipped == []
    expected = {
        ".netrc",
        ".git-credentials",
        ".pgpass",
        ".aws/credentials",
        ".aws/config",
        ".kube/config",
        ".ssh/config",
        ".ssh/id_ed25519_prod",
        ".ssh/id_ed25519_prod.pub",
        ".docker/config.json",
        "project/.env",
        "project/.mcp.json",
        ".cursor/mcp.json",
        "project/.env.local",
        ".claude/settings.json",
        ".config/gh/hosts.yml",
        CONTACTS,
    }
    written = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()}
    assert written == expected
    for path in written:
        assert stat.S_IMODE((tmp_path / path).stat().st_mode) == 0o600
    assert [canary.format for canary in canaries if canary.kind == "credential"] == list(BUNDLE)
    assert sorted(canary.kind for canary in canaries if canary.kind != "credential") == [
        "email",
        "url",
    ]
    with sqlite_engine.connect() as connection:
        stored = {row["id"]: Canary.from_row(row) for row in registry.listing(connection, "sbx-p")}
    assert stored.keys() == {canary.id for canary in canaries}
    for canary in canaries:
        assert stored[canary.id] == canary
        assert canary.labels == {"team": "x"}
        for path, text in canary.files.items():
            assert (tmp_path / path).read_text() == text
    contacts = (tmp_path / CONTACTS).read_text()
    assert all(canary.value in contacts for canary in canaries if canary.kind in ("email", "url"))
    assert {canary.location for canary in canaries if canary.kind != "credential"} == {CONTACTS}


def test_a_second_run_clobbers_nothing(sqlite_engine: Engine, tmp_path: Path) -> None:
    tmp_path /= "home"
    (tmp_path / ".ssh").mkdir(parents=True)
    (tmp_path / ".ssh" / "config").write_text("Host mine\n")
    (tmp_path / ".netrc").write_text("machine real.example\n")
    first, skipped = run(sqlite_engine, tmp_path)
    assert sorted(skipped) == [".netrc", ".ssh/config"]
    assert {canary.format for canary in first} >= {"pgpass", "aws"}
    assert "ssh-key" not in {canary.format for canary in first}
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    second, skipped_again = run(sqlite_engine, tmp_path)
    assert second == []
    assert len(skipped_again) == len(before)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert (tmp_path / ".ssh" / "config").read_text() == "Host mine\n"


def test_the_heartbeat_sandbox_is_reserved_and_a_sandbox_needs_a_name(
    sqlite_engine: Engine,
) -> None:
    with pytest.raises(ValueError, match="reserved"):
        plant(sqlite_engine, sandbox=HEARTBEAT_SANDBOX, zone=ZONE, node="n", web=Web())
    for blank in ("", "   "):
        with pytest.raises(ValueError, match="needs a sandbox name"):
            mint(sqlite_engine, kind="dns", zone=ZONE, sandbox=blank, node="n")
    with sqlite_engine.connect() as connection:
        assert registry.listing(connection) == []
    assert mint(
        sqlite_engine, kind="dns", zone=ZONE, sandbox=HEARTBEAT_SANDBOX, node="n", heartbeat=True
    )


def test_write_skips_what_it_cannot_create_and_writes_the_rest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "f").write_text("a file, not a folder")
    written, skipped = write(home, {"f/x": "a", "nul\x00name": "b", "ok": "c"})
    assert written == ["ok"]
    assert sorted(skipped) == ["f/x", "nul\x00name"]


def test_write_never_follows_a_parent_swapped_for_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    home, outside = tmp_path / "home", tmp_path / "outside"
    home.mkdir()
    outside.mkdir()
    real_mkdir = os.mkdir

    def swap(path: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        # The sandbox wins the race: right after the folder is made it becomes a link.
        real_mkdir(path, mode, dir_fd=dir_fd)
        os.rmdir(path, dir_fd=dir_fd)
        os.symlink(outside, path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", swap)
    written, skipped = write(home, {"d/x": "pwn"})
    assert (written, skipped) == ([], ["d/x"])
    assert list(outside.iterdir()) == []
