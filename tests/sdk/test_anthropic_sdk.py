"""The official Anthropic Python SDK against Skein, to an Anthropic upstream (passed through)
and to an OpenAI-shaped upstream (translated)."""

import anthropic
import pytest

TOOLS = [
    {"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "description": "time", "input_schema": {"type": "object", "properties": {}}},
]

BOTH = pytest.mark.parametrize("model", ["claude-test", "gpt-test"])


@BOTH
def test_message(anthropic_client, model):
    message = anthropic_client.messages.create(
        model=model, max_tokens=200, system="Be brief.", messages=[{"role": "user", "content": "hello claude"}]
    )
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text.endswith("hello claude")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


@BOTH
def test_streaming_text(anthropic_client, model):
    with anthropic_client.messages.stream(
        model=model, max_tokens=200, messages=[{"role": "user", "content": "stream it"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.endswith("stream it")
    assert final.content[0].text == text
    assert final.usage.output_tokens > 0


@BOTH
def test_streaming_tool_use(anthropic_client, model):
    with anthropic_client.messages.stream(
        model=model, max_tokens=200, tools=TOOLS, messages=[{"role": "user", "content": 'weather and time? [[call get_weather {"call":0,"city":"Paris"}]] [[call get_time {"call":1,"city":"Paris"}]]'}]
    ) as stream:
        final = stream.get_final_message()
    uses = [block for block in final.content if block.type == "tool_use"]
    assert [use.name for use in uses] == ["get_weather", "get_time"]
    assert uses[0].input == {"call": 0, "city": "Paris"}
    assert final.stop_reason == "tool_use"


@BOTH
def test_tool_result_round_trip(anthropic_client, model):
    first = anthropic_client.messages.create(
        model=model, max_tokens=200, tools=TOOLS, messages=[{"role": "user", "content": 'weather? [[call get_weather {"call":0,"city":"Paris"}]] [[call get_time {"call":1,"city":"Paris"}]]'}]
    )
    use = next(block for block in first.content if block.type == "tool_use")
    second = anthropic_client.messages.create(
        model=model,
        max_tokens=200,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": 'weather? [[call get_weather {"call":0,"city":"Paris"}]] [[call get_time {"call":1,"city":"Paris"}]]'},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
        ],
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"


def test_thinking_stream_passes_through(anthropic_client):
    with anthropic_client.messages.stream(
        model="claude-test",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "think"}],
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking"
    assert final.content[0].signature == "mock-signature"
    assert final.content[1].type == "text"


def test_count_tokens(anthropic_client):
    counted = anthropic_client.messages.count_tokens(
        model="claude-test", messages=[{"role": "user", "content": "how many tokens is this"}]
    )
    assert counted.input_tokens > 0


def test_unknown_model(anthropic_client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        anthropic_client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_upstream_failure(anthropic_client):
    with pytest.raises(anthropic.InternalServerError) as caught:
        anthropic_client.messages.create(model="failing", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502
