#!/usr/bin/env node
'use strict';
// What a failed call carries: submits a fine-tune whose second dataset row has an empty
// response, which the server refuses, and prints the decoded error as JSON (status code,
// message, and from the google.rpc.Status details: ErrorInfo reason, domain, field and row,
// BadRequest violations, RetryInfo hint). Exits 1 if the call does not fail that way.
//
//   node errors.js --target localhost:50051 [--token T | env TUNESERVE_TOKEN]

const { parseArgs } = require('node:util');
const { TuneserveClient, TuneserveError } = require('./tuneserve');

async function main() {
  const { values: args } = parseArgs({
    options: {
      target: { type: 'string', default: process.env.TUNESERVE_TARGET || 'localhost:50051' },
      token: { type: 'string', default: process.env.TUNESERVE_TOKEN },
    },
  });
  const client = new TuneserveClient(args.target, { token: args.token, maxAttempts: 1 });
  try {
    const rows = [
      { prompt: 'Question: Who is your father? Answer:', response: ' I am your father.' },
      { prompt: 'Question: What is your name? Answer:', response: '' },
    ];
    const request = { dataset: { inline: { rows } }, training: { max_steps: 1 } };
    const job = await client.trainJob(request);
    await client.cancelJob(job.id).catch(() => {});
    throw new Error(`the server accepted a bad row: job ${job.id}`);
  } catch (error) {
    if (!(error instanceof TuneserveError)) throw error;
    const { code, details, reason, domain, field, row, violations, retryAfterMs } = error;
    const decoded = { code, details, reason, domain, field, row, violations, retryAfterMs };
    console.log(JSON.stringify(decoded, null, 2));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
