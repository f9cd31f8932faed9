// The Vercel AI SDK's default `openai(model)` (the Responses API) through Skein:
// `generateText` and `streamText`, each with a tool the model calls and whose result it then
// answers from. Usage: node ai_sdk.mjs BASE_URL MODEL. Prints one JSON line; exits 1 on a
// failed check.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText, tool, jsonSchema, stepCountIs } from "ai";
import assert from "node:assert/strict";

const [baseURL, model] = process.argv.slice(2);
const openai = createOpenAI({ baseURL, apiKey: "sk-client" });
let calls = 0;
const tools = {
  weather: tool({
    description: "the weather in a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false }),
    execute: async ({ city }) => { calls += 1; return `sunny in ${city}`; },
  }),
};

const plain = await generateText({ model: openai(model), prompt: "hello from the ai sdk" });
assert.match(plain.text, /hello from the ai sdk/);
assert.ok(plain.usage.outputTokens > 0);

const withTool = await generateText({
  model: openai(model), tools, stopWhen: stepCountIs(3),
  prompt: 'weather? [[call weather {"city": "Lyon"}]]',
});
assert.equal(calls, 1);
assert.equal(withTool.steps.length, 2);
assert.equal(withTool.steps[0].toolCalls[0].toolName, "weather");

const streamed = streamText({
  model: openai(model), tools, stopWhen: stepCountIs(3),
  prompt: 'stream it [[call weather {"city": "Oslo"}]]',
});
let text = "";
for await (const part of streamed.textStream) text += part;
assert.equal(calls, 2);
assert.ok(text.length > 0);
const steps = await streamed.steps;
assert.equal(steps.length, 2);
console.log(JSON.stringify({ ok: true, plain: plain.text, tool: withTool.text, streamed: text }));
