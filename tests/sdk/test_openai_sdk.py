"""The official OpenAI Python SDK against Skein, unchanged."""

import json

import openai
import pytest


def test_chat(openai_client):
    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello sdk"}]
    )
    assert completion.choices[0].message.content == "Mock reply from mock-gpt: hello sdk"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0


def test_chat_raw_headers(openai_client):
    raw = openai_client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-skein-provider"] == "mock"
    assert raw.headers["x-skein-deployment"] == "mock/mock-gpt"
    assert raw.headers["x-request-id"]


def test_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "Mock reply from mock-gpt: stream please"
    assert usage is not None and usage.completion_tokens > 0


def test_streaming_without_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "plain"}], stream=True
    )
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk when not asked"
    assert "".join(c.choices[0].delta.content or "" for c in chunks).endswith("plain")


def test_parallel_tool_calls(openai_client):
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
    completion = openai_client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": 'weather and time? [[call get_weather {"call":0,"city":"Paris"}]] [[call get_time {"call":1,"city":"Paris"}]]'}], tools=tools
    )
    calls = completion.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments)["city"] == "Paris"
    assert completion.choices[0].finish_reason == "tool_calls"


def test_streaming_tool_calls(openai_client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    with openai_client.chat.completions.stream(
        model="gpt-test", messages=[{"role": "user", "content": 'look it up [[call lookup {"call":0,"city":"Paris"}]]'}], tools=tools
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"call": 0, "city": "Paris"}


def test_embeddings(openai_client):
    # The SDK asks for base64 by default and decodes it.
    result = openai_client.embeddings.create(model="embed-test", input=["one", "two"], dimensions=5)
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 5
    assert result.usage.prompt_tokens > 0


def test_models(openai_client):
    ids = {model.id for model in openai_client.models.list()}
    assert {"gpt-test", "embed-test", "claude-test"} <= ids


def test_unknown_model_is_a_not_found_error(openai_client):
    with pytest.raises(openai.NotFoundError) as caught:
        openai_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "gpt-test" in str(caught.value)
    assert caught.value.body["code"] == "model_not_found"


def test_upstream_failure_is_a_bad_gateway(openai_client):
    with pytest.raises(openai.APIStatusError) as caught:
        openai_client.chat.completions.create(model="failing", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
    assert "broken" in caught.value.message


def test_upstream_client_error_passes_through(openai_client):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.chat.completions.create(model="mock/mock-400", messages=[{"role": "user", "content": "x"}])
    assert "mock fault 400" in caught.value.message


def test_rate_limit_surfaces_as_rate_limit_error(openai_client):
    with pytest.raises(openai.RateLimitError) as caught:
        openai_client.chat.completions.create(model="mock/mock-429", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers.get("retry-after")
