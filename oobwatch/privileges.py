"""Running as root: bind the privileged ports, then become an unprivileged user.

Ports 53, 25, 80 and 443 need root or CAP_NET_BIND_SERVICE. The image and
the systemd unit give the capability to an unprivileged user; started as
root instead, `serve` binds every port first and then, with `[node] user`,
switches to that user for good, before it answers anything; without it, it
says once that it runs as root. What the node keeps writing (the SQLite
database and its WAL, the spool, the anchor file) is handed to the user first.
"""

import logging
import os
import pwd
from pathlib import Path

from sqlalchemy.engine import make_url

from oobwatch.config import Config, ConfigError
from store.spool import lock_path

log = logging.getLogger(__name__)


def service_user(config: Config) -> pwd.struct_passwd | None:
    """The account to become once the ports are bound: None when not root or none is set;
    an unknown one is a config error, before anything is bound."""
    if os.geteuid() != 0 or config.node.user is None:
        return None
    try:
        return pwd.getpwnam(config.node.user)
    except KeyError:
        raise ConfigError(f"node.user: there is no user {config.node.user!r}") from None


def settle(user: pwd.struct_passwd | None, config: Config) -> None:
    """Every port is bound: become `user`, or say once that the node goes on as root."""
    if user is not None:
        become(user, config)
    elif os.geteuid() == 0:
        log.warning(
            "running as root: set [node] user to drop to an unprivileged user once the ports "
            "are bound, or run as that user with CAP_NET_BIND_SERVICE",
            extra={"fields": {"event.action": "running-as-root"}},
        )


def written_paths(config: Config) -> list[Path]:
    """What the node writes to while it runs, where it exists now."""
    spool = config.spool_path
    paths = [spool, spool.with_name(spool.name + ".state"), lock_path(spool)]
    url = make_url(config.store.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        database = Path(str(url.database))
        paths += [database, *(Path(f"{database}{tail}") for tail in ("-wal", "-shm", "-journal"))]
    if config.ledger.anchor_file is not None:
        paths.append(config.ledger.anchor_file)
    return [path for path in paths if path.exists()]


def become(user: pwd.struct_passwd, config: Config) -> None:
    """Hand the node's files to `user`, then switch to it: groups, group, user, for good."""
    for path in written_paths(config):
        os.chown(path, user.pw_uid, user.pw_gid)
    folders = {path.parent for path in (config.spool_path, *written_paths(config))}
    for folder in sorted(folders):
        if folder.stat().st_uid != user.pw_uid:
            log.warning(
                "%s is not %s's: the spool and SQLite's journal files may not be creatable there",
                folder,
                user.pw_name,
            )
    # Its own groups (ssl-cert, say, for a renewed key), and no other.
    os.initgroups(user.pw_name, user.pw_gid)
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    log.warning(
        "every port is bound; now running as user %s (uid %d), no longer root",
        user.pw_name,
        user.pw_uid,
        extra={"fields": {"event.action": "dropped-privileges"}},
    )
