"""End-to-end: the real `tuner` commands in subprocesses, as a user runs them."""

import functools
import io
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import write_config


# Commands whose process is not under test run in this process (each subprocess paid ~5 s of imports);
# train (signals, torchrun, the allocator restart), chat, serve and web keep their own process.
IN_PROCESS = {"check-config", "check-custom-dataset", "check-template", "convert", "copy-cfg", "list-cfg",
              "list-dataset-format", "log-dataset", "make-identity-data", "score"}


def tuner(*args, stdin: str | None = None, cwd=None, check=True, env=None, subprocess_only=False):
    args = [str(a) for a in args]
    if (args[0] in IN_PROCESS and stdin is None and cwd is None and env is None and not subprocess_only
            and "NPROC_PER_NODE" not in os.environ):
        result = _in_process(args)
    else:
        result = subprocess.run([sys.executable, "-m", "tuner", *args], input=stdin, capture_output=True,
                                text=True, cwd=cwd, timeout=600, env=None if env is None else {**os.environ, **env})
    if check and result.returncode != 0:
        raise AssertionError(f"tuner {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def _in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`tuner ARGS` through cli.main in this process, its output captured as a subprocess's would be."""
    import contextlib

    from tuner.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["tuner", *args], code, out.getvalue(), err.getvalue())


