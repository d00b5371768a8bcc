// For tests/test_gguf.py: llama.cpp's (node-llama-cpp, prebuilt CPU build) view of a GGUF file, given token ids.
//   node tests/gguf_next_tokens.mjs MODEL.gguf '[[ids...], ...]' STEPS
// prints JSON: for each prompt, the next-token probabilities after it (the 10 likeliest, [id, p]) and the
// greedy continuation of STEPS tokens; with TOKENIZE='["text", ...]', llama.cpp's ids for each text too.
import {createRequire} from "node:module";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

const where = createRequire(join(process.env.NODE_PATH.split(":")[0], "package.json")).resolve("node-llama-cpp");
const {getLlama} = await import(pathToFileURL(where).href);
const [modelPath, prompts, steps] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, threads: 2});
const results = [];
for (const prompt of JSON.parse(prompts)) {
    const sequence = context.getSequence();
    let top = null;
    const greedy = [];
    for await (const out of sequence.evaluateWithMetadata(prompt, {probabilities: true}, {temperature: 0})) {
        if (top === null) top = Array.from(out.probabilities.entries()).slice(0, 10);
        greedy.push(out.token);
        if (greedy.length >= Number(steps)) break;
    }
    results.push({top, greedy});
    sequence.dispose();
}
const tokens = {};
for (const text of JSON.parse(process.env.TOKENIZE || "[]")) tokens[text] = Array.from(model.tokenize(text, true));
console.log(JSON.stringify({results, tokens}));
await context.dispose();
await model.dispose();
