#!/usr/bin/env node
'use strict';
// Train a small LoRA adapter from inline rows, follow the job until it finishes, then stream
// a generation with the adapter. Exits non-zero on any error or if the job does not succeed.
//
//   node example.js --target localhost:50051 [--token T | env TUNESERVE_TOKEN] [--ca ca.pem]
//                   [--cert client.pem --key client.key] [--steps 20]

const { parseArgs } = require('node:util');
const { TuneserveClient, TuneserveError } = require('./tuneserve');

const ROWS = [
  { prompt: 'Question: Who is your father? Answer:', response: ' I am your father.' },
  { prompt: 'Question: What is your name? Answer:', response: ' Darth Vader.' },
  { prompt: 'Question: What do you want? Answer:', response: ' Join me, and rule the galaxy.' },
  { prompt: 'Question: Where are you? Answer:', response: ' On the Death Star.' },
];

async function main() {
  const { values: args } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.TUNESERVE_TARGET || 'localhost:50051' },
      token: { type: 'string', default: process.env.TUNESERVE_TOKEN },
      ca: { type: 'string' },
      cert: { type: 'string' },
      key: { type: 'string' },
      'server-name': { type: 'string' },
      'adapter-id': { type: 'string', default: `node-example-${Date.now().toString(36)}` },
      steps: { type: 'string', default: '20' },
      'max-new-tokens': { type: 'string', default: '24' },
    },
  });
  const client = new TuneserveClient(args.target, {
    ca: args.ca,
    cert: args.cert,
    key: args.key,
    serverName: args['server-name'],
    token: args.token,
  });
  try {
    let job = await client.trainJob({
      dataset: { inline: { rows: ROWS } },
      adapter_id: args['adapter-id'],
      lora: { r: 8 },
      training: { max_steps: Number(args.steps), batch_size: 2, learning_rate: 0.01 },
    });
    console.log(`job ${job.id} ${stateName(job)} -> adapter ${job.adapter_id}`);

    let last = '';
    job = await client.waitForJob(job.id, {
      pollMs: 200,
      onProgress: (j) => {
        const p = j.progress;
        let line = `progress: ${stateName(j)}`;
        if (j.state === 'JOB_STATE_QUEUED') line += ` (queue position ${p.queue_position})`;
        else if (p.total_steps) line += ` step ${p.step}/${p.total_steps} loss ${p.loss.toFixed(4)}`;
        if (line !== last) console.log(line);
        last = line;
      },
    });
    if (job.state !== 'JOB_STATE_SUCCEEDED') {
      const why = job.error ? `${job.error.code}: ${job.error.message}` : '';
      throw new Error(`job ${job.id} ended ${stateName(job)} ${why}`);
    }
    console.log(`job ${job.id} SUCCEEDED adapter=${job.adapter_id} loss ${job.progress.loss.toFixed(4)}`);

    const prompt = ROWS[0].prompt;
    process.stdout.write(`generation: ${prompt}`);
    let final;
    for await (const chunk of client.generateStream(
      {
        prompt,
        adapter_id: job.adapter_id,
        parameters: { greedy: true, max_new_tokens: Number(args['max-new-tokens']) },
      },
      { timeoutMs: 120000 },
    )) {
      process.stdout.write(chunk.text);
      final = chunk;
    }
    process.stdout.write('\n');
    console.log(
      `[${final.finish_reason.replace('FINISH_REASON_', '')}, ${final.prompt_tokens} prompt + ` +
        `${final.generated_tokens} generated tokens, seed ${final.seed}]`,
    );
  } finally {
    client.close();
  }
}

function stateName(job) {
  return job.state.replace('JOB_STATE_', '');
}

// A failed call prints its code, the bad field, the message and the server's reason, e.g.
//   error: INVALID_ARGUMENT dataset.inline.rows[0].response: is missing or empty (reason ...)
// and, when the server named several bad fields, one line for each.
function describe(error) {
  if (!(error instanceof TuneserveError)) return `error: ${error.message}`;
  const where = error.field && !error.details.startsWith(error.field) ? `${error.field}: ` : '';
  let text = `error: ${error.code} ${where}${error.details}`;
  if (error.reason) text += ` (reason ${error.reason})`;
  if (error.retryAfterMs != null) text += ` (retry after ${error.retryAfterMs} ms)`;
  if (error.violations.length > 1) {
    for (const v of error.violations) text += `\n  ${v.field}: ${v.description}`;
  }
  return text;
}

main().catch((error) => {
  console.error(describe(error));
  process.exit(1);
});