@pytest.mark.slow
def test_train_convert_merge_chat(tmp_path, tiny_model_dir, data_file):
    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=2, save_steps=3, inputs=["Who are you?"])
    work = tmp_path / "work"
    run = tuner("train", cfg, "--work-dir", work, "--cfg-options", "optim.lr=5e-3")
    assert "Training finished" in run.stderr and "packing efficiency" in run.stderr
    last = (work / "last_checkpoint").read_text()
    assert last.endswith(".pth") and (work / last.split("/")[-1]).exists()
    assert (work / "eval_outputs_iter_0.txt").read_text().startswith("Evaluate-chat at iter 0")
    assert "lr = 5e-3" in (work / "resolved_config.py").read_text()  # (PART 1, as the user writes it)
    (run_dir,) = [d for d in work.iterdir() if d.is_dir()]
    steps = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    assert steps[-1]["step"] == int(last.split("iter_")[1].split(".")[0])
    assert "Iter(train)" in (run_dir / f"{run_dir.name}.log").read_text()

    tuner("convert", "pth_to_hf", cfg, last, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    tuner("convert", "merge", tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", "--max-shard-size", "5MB")
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) > 1  # sharded as asked

    chat = tuner("chat", tmp_path / "merged", "--temperature", "0", "--max-new-tokens", "8",
                 stdin="Who are you?\n\nRESET\n\nHi\nthere\n\nEXIT\n")
    assert chat.stdout.count(">>>") == 4 and "History responses have been removed" in chat.stdout
    adapter_chat = tuner("chat", tiny_model_dir, "--adapter", tmp_path / "adapter", "--temperature", "0",
                         "--max-new-tokens", "8", "--no-streamer", stdin="Who are you?\n\n")
    assert adapter_chat.returncode == 0 and adapter_chat.stdout.count(">>>") == 2  # end of input ends the chat


def test_train_runs_with_jemalloc_or_tcmalloc_where_installed(tmp_path, tiny_model_dir, data_file):
    """`tuner train` restarts itself with the allocator preloaded (CI installs libjemalloc2) and freed
    memory kept for reuse; without one (TUNER_MALLOC=glibc: as on a machine without jemalloc), with
    glibc's heap kept; TUNER_MALLOC=system changes nothing; a full fine-tune takes glibc's settings, with
    no advice to install the jemalloc it has. (Each setting's choice: test_engine.py.)"""
    from tuner.engine.allocator import find_library

    cfg = write_config(tmp_path, tiny_model_dir, data_file, epochs=1)
    found = find_library()
    run = tuner("train", cfg, "--work-dir", tmp_path / "work")
    if found and found[0] == "jemalloc":
        assert "memory allocator jemalloc (freed memory kept for reuse)," in run.stderr, run.stderr[-2000:]
    elif found:
        assert f"memory allocator {found[0]}," in run.stderr, run.stderr[-2000:]
    else:
        assert "memory allocator glibc malloc (freed memory kept for reuse, merged at once; install jemalloc" in run.stderr
    glibc = tuner("train", cfg, "--work-dir", tmp_path / "glibc", env={"TUNER_MALLOC": "glibc"})
    assert "memory allocator glibc malloc (freed memory kept for reuse, merged at once)," in glibc.stderr, glibc.stderr[-2000:]
    plain = tuner("train", cfg, "--work-dir", tmp_path / "plain", env={"TUNER_MALLOC": "system"})
    assert "memory allocator glibc malloc," in plain.stderr
    if found:
        full = tuner("train", write_config(tmp_path, tiny_model_dir, data_file, lora=False, epochs=1, name="full"),
                     "--work-dir", tmp_path / "full")
        assert "memory allocator glibc malloc (freed memory kept for reuse, merged at once)," in full.stderr


@pytest.mark.slow
def test_chat_with_the_embedded_model_uses_its_own_template():
    chat = tuner("chat", "smollm2-135m-instruct", "--temperature", "0", "--max-new-tokens", "24",
                 stdin="What is the capital of France?\n\nEXIT\n")
    assert "Paris" in chat.stdout and "<|im_end|>" not in chat.stdout and "<|im_start|>" not in chat.stdout


def test_embedded_model_second_load_is_fast(embedded_dir):
    from tuner.config import ModelConfig
    from tuner.model.load import load_model

    started = time.perf_counter()
    model = load_model(ModelConfig())
    assert time.perf_counter() - started < 5
    assert model.config.num_hidden_layers == 30 and model.dtype.is_floating_point


def test_list_and_copy_cfg(tmp_path):
    listed = tuner("list-cfg", "-p", "INTERNLM2_1_8B").stdout.split()
    assert listed == ["internlm2_1_8b_full_alpaca_e3", "internlm2_1_8b_qlora_alpaca_e3"]
    assert len(tuner("list-cfg").stdout.split()) >= 5
    assert tuner("list-cfg", "-p", "nothing-like-this", check=False).returncode == 1
    tuner("copy-cfg", "smollm2_135m_instruct_lora_personal_assistant_e3", tmp_path)
    assert (tmp_path / "smollm2_135m_instruct_lora_personal_assistant_e3_copy.py").exists()
    again = tuner("copy-cfg", "smollm2_135m_instruct_lora_personal_assistant_e3", tmp_path, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    # `tuner list-cfg | head -1`: the reader closes the pipe; a quiet exit, no traceback
    process = subprocess.Popen([sys.executable, "-m", "tuner", "list-cfg"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the interpreter has started, so its first write meets a closed pipe
    assert process.wait(timeout=60) == 141 and "Traceback" not in process.stderr.read()


def _fails_cleanly(result, *fragments):
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def in_process(capsys, *args, stdin: str = "") -> subprocess.CompletedProcess:
    """`tuner ARGS` through tuner.cli.main in this process: the same code and exit code without
    the ~5 s a new interpreter takes to import torch and transformers."""
    from tuner.cli import main

    capsys.readouterr()
    saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    finally:
        sys.stdin = saved
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_errors_are_clear_with_real_exit_codes(tmp_path, tiny_model_dir, data_file, capsys):
    # real processes: the exit codes a shell sees
    _fails_cleanly(tuner("train", tmp_path / "missing.py", check=False), "config file not found")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(data_file.read_text().splitlines()[0] + "\n{not json\n")
    cfg = write_config(tmp_path, tiny_model_dir, bad_data)
    _fails_cleanly(tuner("train", cfg, "--work-dir", tmp_path / "w", check=False), "bad.jsonl:2: malformed JSON")
    assert tuner("train", check=False).returncode == 2  # usage error
    # the same entry point in this process
    run = functools.partial(in_process, capsys)
    cfg = write_config(tmp_path, tiny_model_dir, data_file)
    _fails_cleanly(run("train", cfg, "--cfg-options", "data.template=nope"), "unknown prompt template 'nope'")
    _fails_cleanly(run("train", cfg, "--cfg-options", "optim.lr=abc"), "optim.lr=abc': expected a number, got 'abc'")
    skipped = run("train", write_config(tmp_path, tiny_model_dir, bad_data), "--work-dir", tmp_path / "w3",
                  "--skip-bad-rows")
    assert skipped.returncode == 0, skipped.stderr
    assert "1 bad rows skipped (first: " in skipped.stderr and "bad.jsonl:2: malformed JSON" in skipped.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("from tuner.config import *\nmodel = ModelConfig(path=1)\n")
    _fails_cleanly(run("train", broken), "broken.py:2: ModelConfig.path must be str")
    missing_rows = tmp_path / "rows.jsonl"
    missing_rows.write_text('{"dialogue": []}\n')
    _fails_cleanly(run("train", write_config(tmp_path, tiny_model_dir, missing_rows)),
                   "rows.jsonl:1: cannot tell the format from the columns dialogue; set data.format to one of")
    missing_rows.write_text('{"conversation": []}\n')  # XTuner's own format, empty
    _fails_cleanly(run("train", write_config(tmp_path, tiny_model_dir, missing_rows)),
                   "rows.jsonl:1: field 'conversation': must be a non-empty list of {system, input, output} turns")
    _fails_cleanly(run("train", write_config(tmp_path, tmp_path / "no_model", data_file)), "model folder not found")
    _fails_cleanly(run("convert", "pth_to_hf", cfg, tmp_path / "nope.pth", tmp_path / "out"), "cannot read checkpoint")
    _fails_cleanly(run("convert", "merge", tiny_model_dir, tmp_path, tmp_path / "m"), "not an adapter folder")
    _fails_cleanly(run("chat", tmp_path / "nowhere"), "model folder not found")
    assert run("train", cfg, "--resume", tmp_path / "x.pth", "--work-dir", tmp_path / "w2").returncode == 1


def test_hub_id_offline_is_a_clear_error(tmp_path, data_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(tmp_path, "someone/some-model-that-is-not-cached", data_file)
    result = tuner("train", cfg, "--work-dir", tmp_path / "w", check=False)
    _fails_cleanly(result, "could not load 'someone/some-model-that-is-not-cached' from the Hugging Face hub")
