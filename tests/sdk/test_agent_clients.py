"""The clients users run, installed pinned from the npm registry (tests/clients/package.json)
and driven against Skein: the OpenAI Node SDK's `responses.create`, the Vercel AI SDK's
`generateText`/`streamText`, Codex CLI (`codex exec`) and Claude Code (`claude -p`), each
through a native upstream and a translated one, each with a tool round trip.

`scripts/test` installs the clients and sets SKEIN_CLIENTS_DIR (their node_modules); run alone
without it, these tests are skipped, unless SKEIN_REQUIRE_CLIENTS=1 (CI) makes that a failure.
"""

import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "clients"
CLIENTS = os.environ.get("SKEIN_CLIENTS_DIR")

if not CLIENTS:
    if os.environ.get("SKEIN_REQUIRE_CLIENTS") == "1":
        raise RuntimeError("SKEIN_CLIENTS_DIR is not set: scripts/test installs the clients")
    pytest.skip("the agent clients are not installed (run scripts/test)", allow_module_level=True)

BIN = Path(CLIENTS) / ".bin"
NODE = str(BIN / "node")


def run(args, cwd, env=None, timeout=120):
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(
        args, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{output}"
    return output


@pytest.mark.parametrize("model", ["native", "claude-test"])
def test_openai_node_sdk_responses(gateway_url, model):
    output = run([NODE, str(SCRIPTS / "openai_responses.mjs"), f"{gateway_url}/v1", model], SCRIPTS)
    assert '"ok":true' in output


@pytest.mark.parametrize("model", ["native", "claude-test"])
def test_vercel_ai_sdk_generate_and_stream_with_a_tool(gateway_url, model):
    output = run([NODE, str(SCRIPTS / "ai_sdk.mjs"), f"{gateway_url}/v1", model], SCRIPTS)
    assert '"ok":true' in output
    if model == "claude-test":
        assert "sunny in Lyon" in output and "sunny in Oslo" in output


def tool_prompt(tool, arguments):
    return f"make the marker [[call {tool} {arguments}]]"


# Native: an OpenAI upstream, the Responses API passed through. Translated: an Anthropic one.
@pytest.mark.parametrize("model", ["native", "claude-test"])
def test_codex_exec_runs_a_command_and_finishes(gateway_url, model, tmp_path):
    home = tmp_path / "codex-home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "skein"\n'
        f'[model_providers.skein]\nname = "Skein"\nbase_url = "{gateway_url}/v1"\n'
        'env_key = "SKEIN_CLIENT_KEY"\nwire_api = "responses"\n'
    )
    prompt = tool_prompt("exec_command", '{"cmd": "echo skein-$((6*7)) > marker.txt"}')
    output = run(
        [str(BIN / "codex"), "exec", "--skip-git-repo-check", "--sandbox", "danger-full-access", prompt],
        work,
        env={"CODEX_HOME": str(home), "SKEIN_CLIENT_KEY": "sk-client"},
    )
    assert (work / "marker.txt").read_text().strip() == "skein-42", output
    assert "Mock reply from" in output


# Native: an Anthropic upstream. Translated: gpt-4o-mini behind an OpenAI upstream, which
# refuses Claude Code's max_tokens of 32000 unless Skein clamps it to the model's 16384.
@pytest.mark.parametrize("model", ["claude-test", "mini"])
def test_claude_code_runs_a_command_and_finishes(gateway_url, model, tmp_path):
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()
    prompt = tool_prompt("Bash", '{"command": "echo skein-$((6*7)) > marker.txt", "description": "marker"}')
    env = {
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": gateway_url,
        "ANTHROPIC_API_KEY": "sk-client",
        "ANTHROPIC_MODEL": model,
        "ANTHROPIC_SMALL_FAST_MODEL": model,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    output = run([str(BIN / "claude"), "-p", prompt, "--allowedTools", "Bash"], work, env=env)
    assert (work / "marker.txt").read_text().strip() == "skein-42", output
    assert "Mock reply from" in output
