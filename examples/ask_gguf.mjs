// Ask a GGUF file questions with llama.cpp (the npm package node-llama-cpp, its prebuilt CPU build), greedy,
// through the chat template stored in the file; prints JSON: {"answers": [...], "tokens": {text: ids}}.
//   node examples/ask_gguf.mjs MODEL.gguf "question 1" "question 2" ...   (TOKENIZE='["text", ...]' to tokenize)
// node-llama-cpp is looked up from the current folder, then from each NODE_PATH folder (npm install node-llama-cpp).
import {createRequire} from "node:module";
import {join} from "node:path";
import {pathToFileURL} from "node:url";

function locate() {
    for (const folder of [process.cwd(), ...(process.env.NODE_PATH || "").split(":").filter(Boolean)]) {
        try {
            return createRequire(join(folder, "package.json")).resolve("node-llama-cpp");
        } catch {}
    }
    throw new Error("node-llama-cpp is not installed here: npm install node-llama-cpp (or set NODE_PATH)");
}
const {getLlama, JinjaTemplateChatWrapper, LlamaChatSession} = await import(pathToFileURL(locate()).href);

const [modelPath, ...questions] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const template = model.fileInfo.metadata.tokenizer.chat_template;
const context = await model.createContext({contextSize: 1024, threads: 2});
const answers = [];
for (const question of questions) {  // each question in a fresh conversation
    const sequence = context.getSequence();
    const session = new LlamaChatSession({contextSequence: sequence,
        chatWrapper: template ? new JinjaTemplateChatWrapper({template}) : "auto"});
    session.setChatHistory([]);  // (no system prompt of node-llama-cpp's: the template's own default, if any)
    answers.push(await session.prompt(question, {temperature: 0, maxTokens: 64}));
    session.dispose();
    sequence.dispose();
}
const tokens = {};
for (const text of JSON.parse(process.env.TOKENIZE || "[]")) tokens[text] = Array.from(model.tokenize(text, true));  // (special tokens as tokens)
console.log(JSON.stringify({answers, tokens}));
await context.dispose();
await model.dispose();
