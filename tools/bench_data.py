"""Data preparation speed: tuner vs TRL's SFTTrainer on the same rows and tokenizer.

    pip install -c constraints.txt trl==1.16.0   # only for this benchmark
    python tools/bench_data.py [--rows 100000] [--max-length 2048] [--num-proc 2]
    python tools/bench_data.py --rows 1000000 --kind alpaca-json|jsonl|parquet|llava   # cold, cached, peak RSS

Generates alpaca-style rows (instruction / input / output of varied lengths), then times,
side by side in one run:
  tuner cold    rows -> messages -> chat template -> ids + assistant mask -> packed plan
  tuner cached  the same again (read from the tokenized cache)
  TRL cold      SFTTrainer's dataset preparation (prompt/completion rows, completion-only
                loss, packing) from a JSON file with an empty datasets cache
  TRL cached    the same again (datasets' own cache of the map results)
and prints rows/s and the packing efficiency. Both use the embedded SmolLM2 tokenizer and
its chat template, and the same number of processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model learns from data that people write about cities rivers code music history science food "
         "travel health language numbers stories questions answers").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [{"instruction": sentence(rng.randint(4, 30)), "input": sentence(rng.randint(0, 40)) if i % 3 else "",
             "output": " ".join(sentence(rng.randint(5, 25)) for _ in range(rng.randint(1, 12)))} for i in range(n)]


def time_tuner(path: Path, tokenizer, max_length: int, num_proc: int) -> tuple[float, float, float]:
    from tuner.config import DataConfig
    from tuner.data.dataset import build_sequences

    data = DataConfig(path=str(path), format="alpaca", max_length=max_length, num_proc=num_proc)
    started = time.perf_counter()
    _, report = build_sequences(data, tokenizer, say=lambda _: None)
    cold = time.perf_counter() - started
    assert not report.from_cache
    started = time.perf_counter()
    _, again = build_sequences(data, tokenizer, say=lambda _: None)
    cached = time.perf_counter() - started
    assert again.from_cache
    return cold, cached, report.packing_efficiency


def time_trl(rows: list[dict], tokenizer, max_length: int, num_proc: int, workdir: Path) -> tuple[float, float]:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tuner.data.formats import ALPACA_SYSTEM

    path = workdir / "trl_rows.jsonl"
    with open(path, "w") as f:
        for r in rows:  # the same conversations, in TRL's prompt/completion format
            user = f"{r['instruction']}\n{r['input']}" if r["input"] else r["instruction"]
            f.write(json.dumps({"prompt": [{"role": "system", "content": ALPACA_SYSTEM},
                                           {"role": "user", "content": user}],
                                "completion": [{"role": "assistant", "content": r["output"]}]}) + "\n")
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(workdir / "trl_out"), max_length=max_length, packing=True,
                     completion_only_loss=True, dataset_num_proc=num_proc, report_to=[], use_cpu=True)
    times = []
    for _ in range(2):
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(workdir / "hf"))
        started = time.perf_counter()
        SFTTrainer(model=tiny, args=args, train_dataset=dataset, processing_class=tokenizer)
        times.append(time.perf_counter() - started)
    torch.manual_seed(0)
    return times[0], times[1]


def write_rows(rows: list[dict], path: Path, kind: str) -> Path:
    """The rows as a .json array (indent 4, like alpaca_data.json), .jsonl, or .parquet."""
    if kind == "alpaca-json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows, indent=4, ensure_ascii=False))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def llava_rows(n: int, images: int, seed: int = 0) -> list[dict]:
    """LLaVA-style rows naming one of `images` image files (or none, one row in ten), as in the 665k mix."""
    rng = random.Random(seed)
    base = make_rows(min(n, 20_000), seed)
    rows = []
    for i in range(n):
        r = base[i % len(base)]
        row = {"id": str(i), "conversations": [{"from": "human", "value": r["instruction"]},
                                               {"from": "gpt", "value": r["output"]}]}
        if i % 10:
            row["image"] = f"images/{rng.randrange(images)}.png"
        rows.append(row)
    return rows


class PeakMemory:
    """Peak resident memory of this process plus its children (the tokenizing workers), sampled every
    50 ms while the block runs, in GiB; `base` is the RSS when it started (the tokenizer loaded)."""

    def __enter__(self):
        import threading

        import psutil
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self._now()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _now(self) -> float:
        import psutil
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**30

    def _watch(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def bench_store(path: Path, tokenizer, kind: str, max_length: int, num_proc: int, workdir: Path) -> tuple[float, float]:
    """Seconds to prepare the data cold and to read it from the cache, with tuner's own entry points."""
    from tuner.config import DataConfig
    from tuner.data.dataset import build_sequences

    if kind == "llava":
        from tuner.data.dataset import pack_best_fit
        from tuner.data.llava import expanded_lengths
        from tuner.data.tokenized import ImageSettings, load_token_store

        cfg = DataConfig(path=str(path), max_length=max_length, num_proc=num_proc, template="chatml")
        images = ImageSettings(None, 576)

        def build():
            store, cached = load_token_store(cfg, tokenizer, lambda _: None, images=images)
            pack_best_fit(expanded_lengths(store, images.tokens_per_image).tolist(), max_length)
            return cached
    else:
        cfg = DataConfig(path=str(path), format="alpaca", max_length=max_length, num_proc=num_proc)

        def build():
            return build_sequences(cfg, tokenizer, say=lambda _: None)[1].from_cache
    times = []
    for expect_cached in (False, True):
        started = time.perf_counter()
        assert build() == expect_cached
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--kind", choices=["alpaca-json", "jsonl", "parquet", "llava", "trl"], default="trl",
                        help="the file tuner reads, timed cold and cached with peak memory; 'trl': the "
                             "side-by-side run against TRL on .jsonl")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # internal: the measuring child process
    args = parser.parse_args()

    from tuner.model.embedded import embedded_model_dir
    from tuner.model.load import load_tokenizer

    if args.prepare:  # the child: prepare the file, timed and watched from a clean process
        tokenizer = load_tokenizer(str(embedded_model_dir()))
        if args.kind == "llava":
            tokenizer.add_tokens(["<image>"], special_tokens=True)
        with PeakMemory() as memory:
            cold, cached = bench_store(Path(args.prepare), tokenizer, args.kind, args.max_length, args.num_proc,
                                       Path(args.prepare).parent)
        print(json.dumps({"cold": cold, "cached": cached, "base": memory.base, "peak": memory.peak}))
        return 0
    if args.kind != "trl":
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            if args.kind == "llava":
                (workdir / "images").mkdir()
                from PIL import Image
                for i in range(1000):
                    Image.new("RGB", (4, 4)).save(workdir / "images" / f"{i}.png")
                rows = llava_rows(args.rows, 1000)
            else:
                rows = make_rows(args.rows)
            path = write_rows(rows, workdir / "data", "jsonl" if args.kind == "llava" else args.kind)
            del rows
            size = path.stat().st_size
            env = {**os.environ, "TUNER_DATA_CACHE": str(workdir / "tuner_cache")}
            run = subprocess.run([sys.executable, __file__, "--prepare", str(path), "--kind", args.kind,
                                  "--max-length", str(args.max_length), "--num-proc", str(args.num_proc)],
                                 capture_output=True, text=True, env=env)
            if run.returncode != 0:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            figures = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{args.rows} rows, {args.kind} ({size / 2**20:.0f} MiB), max_length {args.max_length}, "
              f"{args.num_proc} processes, SmolLM2 tokenizer")
        print(f"cold    {figures['cold']:8.1f} s  {args.rows / figures['cold']:9.0f} rows/s")
        print(f"cached  {figures['cached']:8.1f} s  {args.rows / figures['cached']:9.0f} rows/s")
        print(f"peak RSS while preparing (the process and its workers): {figures['peak']:.2f} GiB, "
              f"{figures['peak'] - figures['base']:+.2f} GiB over the loaded tokenizer ({figures['base']:.2f} GiB)")
        return 0

    tokenizer = load_tokenizer(str(embedded_model_dir()))
    rows = make_rows(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["TUNER_DATA_CACHE"] = str(workdir / "tuner_cache")
        path = workdir / "alpaca.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cold, cached, efficiency = time_tuner(path, tokenizer, args.max_length, args.num_proc)
        try:
            trl_cold, trl_cached = time_trl(rows, tokenizer, args.max_length, args.num_proc, workdir)
        except ImportError:
            print("TRL is not installed: pip install -c constraints.txt trl==1.16.0", file=sys.stderr)
            trl_cold = trl_cached = float("nan")
    n = args.rows
    print(f"{n} alpaca-style rows, max_length {args.max_length}, {args.num_proc} processes, SmolLM2 tokenizer")
    print(f"{'':14}{'seconds':>10}{'rows/s':>12}")
    for name, seconds in (("tuner cold", cold), ("tuner cached", cached), ("TRL cold", trl_cold),
                          ("TRL cached", trl_cached)):
        print(f"{name:14}{seconds:10.2f}{n / seconds:12.0f}")
    print(f"cold: tuner is {trl_cold / cold:.2f}x TRL; cached: {trl_cached / cached:.2f}x")
    print(f"tuner packing efficiency (real tokens / slots): {efficiency:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
