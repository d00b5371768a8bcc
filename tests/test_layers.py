"""The layers import only downwards: config -> data -> model -> generation -> engine -> convert -> chat / serve
-> cli. Every import of every module in tuner/ (at the top or inside a function) is read and checked."""

import ast
from pathlib import Path

import tuner

LAYERS = {
    "errors": 0, "paths": 0, "dtypes": 0, "rewards": 0, "config": 0, "config_writer": 0, "configs_index": 0,
    "data": 1,
    "model": 2,
    "generation": 3,
    "engine": 4,
    "convert": 5,
    "chat": 6, "serve": 6, "board": 7,
    "cli": 7, "__main__": 7, "__init__": 7,
}


def imports_of(file: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                     if node.module == "tuner"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.startswith("tuner.")]


def test_no_module_imports_a_higher_layer():
    root = Path(tuner.__file__).parent
    upward, unknown = [], []
    for file in sorted(root.rglob("*.py")):
        layer_name = file.relative_to(root).parts[0].removesuffix(".py")
        if layer_name not in LAYERS:
            unknown.append(str(file))
            continue
        for line, name in imports_of(file):
            target = name.split(".")[1]
            if target not in LAYERS:
                unknown.append(f"{file}:{line}: {name}")
            elif LAYERS[target] > LAYERS[layer_name]:
                upward.append(f"{file.relative_to(root.parent)}:{line}: {layer_name} imports {name}")
    assert not unknown, f"modules without a layer in LAYERS: {unknown}"
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    file = tmp_path / "x.py"
    file.write_text("def f():\n    from tuner.chat.cli import main\n")
    assert imports_of(file) == [(2, "tuner.chat.cli")]


def test_the_loop_does_not_ask_which_strategy_it_runs():
    """Single process, DDP, FSDP2 and DeepSpeed differ only inside their Strategy objects (engine/strategy.py)."""
    import re

    source = (Path(tuner.__file__).parent / "engine" / "loop.py").read_text(encoding="utf-8")
    asked = re.findall(r".*(?:strategy(?:\.name)? *(?:==|!=|in |not in )|\"(?:deepspeed|fsdp|ddp|single)\").*", source)
    assert not asked, asked
