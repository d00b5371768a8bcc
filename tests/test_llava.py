"""LLaVA on tiny towers: image tokens and label masks, pretrain and finetune learning a
task only the image can solve, the HF export, chat and MMBench-style accuracy."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from tuner.config import DataConfig, LlavaConfig, ModelConfig, load_config
from tuner.data.encode import IGNORE
from tuner.errors import TunerError

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def shape_image(colour: str, rng: random.Random):
    """A shape of one colour on white, at a random place and size: only the colour matters."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (rng.randint(30, 48), rng.randint(30, 48)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    x, y = rng.randint(0, 8), rng.randint(0, 8)
    box = [x, y, x + rng.randint(18, 22), y + rng.randint(18, 22)]
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLOURS[colour])
    return image


@pytest.fixture(scope="module")
def towers(tmp_path_factory, tokenizer):
    """Tiny CLIP and SigLIP vision towers and a tiny LLM (hidden 64), saved as HF folders."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)
    CLIPVisionModel(CLIPVisionConfig(**size, projection_dim=32)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**size)).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root


def colour_rows(folder, count: int, seed: int, text_only: int = 0) -> list[dict]:
    """LLaVA rows asking the colour of a shape; `text_only` rows without an image mixed in."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour = rng.choice(list(COLOURS))
        shape_image(colour, rng).save(folder / "images" / f"{seed}_{i}.png")
        rows.append({"id": f"{seed}_{i}", "image": f"images/{seed}_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": colour}]})
    rows += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."},
                                               {"from": "gpt", "value": "Hi!"}]} for i in range(text_only)]
    return rows


def write_config(folder, towers, data, stage: str, encoder: str = "clip", **extra) -> str:
    lora = extra.pop("lora", "None")
    llava = {"visual_encoder": str(towers / encoder), **extra}
    text = textwrap.dedent(f"""\
        from tuner.config import *
        model = ModelConfig(path={str(towers / 'llm')!r})
        lora = {lora}
        llava = LlavaConfig(**{llava!r})
        data = DataConfig(path={str(data)!r}, max_length=256, pack=True)
        optim = OptimConfig(lr=1e-2)
        train = TrainConfig(batch_size=4, accumulative_counts=1, max_epochs={20 if stage == 'finetune' else 8},
                            warmup_ratio=0.0, dtype='fp32')
        checkpoint = CheckpointConfig(save_steps=1000)
        evaluate = EvaluateConfig(inputs=[])
        """)
    path = folder / f"{stage}_{encoder}.py"
    path.write_text(text)
    return str(path)


