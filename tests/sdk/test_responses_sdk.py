"""The Responses API with the official OpenAI Python SDK (`client.responses.create`) and the
OpenAI Agents SDK (whose default model speaks the Responses API), each natively (an OpenAI
upstream) and translated (an Anthropic upstream), each with a tool round trip."""

import json

import pytest

BOTH = pytest.mark.parametrize("model", ["native", "claude-test"])
LOOKUP = [
    {
        "type": "function",
        "name": "lookup",
        "description": "look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    }
]


@BOTH
def test_create_retrieve_chain_and_delete(openai_client, model):
    first = openai_client.responses.create(model=model, input="remember the word teal", instructions="Be brief.")
    assert first.status == "completed"
    assert "remember the word teal" in first.output_text
    assert first.usage.input_tokens > 0
    second = openai_client.responses.create(model=model, input="which word?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert openai_client.responses.retrieve(second.id).id == second.id
    items = openai_client.responses.input_items.list(second.id)
    texts = json.dumps([item.model_dump() for item in items.data])
    assert "remember the word teal" in texts and "which word?" in texts
    openai_client.responses.delete(first.id)
    with pytest.raises(Exception) as missing:
        openai_client.responses.retrieve(first.id)
    assert getattr(missing.value, "status_code", None) == 404


@BOTH
def test_stream_events_and_tool_round_trip(openai_client, model):
    with openai_client.responses.stream(model=model, input="stream please") as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.output_text.endswith("stream please")
    asked = openai_client.responses.create(model=model, tools=LOOKUP, input='define [[call lookup {"word": "skein"}]]')
    call = next(item for item in asked.output if item.type == "function_call")
    assert json.loads(call.arguments) == {"word": "skein"}
    answered = openai_client.responses.create(
        model=model,
        tools=LOOKUP,
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "a coil of yarn"}],
    )
    assert answered.status == "completed"
    if model == "claude-test":
        # The translated upstream's answer has seen the tool's result.
        assert "a coil of yarn" in answered.output_text


@BOTH
def test_the_agents_sdk_runs_a_tool_and_finishes(gateway_url, model):
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool
    from openai import AsyncOpenAI

    seen = []

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    client = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="sk-client", max_retries=0)
    agent = Agent(
        name="forecaster",
        instructions="Answer with the weather.",
        tools=[weather],
        model=OpenAIResponsesModel(model=model, openai_client=client),
    )
    result = Runner.run_sync(agent, 'weather? [[call weather {"city": "Lyon"}]]')
    assert seen == ["Lyon"]
    assert result.final_output
    if model == "claude-test":
        assert "sunny in Lyon" in result.final_output
