"""A private Postfix instance: own config, queue and data folders, loopback ports only.

Used by the integration tests and the demo. It does not touch the system's Postfix: every
command runs with `-c <root>/etc`, the queue lives in `<root>/spool`, the log in
`<root>/postfix.log`. Mail to any domain is relayed to `relay` (e.g. an aiosmtpd sink).

Two ways to put the sidecar in the flow (see the README for the same lines by hand):

- milter: `smtpd_milters = inet:HOST:PORT`, with `milter_default_action` and timeouts;
- content filter: `content_filter = phishgate-filter:[HOST]:PORT` (after-queue), or
  `smtpd_proxy_filter = HOST:PORT` on the smtpd (before-queue); either with a
  re-injection smtpd on `reinject_port` without the filter, whose cleanup HOLDs messages
  carrying `X-Phishgate-Action: quarantine`.

Postfix must be installed (Debian: `apt-get install postfix`); master runs as root and
the daemons as `mail_owner` (postfix).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from phishgate.core.errors import ConfigError

POSTFIX = Path("/usr/sbin/postfix")
HOLD_CHECKS = "/^X-Phishgate-Action:[[:space:]]*quarantine/ HOLD held by phishgate\n"


def postfix_available() -> bool:
    """True when Postfix's commands are installed."""
    return POSTFIX.exists() and shutil.which("postqueue") is not None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for services that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class PostfixConfig:
    """What the private instance looks like."""

    root: Path
    smtpd_port: int
    relay: tuple[str, int]  # where all mail goes: the sink or the next MTA
    milter: str | None = None  # e.g. "inet:127.0.0.1:8899" or "unix:/run/phishgate.sock"
    milter_default_action: Literal["accept", "tempfail", "reject", "quarantine"] = "tempfail"
    milter_connect_timeout_s: int = 10
    milter_command_timeout_s: int = 10
    milter_content_timeout_s: int = 60
    content_filter: tuple[str, int] | None = None  # the sidecar in smtp mode, after-queue
    proxy_filter: tuple[str, int] | None = None  # the sidecar in smtp mode, before-queue
    reinject_port: int | None = None  # required with content_filter or proxy_filter
    filter_concurrency: int = 4
    message_size_limit: int = 64 * 1024 * 1024
    hostname: str = "mx.phishgate.test"
    extra_main: dict[str, str] = field(default_factory=dict)