def test_image_tokens_and_label_masks_with_one_and_two_images(tmp_path, towers, tokenizer):
    from tuner.data.llava import build_image_sequences
    from tuner.model.llava import IMAGE_TOKEN, tokenizer_with_image_token, vision_info

    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        shape_image("red" if name == "a" else "blue", rng).save(tmp_path / "images" / f"{name}.png")
    rows = [
        {"id": "1", "image": "images/a.png", "conversations": [
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red shape."}]},
        {"id": "2", "images": ["images/a.png", "images/b.png"], "conversations": [
            {"from": "human", "value": "<image> and <image>: which is blue?"}, {"from": "gpt", "value": "The second."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    tok = tokenizer_with_image_token(str(towers / "llm"))
    llava = LlavaConfig(visual_encoder=str(towers / "clip"))
    vision = vision_info(llava, tok)
    assert vision.tokens_per_image == 16  # (32 / 8) ** 2 patches
    sequences = build_image_sequences(DataConfig(path=str(data), max_length=512, pack=False), llava, tok, vision,
                                      say=lambda _: None)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    samples = [sequences[k] for k in range(len(sequences))]  # unpacked, in the data's order
    for sample, row in zip(samples, rows):
        n_images = len(row.get("images") or ([row["image"]] if "image" in row else []))
        assert sample.input_ids.count(image_id) == 16 * n_images
        assert all(label == IGNORE for token, label in zip(sample.input_ids, sample.labels) if token == image_id)
        trained = tok.decode([t for t in sample.labels if t != IGNORE])
        replies = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert trained == "".join(f"{r}<|im_end|>\n" for r in replies)
    assert len(samples[1].images) == 2 and samples[1].images[1].endswith("b.png")

    # The features of image k land on the k-th block of image tokens.
    from tuner.model.llava import build_llava
    model = build_llava(ModelConfig(path=str(towers / "llm")), llava, tok).eval()
    batch = sequences.collate([sequences[1]], tok.pad_token_id)
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    positions = (batch["input_ids"][0] == image_id).nonzero().squeeze(-1)
    assert torch.allclose(seen["embeds"][0, positions[:16]], features[0], atol=1e-6)
    assert torch.allclose(seen["embeds"][0, positions[16:]], features[1], atol=1e-6)

    bad = tmp_path / "bad.json"
    bad.write_text("[\n" + ",\n".join(json.dumps(r) for r in [rows[0], {**rows[1], "images": ["images/a.png"]}])
                   + "\n]")  # one row per line: the error names the row's line
    with pytest.raises(TunerError, match=r"bad.json:3: .*2 <image> placeholders for 1 images"):
        build_image_sequences(DataConfig(path=str(bad)), llava, tok, vision, say=lambda _: None)
    bad.write_text(json.dumps([{**rows[0], "image": "images/missing.png"}]))
    with pytest.raises(TunerError, match=r"bad.json:1: .*file not found: .*missing.png"):
        build_image_sequences(DataConfig(path=str(bad)), llava, tok, vision, say=lambda _: None)


def accuracy(model_dir: str, rows: list[dict], folder) -> float:
    """Share of rows whose colour the model names, greedy, through tuner's chat core."""
    from PIL import Image

    from tuner.generation.generate import GenerationSettings, Generator
    from tuner.model.llava import load_llava_for_chat

    model, tokenizer, vision, _ = load_llava_for_chat(model_dir, None, None, torch.float32)
    generator = Generator(model, tokenizer)
    generator.vision = vision
    right = 0
    for row in rows:
        messages = [{"role": "user", "content": "<image>\nWhat colour is the shape?",
                     "images": [Image.open(folder / row["image"])]}]
        answer = generator.reply(messages, GenerationSettings(max_new_tokens=4))
        right += answer.strip() == row["conversations"][1]["value"]
    return right / len(rows)


@pytest.mark.slow
def test_pretrain_then_finetune_learn_the_colour_from_the_image(tmp_path, towers):
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.loop import Trainer

    data = tmp_path / "train.json"
    data.write_text(json.dumps(colour_rows(tmp_path, 64, seed=1, text_only=8)))
    held_out = colour_rows(tmp_path, 24, seed=2)

    pretrain = load_config(write_config(tmp_path, towers, data, "pretrain", freeze_llm=True))
    trainer = Trainer(pretrain, work_dir=tmp_path / "pretrain")
    losses = trainer.train()
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    trainable = {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad}
    assert trainable and all(".multi_modal_projector." in f".{n}" for n in trainable)
    pth_to_hf(pretrain, tmp_path / "pretrain" / f"iter_{len(losses)}.pth", tmp_path / "pretrain_hf", save_format="hf")
    before = accuracy(str(tmp_path / "pretrain_hf"), held_out, tmp_path)

    finetune = load_config(write_config(tmp_path, towers, data, "finetune", freeze_llm=False,
                                        pretrained_pth=str(tmp_path / "pretrain" / f"iter_{len(losses)}.pth")))
    trainer = Trainer(finetune, work_dir=tmp_path / "finetune")
    losses = trainer.train()
    assert losses[-1] < 0.05 * losses[0], losses
    pth_to_hf(finetune, tmp_path / "finetune" / f"iter_{len(losses)}.pth", tmp_path / "finetune_hf",
              save_format="hf")
    after = accuracy(str(tmp_path / "finetune_hf"), held_out, tmp_path)
    print(f"held-out colour accuracy: before finetune {before:.0%}, after {after:.0%}")
    assert before <= 0.5 and after >= 0.9

    # plain transformers, in a process that never imports tuner, gives the same logits
    image = tmp_path / held_out[0]["image"]
    script = textwrap.dedent(f"""\
        import sys, torch
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration
        assert not any(m.startswith("tuner") for m in sys.modules)
        model = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / 'finetune_hf')!r})
        processor = AutoProcessor.from_pretrained({str(tmp_path / 'finetune_hf')!r})
        text = processor.apply_chat_template([{{"role": "user", "content": "<image>\\nWhat colour is the shape?"}}],
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(images=Image.open({str(image)!r}), text=text, return_tensors="pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits, {str(tmp_path / 'plain.pt')!r})
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        """)
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == held_out[0]["conversations"][1]["value"]
    from PIL import Image

    from tuner.generation.generate import Generator
    model = trainer.raw_model.eval()
    generator = Generator(model, trainer.tokenizer)
    generator.vision = trainer.sequences.vision
    messages = [{"role": "user", "content": "<image>\nWhat colour is the shape?", "images": [Image.open(image)]}]
    ids = torch.tensor([generator.prompt_ids(messages)])
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=generator.pixel_values(messages)).logits
    theirs = torch.load(tmp_path / "plain.pt")
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4)

    # the chat CLI answers from the image; MMBench-style accuracy
    for row in held_out[:2]:
        result = subprocess.run([sys.executable, "-m", "tuner.cli", "chat", str(tmp_path / "finetune_hf"), "--image",
                                 str(tmp_path / row["image"]), "--temperature", "0", "--torch-dtype", "fp32",
                                 "--max-new-tokens", "4"], input="What colour is the shape?\n\nEXIT\n",
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert row["conversations"][1]["value"] in result.stdout


    # the server takes OpenAI image_url parts (data URLs); the web page sends them
    import threading

    import openai

    from tuner.model.llava import load_llava_for_chat
    from tuner.serve.api import Api, make_server
    model, tokenizer, vision, _ = load_llava_for_chat(str(tmp_path / "finetune_hf"), None, None, torch.float32)
    generator = Generator(model, tokenizer)
    generator.vision = vision
    server = make_server(Api(generator, "llava", None, max_new_tokens=4), "127.0.0.1", 0, page=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)

    def ask(row):
        url = "data:image/png;base64," + base64.b64encode((tmp_path / row["image"]).read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the shape?"}]
        reply = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                               temperature=0)
        return reply.choices[0].message.content

    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:  # batched: each row gets its own images
        answers = list(pool.map(ask, held_out[:8]))
    assert answers == [row["conversations"][1]["value"] for row in held_out[:8]]
    with pytest.raises(openai.BadRequestError, match="must be a data URL"):
        client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}])
    with pytest.raises(openai.BadRequestError, match="not a readable image"):
        client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    # image bombs: each image's pixels are checked from its header, before decoding; images per request capped
    from test_serve_hostile import bomb_png, image_request, peak_growth_while, post
    port = server.server_address[1]
    (status, body), grown = peak_growth_while(lambda: post(port, image_request(bomb_png(), 4).replace(
        '"tiny"', '"llava"'), key=None))
    assert status == 400 and "at most 16,777,216 pixels per image" in body["error"]["message"], body
    assert grown < 100 << 20, f"{grown >> 20} MB"
    small = (tmp_path / held_out[0]["image"]).read_bytes()
    status, body = post(port, image_request(small, 9).replace('"tiny"', '"llava"'), key=None)
    assert status == 400 and "at most 8 images" in body["error"]["message"], body
    server.shutdown()
    _chat_page_with_an_image(tmp_path / "finetune_hf", tmp_path / held_out[1]["image"],
                             held_out[1]["conversations"][1]["value"])


def _chat_page_with_an_image(model_dir, image, colour: str) -> None:
    """`tuner web` with a LLaVA model in headless Chromium: attach an image, ask, read the answer."""
    import shutil

    from test_serve import free_port, wait_for
    from test_web import CHROMIUM

    if not CHROMIUM:
        return
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "web", str(model_dir), "--port", str(port),
                               "--torch-dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}", server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                                 args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#temperature", "0")
            page.evaluate("document.getElementById('temperature').value = 0")
            page.set_input_files("#image", str(image))
            expect(page.locator("#attach")).to_have_class("ready")
            page.fill("#input", "What colour is the shape?")
            page.keyboard.press("Enter")
            expect(page.locator(".message.user img")).to_have_count(1)
            expect(page.locator(".message.assistant")).to_have_attribute("data-state", "done", timeout=60_000)
            assert page.locator(".message.assistant .text").inner_text().strip() == colour
            browser.close()
    finally:
        server.terminate()
        server.wait(10)


def mmbench_tsv(path, rows, folder) -> None:
    letters = "ABCD"
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage"]
    for i, row in enumerate(rows):
        buffer = io.BytesIO()
        from PIL import Image
        Image.open(folder / row["image"]).save(buffer, format="PNG")
        answer = letters[list(COLOURS).index(row["conversations"][1]["value"])]
        lines.append("\t".join([str(i), "What colour is the shape?", *COLOURS, answer, "colour",
                                base64.b64encode(buffer.getvalue()).decode()]))
    path.write_text("\n".join(lines) + "\n")


def test_lora_finetune_with_siglip_and_the_tuner_format(tmp_path, towers):
    """LoRA on the LLM and the SigLIP encoder: the loss falls; pth_to_hf writes projector + adapter +
    recipe, and chat / mmbench rebuild the model from the LLM and that folder."""
    from tuner.convert.hf import pth_to_hf
    from tuner.engine.loop import Trainer

    data = tmp_path / "train.json"
    data.write_text(json.dumps(colour_rows(tmp_path, 32, seed=3)))
    cfg = load_config(write_config(tmp_path, towers, data, "finetune", encoder="siglip", freeze_llm=False,
                                   lora="LoraConfig(r=8, alpha=16, dropout=0.0)",
                                   visual_encoder_lora=None), ["train.max_epochs=4"])
    cfg.llava.visual_encoder_lora = cfg.lora
    trainer = Trainer(cfg, work_dir=tmp_path / "work")
    losses = trainer.train()
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses
    names = [n for n, p in trainer.raw_model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n and "lora_" in n for n in names)
    assert any("language_model" in n and "lora_" in n for n in names)
    out = pth_to_hf(cfg, tmp_path / "work" / f"iter_{len(losses)}.pth", tmp_path / "parts")
    assert {"projector.safetensors", "adapter_model.safetensors", "adapter_config.json", "llava.json"} <= \
        {p.name for p in out.iterdir()}
    with pytest.raises(TunerError, match="trains a tower in full"):
        full = load_config(write_config(tmp_path, towers, data, "pretrain", freeze_llm=False))
        from tuner.convert.llava import write_llava_parts
        write_llava_parts(full, {"model.language_model.norm.weight": torch.ones(64)}, tmp_path)

    # the same logits from the rebuilt model as from the trained one
    from tuner.model.llava import load_llava_for_chat
    model, tokenizer, vision, _ = load_llava_for_chat(str(towers / "llm"), str(out), None, torch.float32)
    batch = trainer.sequences.collate([trainer.sequences[0]], tokenizer.pad_token_id)
    with torch.no_grad():
        # use_cache=False: with a KV cache sdpa lets packed samples see each other (DESIGN.md)
        rebuilt = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        position_ids=batch["position_ids"], use_cache=False).logits
        trained = trainer.raw_model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                           position_ids=batch["position_ids"], use_cache=False).logits
    # merged LoRA vs adapters on top: float32 rounding only (logits here reach +-40)
    assert (rebuilt - trained).abs().max() < 1e-3 * trained.abs().max(), (rebuilt - trained).abs().max()

    tsv = tmp_path / "bench.tsv"
    mmbench_tsv(tsv, colour_rows(tmp_path, 8, seed=4), tmp_path)
    result = subprocess.run([sys.executable, "-m", "tuner.cli", "mmbench", str(towers / "llm"), "--llava", str(out),
                             "--data", str(tsv), "--torch-dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("accuracy") and "/ 8" in result.stdout


def test_mmbench_answer_matching():
    from tuner.chat.mmbench import choice_of

    options = {"A": "red", "B": "green", "C": "blue"}
    assert choice_of("B", options) == "B" and choice_of("(C) blue", options) == "C"
    assert choice_of("It is green.", options) == "B"
    assert choice_of("red or green", options) is None and choice_of("purple", options) is None


def test_pad_to_square_uses_the_mean_colour(towers):
    from PIL import Image

    from tuner.model.llava import tokenizer_with_image_token, vision_info

    tok = tokenizer_with_image_token(str(towers / "llm"))
    vision = vision_info(LlavaConfig(visual_encoder=str(towers / "clip")), tok)
    wide = Image.new("RGB", (64, 16), (255, 0, 0))
    padded = vision.pixel_values([wide])[0]
    # CLIP's mean colour becomes ~0 after normalization; the red band stays in the middle rows
    assert padded.shape == (3, 32, 32)
    assert padded[:, 0, :].abs().max() < 0.02 and padded[0, 16, 16] > 1.5
    vision.pad_to_square = False
    stretched = vision.pixel_values([wide])[0]
    assert stretched[0, 0, 16] > 1.5  # resized and centre-cropped: red everywhere


def test_a_full_llm_finetune_keeps_float32_master_weights():
    """LLaVA finetune with the LLM unfrozen, loaded in bf16: what trains becomes float32, the frozen
    vision tower stays bf16."""
    import torch

    from tuner.config import LlavaConfig
    from tuner.model.llava import set_trainable

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    for part in ("language_model", "vision_tower", "multi_modal_projector"):
        setattr(model.model, part, torch.nn.Linear(4, 4).to(torch.bfloat16))
    llava = LlavaConfig(visual_encoder="openai/clip-vit-base-patch16", freeze_llm=False, freeze_visual_encoder=True)
    set_trainable(model, llava, llm_lora=False, vision_lora=False)
    dtypes = {name.split(".")[1]: (p.dtype, p.requires_grad) for name, p in model.named_parameters()}
    assert dtypes == {"language_model": (torch.float32, True), "vision_tower": (torch.bfloat16, False),
                      "multi_modal_projector": (torch.float32, True)}


def test_llava_data_goes_through_the_token_cache_with_repeats_and_map_fn(tmp_path, towers):
    """LLaVA rows are tokenized once into the memory-mapped store (the next build reads it), with the
    repeats of each source and a map_fn honoured; pack_split is refused rather than ignored."""
    from tuner.config import DatasetSource
    from tuner.data.llava import build_image_sequences
    from tuner.model.llava import tokenizer_with_image_token, vision_info

    rng = random.Random(1)
    shape_image("red", rng).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]
    (tmp_path / "llava.json").write_text(json.dumps(rows))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q": "2+2?", "a": "4.", "picture": "a.png"}) + "\n")

    def qa_map_fn(row):
        return {"messages": [{"role": "user", "content": "<image>\n" + row["q"]},
                             {"role": "assistant", "content": row["a"]}], "images": [row["picture"]]}

    tok = tokenizer_with_image_token(str(towers / "llm"))
    llava = LlavaConfig(visual_encoder=str(towers / "clip"))
    vision = vision_info(llava, tok)
    cfg = DataConfig(sources=[DatasetSource(path=str(tmp_path / "llava.json"), repeats=2.0),
                              DatasetSource(path=str(tmp_path / "qa.jsonl"), map_fn=qa_map_fn)],
                     max_length=256, pack=False)
    said = []
    first = build_image_sequences(cfg, llava, tok, vision, say=said.append)
    assert len(first) == 5 and "(from cache)" not in said[0]  # 2 rows x 2 repeats + 1
    assert [len(first[k].images) for k in range(5)] == [1, 0, 1, 0, 1]
    assert "3 with 3 images" not in said[0] and "2 with 2 images" in said[0]  # the store holds 3 samples
    again = build_image_sequences(cfg, llava, tok, vision, say=said.append)
    assert "(from cache)" in said[-2] and again.store.folder == first.store.folder
    assert [again[k].input_ids for k in range(5)] == [first[k].input_ids for k in range(5)]
    with pytest.raises(TunerError, match="pack_split"):
        build_image_sequences(DataConfig(path=str(tmp_path / "llava.json"), pack_split=True), llava, tok, vision,
                              say=lambda _: None)


def test_llava_trains_under_deepspeed(tmp_path, towers, monkeypatch):
    """A LLaVA run under --deepspeed (ZeRO-2, one process): the DeepSpeed config reaches the engine and the
    loss falls as without it."""
    pytest.importorskip("deepspeed")
    from tuner.engine.loop import Trainer

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29561"}.items():
        monkeypatch.setenv(key, value)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(colour_rows(tmp_path, 16, seed=5)))
    cfg = load_config(write_config(tmp_path, towers, data, "pretrain"), ["train.max_epochs=3"])
    trainer = Trainer(cfg, work_dir=tmp_path / "work", deepspeed="deepspeed_zero2")
    losses = trainer.train()
    assert trainer.strategy.name == "deepspeed" and type(trainer.model).__name__ == "DeepSpeedEngine"
    assert losses[-1] < losses[0], losses


def test_llava_batches_made_in_worker_processes_equal_the_main_process_ones(tmp_path, towers):
    """train.dataloader_num_workers=2: the images are decoded in forked worker processes and the run is
    the same. The in-process run goes first, so its image threads exist when the workers fork (a thread
    pool copied by fork has no threads and would hang)."""
    from tuner.engine.loop import Trainer

    data = tmp_path / "train.json"
    data.write_text(json.dumps(colour_rows(tmp_path, 12, seed=6)))
    runs = {}
    for workers in (0, 2):
        cfg = load_config(write_config(tmp_path, towers, data, "pretrain"),
                          ["train.max_epochs=3", f"train.dataloader_num_workers={workers}"])
        runs[workers] = Trainer(cfg, work_dir=tmp_path / f"work{workers}").train()
    assert len(runs[0]) >= 2 and runs[2] == runs[0], runs
