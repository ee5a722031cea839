// The npm `openai` package against a running selfseek server; tests/test_clients.py runs it under Node and
// compares what it prints with the server's own answer to the same requests.
// Usage: node chat.mjs BASE_URL MODEL  -> one JSON line: {text, streamed, toolName, toolArgs}
import assert from "node:assert/strict";
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "none", maxRetries: 0 });
const messages = [{ role: "user", content: "What is the capital of France?" }];

const reply = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0 });
const text = reply.choices[0].message.content;

let streamed = "";
const stream = await client.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0, stream: true });
for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";

const weather = {
  type: "function",
  function: {
    name: "get_weather", description: "Weather for a city.",
    parameters: { type: "object", properties: { city: { type: "string", enum: ["Paris", "Tokyo"] } },
                  required: ["city"], additionalProperties: false },
  },
};
const tooled = await client.chat.completions.create({
  model, messages: [{ role: "user", content: "Weather in Paris?" }], tools: [weather],
  tool_choice: { type: "function", function: { name: "get_weather" } }, max_tokens: 40, temperature: 0,
});
const call = tooled.choices[0].message.tool_calls[0];
assert.equal(tooled.choices[0].finish_reason, "tool_calls");
console.log(JSON.stringify({ text, streamed, toolName: call.function.name, toolArgs: JSON.parse(call.function.arguments) }));