class PostfixInstance:
    """Write the config, start, stop, flush and inspect one private Postfix."""

    def __init__(self, config: PostfixConfig) -> None:
        if not postfix_available():
            raise ConfigError("Postfix is not installed (apt-get install postfix)")
        filtered = config.content_filter is not None or config.proxy_filter is not None
        if filtered and config.reinject_port is None:
            raise ConfigError("a content or proxy filter needs a reinject_port")
        self.config = config
        self.root = config.root.resolve()
        self.conf_dir = self.root / "etc"
        self.log_file = self.root / "postfix.log"

    # --- configuration ---

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters of this instance."""
        c, root = self.config, self.root
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(root / "spool"),
            "data_directory": str(root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "syslog_name": "postfix-phishgate",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(root),
            "myhostname": c.hostname,
            "mydomain": c.hostname.partition(".")[2] or c.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{c.relay[0]}]:{c.relay[1]}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtputf8_enable": "yes",
            "message_size_limit": str(c.message_size_limit),
            "mailbox_size_limit": "0",
            "biff": "no",
            "notify_classes": "",
            "in_flow_delay": "0s",
            "queue_run_delay": "5s",
            "minimal_backoff_time": "10s",
            "maximal_backoff_time": "30s",
            "smtp_connect_timeout": "5s",
            "smtpd_banner": "$myhostname ESMTP",
            "import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C",
        }
        if c.milter is not None:
            params |= {
                "smtpd_milters": c.milter,
                "milter_protocol": "6",
                "milter_default_action": c.milter_default_action,
                "milter_connect_timeout": f"{c.milter_connect_timeout_s}s",
                "milter_command_timeout": f"{c.milter_command_timeout_s}s",
                "milter_content_timeout": f"{c.milter_content_timeout_s}s",
            }
        if c.content_filter is not None:
            host, port = c.content_filter
            params["content_filter"] = f"phishgate-filter:[{host}]:{port}"
        return params | c.extra_main

    def master_cf(self) -> str:
        """The master.cf of this instance (nothing chrooted, SMTP on loopback high ports)."""
        c = self.config
        lines = [f"127.0.0.1:{c.smtpd_port} inet n - n - - smtpd"]
        if c.proxy_filter is not None:
            host, port = c.proxy_filter
            lines += [f"  -o smtpd_proxy_filter={host}:{port}", "  -o smtpd_proxy_timeout=120s"]
        lines += [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "proxywrite unix - - n - 1 proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        if c.content_filter is not None:
            lines += [
                f"phishgate-filter unix - - n - {c.filter_concurrency} smtp",
                "  -o smtp_send_xforward_command=yes",
                "  -o disable_mime_output_conversion=yes",
                "  -o smtp_data_done_timeout=600s",
            ]
        if c.reinject_port is not None:
            lines += [
                f"127.0.0.1:{c.reinject_port} inet n - n - - smtpd",
                "  -o content_filter=",
                "  -o receive_override_options=no_unknown_recipient_checks,no_milters",
                "  -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
                "  -o smtpd_client_restrictions=",
                "  -o smtpd_helo_restrictions=",
                "  -o smtpd_sender_restrictions=",
                "  -o smtpd_relay_restrictions=permit_mynetworks,reject",
                "  -o mynetworks=127.0.0.0/8",
                "  -o cleanup_service_name=phishgate-cleanup",
                "phishgate-cleanup unix n - n - 0 cleanup",
                f"  -o header_checks=regexp:{self.conf_dir / 'phishgate_hold'}",
            ]
        return "\n".join(lines) + "\n"

    def write_config(self) -> None:
        """Create the folders and write main.cf, master.cf and the HOLD table."""
        for parent in self.root.parents:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                raise ConfigError(
                    f"Postfix's daemons cannot reach {self.root}: {parent} is not searchable "
                    "by other users (chmod o+x, or use a folder such as /var/tmp/...)"
                )
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for name in ("spool", "data"):
            (self.root / name).mkdir(exist_ok=True)
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", user="postfix")  # master.lock, caches: mail_owner's
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.conf_dir / "main.cf").write_text(main)
        (self.conf_dir / "master.cf").write_text(self.master_cf())
        (self.conf_dir / "phishgate_hold").write_text(HOLD_CHECKS)

    # --- control ---

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `postfix -c <conf> args...`."""
        return self._run(str(POSTFIX), "-c", str(self.conf_dir), *args, check=check)

    def start(self, timeout_s: float = 30) -> None:
        """Write the config, check it, start master; return when smtpd answers."""
        self.write_config()
        self.postfix("check")
        self.postfix("start")
        wait_for(lambda: _port_open("127.0.0.1", self.config.smtpd_port), timeout_s, "smtpd")

    def stop(self) -> None:
        """Stop master (idempotent)."""
        self.postfix("stop", check=False)
        pid_file = self.root / "spool" / "pid" / "master.pid"
        wait_for(lambda: not _master_alive(pid_file), 30, "postfix master to exit")

    def reload(self) -> None:
        """Rewrite the config and make master re-read it."""
        self.write_config()
        self.postfix("reload")

    def flush(self) -> None:
        """Attempt to deliver every deferred message now (postqueue -f)."""
        self._run("/usr/sbin/postqueue", "-c", str(self.conf_dir), "-f")

    def queue(self) -> list[dict[str, Any]]:
        """The queue as `postqueue -j` reports it: one dict per message (queue_name...)."""
        out = self._run("/usr/sbin/postqueue", "-c", str(self.conf_dir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def held(self) -> list[dict[str, Any]]:
        """Messages in the hold queue (quarantine)."""
        return [m for m in self.queue() if m.get("queue_name") == "hold"]

    def release_held(self) -> None:
        """Move every held message back to the active queue (postsuper -H ALL)."""
        self._run("/usr/sbin/postsuper", "-c", str(self.conf_dir), "-H", "ALL")

    def delete_all(self) -> None:
        """Delete every queued message (postsuper -d ALL)."""
        self._run("/usr/sbin/postsuper", "-c", str(self.conf_dir), "-d", "ALL")

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _master_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return Path(f"/proc/{pid}").exists()
