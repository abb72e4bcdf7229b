// Chat with an llm-edge gateway using the official OpenAI Node client.
//
//   npm install
//   export LLM_BASE_URL=http://HOST:8000/v1   # "/v1" is added when missing
//   export LLM_API_KEY=sk-...                 # the key you were given for the gateway
//   export LLM_MODEL=qwen3                    # optional: default is the first listed model
//   node client.mjs                           # one chat, then one streamed chat
import OpenAI from 'openai';

const url = (process.env.LLM_BASE_URL || 'http://localhost:8000/v1').replace(/\/+$/, '');
const baseURL = url.endsWith('/v1') ? url : `${url}/v1`;
const apiKey = process.env.LLM_API_KEY;
if (!apiKey) fail('set LLM_API_KEY to the API key you were given for the gateway');

const client = new OpenAI({ baseURL, apiKey, maxRetries: 1, timeout: 120_000 });

try {
  const model = process.env.LLM_MODEL || (await firstModel());

  console.log(`== chat (${model})`);
  const resp = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Say hello in one short sentence.' }],
  });
  console.log(resp.choices[0].message.content);

  console.log(`== stream (${model})`);
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Count from 1 to 10.' }],
    stream: true,
  });
  for await (const chunk of stream) {
    process.stdout.write(chunk.choices[0]?.delta?.content ?? '');
  }
  process.stdout.write('\n');
} catch (err) {
  if (err instanceof OpenAI.AuthenticationError) {
    fail(`the gateway rejected LLM_API_KEY: ${err.error?.message ?? err.message}`,
      "check LLM_API_KEY, or ask the gateway's operator for a key");
  } else if (err instanceof OpenAI.APIConnectionError) {
    fail(`cannot reach ${baseURL}`, 'is the gateway running, and is LLM_BASE_URL right?');
  } else if (err instanceof OpenAI.NotFoundError) {
    fail(err.error?.message ?? err.message,
      `set LLM_MODEL to one of the models available: ${await modelNames()}`);
  } else if (err instanceof OpenAI.APIError) {
    fail(err.status ? `the gateway answered ${err.status}: ${err.error?.message ?? err.message}` : err.message);
  } else {
    throw err;
  }
}

async function firstModel() {
  const { data } = await client.models.list();
  if (data.length === 0) fail(`${baseURL} lists no models; set LLM_MODEL`);
  return data[0].id;
}

async function modelNames() {
  try {
    const { data } = await client.models.list();
    return data.map((m) => m.id).join(', ') || '(none)';
  } catch {
    return "(could not list them: is LLM_BASE_URL the gateway's /v1 URL?)";
  }
}

function fail(message, hint) {
  console.error(`error: ${message}`);
  if (hint) console.error(`hint: ${hint}`);
  process.exit(1);
}
