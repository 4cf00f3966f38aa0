"""Fixtures: a real ``realm-host serve`` process with tenants, keys, a model,
a pipeline and a component, configured in a temporary directory.

Environment:
- ``REALM_HOST_BIN``: the server binary (default
  ``${CARGO_TARGET_DIR:-<repo>/target}/debug/realm-host``).
- ``REALM_TEST_MODEL``: the GGUF model served as ``small`` (default
  ``~/.realm/models/smollm2-135m-instruct.gguf``).
- ``REALM_GUESTS_DIR``: where the prebuilt Rust guests are (default
  ``<repo>/guests/rust/target/wasm32-wasip2/release``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"listening on http://(\S+)")


def _resolve(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO / p


def host_binary() -> Path:
    explicit = os.environ.get("REALM_HOST_BIN")
    if explicit:
        path = _resolve(explicit)
    else:
        path = _resolve(os.environ.get("CARGO_TARGET_DIR") or "target") / "debug" / "realm-host"
    if not path.is_file():
        pytest.fail(
            f"realm-host not found at {path}: build it (`cargo build -p realm-host`) "
            "or point REALM_HOST_BIN at it",
            pytrace=False,
        )
    return path


def model_path() -> Path:
    path = Path(
        os.environ.get("REALM_TEST_MODEL") or "~/.realm/models/smollm2-135m-instruct.gguf"
    ).expanduser()
    if not path.is_file():
        pytest.fail(
            f"test model not found at {path}: run `realm-host models pull smollm2-135m-instruct` "
            "or set REALM_TEST_MODEL to a .gguf file",
            pytrace=False,
        )
    return path


def guest(name: str) -> Path:
    folder = _resolve(
        os.environ.get("REALM_GUESTS_DIR") or "guests/rust/target/wasm32-wasip2/release"
    )
    path = folder / f"{name}.wasm"
    if not path.is_file():
        pytest.fail(
            f"guest component {path} is missing: build the guests with `cargo build --release "
            "--target wasm32-wasip2 --manifest-path guests/rust/Cargo.toml` (cargo test does it)",
            pytrace=False,
        )
    return path


def report_pipeline(folder: Path) -> Path:
    """A copy of pipelines/text-report.toml that runs the prebuilt guests.

    The repository's file has `build` commands, which the server runs (cargo)
    whenever a guest's sources look newer than its .wasm; the SDK's tests only
    need the built components.
    """
    path = folder / "report.toml"
    path.write_text(
        f"""name = "text-report"
description = "Normalize a text, chunk it, and tally its words across runs"

[inputs]
text = {{ type = "string" }}
namespace = {{ type = "string", default = "reports" }}
chunk_chars = {{ type = "integer", default = 400 }}

[components.normalize]
wasm = "{guest('normalize')}"
limits = {{ fuel = 500_000_000, memory = "32MiB", timeout = "5s" }}

[components.tally]
wasm = "{guest('tally')}"
limits = {{ fuel = 500_000_000, memory = "32MiB", timeout = "5s" }}

[[steps]]
id = "clean"
component = "normalize"
input = {{ text = "{{{{ inputs.text }}}}", max_chars = "{{{{ inputs.chunk_chars }}}}" }}

[[steps]]
id = "words"
component = "tally"
input = {{ text = "{{{{ steps.clean.output.text }}}}", namespace = "{{{{ inputs.namespace }}}}", top = 5 }}

[outputs]
stats = "{{{{ steps.clean.output.stats }}}}"
chunks = "{{{{ steps.clean.output.chunks }}}}"
documents_seen = "{{{{ steps.words.output.documents }}}}"
top_words = "{{{{ steps.words.output.top }}}}"
"""
    )
    return path


def broken_pipeline(folder: Path) -> Path:
    """A pipeline whose component is not WebAssembly: it fails when run (`pipeline_error`)."""
    (folder / "broken.wasm").write_bytes(b"this is not a component")
    path = folder / "broken.toml"
    path.write_text(
        f"""name = "broken"
[inputs]
text = {{ type = "string" }}
[components.junk]
wasm = "{folder / 'broken.wasm'}"
[[steps]]
id = "only"
component = "junk"
input = {{ text = "{{{{ inputs.text }}}}" }}
[outputs]
text = "{{{{ steps.only.output.text }}}}"
"""
    )
    return path


def spin_pipeline(folder: Path) -> Path:
    """A pipeline whose one step spins until its 60 s timeout: one to cancel."""
    path = folder / "spin.toml"
    path.write_text(
        f"""name = "spin"
