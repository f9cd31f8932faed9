// The official OpenAI Node SDK's `client.responses.create` through Skein: a plain answer, a
// stream, a tool round trip and a `previous_response_id` chain. Usage: node
// openai_responses.mjs BASE_URL MODEL. Prints one JSON line of what it saw; exits 1 on a
// failed check.
import OpenAI from "openai";
import assert from "node:assert/strict";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "sk-client", maxRetries: 0 });

const first = await client.responses.create({ model, input: "hello from node", instructions: "Be brief." });
assert.equal(first.status, "completed");
assert.match(first.output_text, /hello from node/);

const stream = await client.responses.create({ model, input: "stream from node", stream: true });
const kinds = [];
let streamed = "";
let completed;
for await (const event of stream) {
  kinds.push(event.type);
  if (event.type === "response.output_text.delta") streamed += event.delta;
  if (event.type === "response.completed") completed = event.response;
}
assert.equal(kinds[0], "response.created");
assert.ok(completed, "a response.completed event");
assert.equal(completed.output_text ?? streamed, streamed);
assert.ok(completed.usage.output_tokens > 0);

const tools = [{ type: "function", name: "lookup", description: "look a word up", parameters: { type: "object", properties: { word: { type: "string" } }, required: ["word"], additionalProperties: false }, strict: true }];
const asked = await client.responses.create({ model, tools, input: 'define [[call lookup {"word": "skein"}]]' });
const call = asked.output.find((item) => item.type === "function_call");
assert.ok(call, "a function call");
assert.deepEqual(JSON.parse(call.arguments), { word: "skein" });
const answered = await client.responses.create({
  model, tools, previous_response_id: asked.id,
  input: [{ type: "function_call_output", call_id: call.call_id, output: "a loosely coiled length of yarn" }],
});
assert.equal(answered.status, "completed");
const again = await client.responses.retrieve(answered.id);
assert.equal(again.id, answered.id);
console.log(JSON.stringify({ ok: true, events: kinds.length, tool: call.name, final: answered.output_text }));
