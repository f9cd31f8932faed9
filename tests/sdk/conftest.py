"""Starts the real `skein-mock` and `skein` binaries for the SDK tests.

Both listen on port 0; their addresses are read from their output. Only processes started
here are stopped, by their handle.
"""

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

BIN_DIR = Path(os.environ.get("SKEIN_BIN_DIR", Path(__file__).resolve().parents[2] / "target" / "debug"))


class Process:
    """A child process whose output is drained by a thread, so it never blocks on a full pipe."""

    def __init__(self, args, env=None):
        self.lines = []
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=20.0):
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{pattern!r} not seen; output:\n" + "\n".join(self.lines))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def binary(name):
    path = BIN_DIR / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build --workspace --bins` first")
    return str(path)


@pytest.fixture(scope="session")
def mock_url():
    mock = Process([binary("skein-mock"), "--addr", "127.0.0.1:0"])
    try:
        yield mock.wait_for(r"listening on (http://[0-9.:]+)").group(1)
    finally:
        mock.stop()


@pytest.fixture(scope="session")
def gateway_url(mock_url, tmp_path_factory):
    config = f"""
version: 1
providers:
  - name: mock
    kind: openai_compatible
    base_url: {mock_url}/v1
    keys: [{{key: env:SKEIN_TEST_MOCK_KEY}}]
  - name: mock-anthropic
    kind: anthropic
    base_url: {mock_url}
    keys: [{{key: env:SKEIN_TEST_MOCK_KEY}}]
  - name: mock-openai
    kind: openai
    base_url: {mock_url}/v1
    keys: [{{key: env:SKEIN_TEST_MOCK_KEY}}]
  - name: broken
    kind: openai_compatible
    base_url: {mock_url}/v1
    keys: [{{key: env:SKEIN_TEST_BROKEN_KEY}}]
routes:
  - name: gpt-test
    deployments: [{{provider: mock, model: mock-gpt}}]
  - name: embed-test
    deployments: [{{provider: mock, model: mock-embed}}]
  - name: claude-test
    deployments: [{{provider: mock-anthropic, model: claude-mock}}]
  - name: failing
    retry: {{max_attempts: 1}}
    deployments: [{{provider: broken, model: mock-gpt}}]
  - name: native
    deployments: [{{provider: mock-openai, model: gpt-upstream}}]
  - name: mini
    deployments: [{{provider: mock-openai, model: gpt-4o-mini}}]
"""
    directory = tmp_path_factory.mktemp("skein")
    path = directory / "skein.yaml"
    path.write_text(config)
    env = dict(os.environ)
    env.update(
        {
            "SKEIN_TEST_MOCK_KEY": "sk-mock",
            "SKEIN_TEST_BROKEN_KEY": "fail-500-key",
            "SKEIN_LOG_FORMAT": "json",
            "SKEIN_LOG": "info",
        }
    )
    node = Process(
        [
            binary("skein"), "serve", "--config", str(path), "--data-dir", str(directory / "data"),
            "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--gossip-addr", "off",
        ],
        env=env,
    )
    try:
        match = node.wait_for(r'"http":"(http://[0-9.:]+)"')
        yield match.group(1)
    finally:
        node.stop()


@pytest.fixture
def openai_client(gateway_url):
    import openai

    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused-in-open-mode", max_retries=0)


@pytest.fixture
def anthropic_client(gateway_url):
    import anthropic

    return anthropic.Anthropic(base_url=gateway_url, api_key="unused-in-open-mode", max_retries=0)


def parse_json(text):
    return json.loads(text)


@pytest.fixture(scope="module")
def admin_target(mock_url, tmp_path_factory):
    """A node of its own (keys created through its admin API close its proxy to callers
    without one, which the session's node must stay open to): its admin gRPC address."""
    directory = tmp_path_factory.mktemp("skein-admin")
    path = directory / "skein.yaml"
    path.write_text(
        f"""
version: 1
providers:
  - name: mock
    kind: openai_compatible
    base_url: {mock_url}/v1
    keys: [{{key: env:SKEIN_TEST_MOCK_KEY}}]
routes:
  - name: gpt-test
    deployments: [{{provider: mock, model: mock-gpt}}]
"""
    )
    env = dict(os.environ)
    env.update({"SKEIN_TEST_MOCK_KEY": "sk-mock", "SKEIN_LOG_FORMAT": "json", "SKEIN_LOG": "info"})
    node = Process(
        [
            binary("skein"), "serve", "--config", str(path), "--data-dir", str(directory / "data"),
            "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--gossip-addr", "off",
        ],
        env=env,
    )
    try:
        yield node.wait_for(r'"grpc":"http://([0-9.:]+)"').group(1)
    finally:
        node.stop()