[components.abuse]
wasm = "{guest('abuse')}"
limits = {{ fuel = 1_000_000_000_000, timeout = "60s" }}
[[steps]]
id = "spin"
component = "abuse"
input = {{ mode = "spin" }}
"""
    )
    return path


def new_key(config: Path, tenant: str) -> str:
    """`realm-host keys new --tenant TENANT --config CONFIG`: adds the hash, returns the key."""
    out = subprocess.run(
        [str(host_binary()), "keys", "new", "--tenant", tenant, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith(f"rk_{tenant}_"), out.stdout
    return key


def new_key_hash(tenant: str) -> str:
    """`realm-host keys new --tenant TENANT` without a config: the hash of a key nobody keeps."""
    out = subprocess.run(
        [str(host_binary()), "keys", "new", "--tenant", tenant],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    match = re.search(r"\$argon2id\$\S+", out.stdout + out.stderr)
    assert match, out.stderr
    return match.group(0)


#: Tenants of the test server, besides their keys.
TENANTS = {
    # The main tenant: the model, a pipeline, its own component.
    "acme": 'models = ["small"]\npipelines = {{ report = "{report}", broken = "{broken}", spin = "{spin}" }}\ncomponent = "{notes}"',
    # One request per minute.
    "tight": 'models = ["small"]\nrate = { requests-per-minute = 1 }',
    # One generation at a time.
    "solo": 'models = ["small"]\nrate = { concurrent-streams = 1 }',
    # Four generated tokens a day.
    "frugal": 'models = ["small"]\nrate = { tokens-per-day = 12 }',
    # No model, no pipeline, no component.
    "bare": "",
}


@dataclass
class Server:
    """A running `realm-host serve` and what it was configured with."""

    folder: Path
    config: Path
    keys: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    addr: str = ""
    _log: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"ws://{self.addr}"

    def start(self, timeout: float = 60.0) -> None:
        """Starts the binary and waits for its `listening on http://ADDR` line."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = dict(os.environ)
        env["REALM_HOME"] = str(self.folder / "home")
        env["RUST_LOG"] = "warn,realm_host=info"
        env.pop("RUST_BACKTRACE", None)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(
            [str(host_binary()), "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            match = LISTENING.search(text)
            if match:
                self.addr = match.group(1)
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"realm-host serve exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"realm-host serve did not listen within {timeout} s:\n{self.log()}")

    def listen_on_same_port(self) -> None:
        """Pins `listen` to the address the server got, so a restart reuses it."""
        text = self.config.read_text()
        self.config.write_text(re.sub(r'(?m)^listen = ".*"$', f'listen = "{self.addr}"', text))

    def kill(self) -> None:
        """SIGKILLs the server (no draining, sockets reset)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def metric(self, tenant: str, series: str) -> float:
        """A series of the tenant's /metrics (0 when absent), e.g. `realm_errors_total{code="cancelled",tenant="acme"}`."""
        request = urllib.request.Request(
            f"http://{self.addr}/metrics", headers={"Authorization": f"Bearer {self.keys[tenant]}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_server(folder: Path) -> Server:
    """Writes realm.toml (free port, model, tenants with keys) into `folder`; does not start it."""
    (folder / "home").mkdir(exist_ok=True)
    report = report_pipeline(folder)
    config = folder / "realm.toml"
    text = (
        'listen = "127.0.0.1:0"\nmax-frame = "64KiB"\ndrain-timeout = "10s"\n'
        f'[models]\nsmall = "{model_path()}"\n'
    )
    for tenant, table in TENANTS.items():
        if tenant == "acme":
            table = table.format(
                report=report, broken=broken_pipeline(folder), spin=spin_pipeline(folder), notes=guest("notes")
            )
        text += f"\n[tenants.{tenant}]\n{table}\n"
    config.write_text(text)
    keys = {tenant: new_key(config, tenant) for tenant in TENANTS}
    return Server(folder=folder, config=config, keys=keys, log_path=folder / "serve.log")


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """One server shared by the tests that do not stop it."""
    with tempfile.TemporaryDirectory(prefix="realm-sdk-") as tmp:
        srv = make_server(Path(tmp))
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, which it may kill and restart."""
    srv = make_server(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
