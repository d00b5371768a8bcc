"""Read an XTuner 0.1.x config without running it: its module-level names, evaluated from the syntax tree.

XTuner's configs are declarative: imports, assignments, arithmetic on PART 1's settings, strings
(f-strings, `.format`, `os.path.join`), and `dict(type=..., ...)` trees. This evaluator computes exactly
those. Every imported name becomes a `Symbol` (nothing is imported: not mmengine, xtuner, torch, nor
`os`), and calling one is recorded as a `Call`, so `dict(type=AutoModelForCausalLM.from_pretrained, ...)`
reads as data. `with read_base():` imports of other config files are read the same way. Anything else
(loops, `try`, `raise`, `open`, `__import__`, attributes of plain values beyond a few string and dict
methods, a config calling its own function) is refused with `file:line: reason`; no statement of the file
ever runs, and the work is bounded (evaluation steps, sizes of strings and lists, exponents).

    lr = 2e-4 * 2                          -> 0.0004
    model = dict(type=SupervisedFinetune,  -> {'type': Symbol('SupervisedFinetune'),
                 llm=dict(type=AutoModelForCausalLM.from_pretrained, torch_dtype=torch.float16))
                                               'llm': {'type': Symbol('transformers.AutoModelForCausalLM.from_pretrained'),
                                                       'torch_dtype': Symbol('torch.float16')}}
"""

from __future__ import annotations

import ast
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import TunerError

MAX_FILE_BYTES = 1 << 20  # XTuner's largest config is 9 KB
MAX_STEPS = 200_000  # expressions evaluated, all files together
MAX_SIZE = 100_000  # characters of a string, items of a list, width in a format spec
MAX_INT_BITS = 4096
MAX_DEPTH = 8  # read_base() files importing read_base() files


class Refused(TunerError):
    """The file cannot become a tuner config; the message says why."""


class Symbol:
    """A name from a module the converter does not import: `torch.float16`, `PROMPT_TEMPLATE.qwen_chat`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    @property
    def last(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass
class Call:
    """A placeholder called in the config, e.g. `SYSTEM_TEMPLATE.moss_sft.format(bot_name='Bot')`."""
    target: Symbol
    args: tuple
    kwargs: dict

    def __repr__(self) -> str:
        return f"{self.target.name}(...)"


class Defined:
    """A function or class the config defines itself (never run): known by its name."""

    def __init__(self, name: str, line: int):
        self.__name__, self.line = name, line

    def __repr__(self) -> str:
        return f"{self.__name__} (defined at line {self.line})"


@dataclass
class _Method:
    """A few methods of plain strings and dicts, bound, to be called with plain arguments."""
    owner: Any
    name: str


# Functions of imported modules that are computed for real, on strings only: path arithmetic.
PATH_FUNCTIONS = {"os.path.join": os.path.join, "os.path.basename": os.path.basename,
                  "os.path.dirname": os.path.dirname, "os.path.splitext": os.path.splitext,
                  "os.path.expanduser": os.path.expanduser}
BUILTINS = {"dict": dict, "list": list, "tuple": tuple, "int": int, "float": float, "str": str, "bool": bool,
            "len": len, "min": min, "max": max, "abs": abs, "round": round, "sorted": sorted}
STR_METHODS = {"format", "join", "replace", "strip", "lstrip", "rstrip", "lower", "upper", "split", "rsplit",
               "startswith", "endswith"}
DICT_METHODS = {"get", "keys", "values", "items", "copy"}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
           ast.Is: operator.is_, ast.IsNot: operator.is_not}
PLAIN = (str, int, float, bool, type(None), list, tuple, dict)


PLACEHOLDERS = (Symbol, Call, Defined)


class _Stop(Exception):
    """A refusal inside the evaluator: the node it happened at and why."""

    def __init__(self, node: ast.AST | None, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def read_xtuner_config(path: str | Path) -> dict[str, Any]:
    """The module-level names of an XTuner config, computed from its syntax tree; raises Refused."""
    return _Evaluator(Path(path), budget=[MAX_STEPS]).run()


class _Evaluator:
    def __init__(self, path: Path, budget: list[int], depth: int = 0, reading: tuple = ()):
        self.path, self.budget, self.depth, self.reading = path, budget, depth, reading + (path.resolve(),)
        self.ns: dict[str, Any] = {"__file__": str(path), "__name__": "xtuner_config"}

    # ------------------------------------------------------------------ statements

    def run(self) -> dict[str, Any]:
        try:
            if self.path.stat().st_size > MAX_FILE_BYTES:
                raise Refused(f"{self.path}: {self.path.stat().st_size} bytes: too large for a config "
                              f"(at most {MAX_FILE_BYTES})")
            source = self.path.read_text(encoding="utf-8")
            tree = ast.parse(source, str(self.path))
        except SyntaxError as e:
            raise Refused(f"{self.path}:{e.lineno}: not Python: {e.msg}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise Refused(f"{self.path}: cannot read it: {e}") from None
        for node in tree.body:
            try:
                self.statement(node)
            except _Stop as e:
                line = getattr(e.node, "lineno", None) or node.lineno
                raise Refused(f"{self.path}:{line}: {e.reason}") from None
            except Refused:
                raise
            except RecursionError:
                raise Refused(f"{self.path}:{node.lineno}: nested too deeply to read") from None
            except Exception as e:  # noqa: BLE001 - 1 / 0, int('x'), a missing key: the file's own error
                raise Refused(f"{self.path}:{node.lineno}: the config does not evaluate: {type(e).__name__}: {e}") \
                    from None
        return self.ns

    def statement(self, node: ast.stmt) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import os.path as osp` -> Symbol('os.path'); `import torch.nn` -> torch
                self.ns[alias.asname or alias.name.split(".")[0]] = Symbol(alias.name if alias.asname else
                                                                           alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                if alias.name == "*":
                    raise _Stop(node, f"`from {module} import *` outside `with read_base():`: the names it "
                                      "brings are unknown without importing it")
                self.ns[alias.asname or alias.name] = Symbol(f"{module}.{alias.name}")
        elif isinstance(node, ast.Assign):
            value = self.expr(node.value)
            for target in node.targets:
                self.assign(target, value)
        elif isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name):
                raise _Stop(node, "augmented assignment to something other than a name")
            self.ns[node.target.id] = self.binary(node.op, self.name(node.target), self.expr(node.value), node)
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None:
                self.assign(node.target, self.expr(node.value))
        elif isinstance(node, ast.Expr):
            if not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                raise _Stop(node, f"the statement {ast.unparse(node)[:60]!r} only acts (a config assigns names): "
                                  "tuner does not run it")
        elif isinstance(node, ast.If):
            for inner in node.body if self.truth(self.expr(node.test)) else node.orelse:
                self.statement(inner)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.ns[node.name] = Defined(node.name, node.lineno)  # never run: the mapping names it
        elif isinstance(node, ast.With) and self.is_read_base(node):
            for inner in node.body:
                self.read_base_import(inner)
        elif isinstance(node, ast.Pass):
            pass
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.ns.pop(target.id, None)
        else:
            what = type(node).__name__.lower().replace("asyncfor", "async for").replace("asyncwith", "async with")
            raise _Stop(node, f"a `{what}` statement: XTuner configs are declarative, and tuner reads them "
                              "without running any of their code")

    def assign(self, target: ast.expr, value) -> None:
        if isinstance(target, ast.Name):
            self.ns[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            if not isinstance(value, (list, tuple)) or len(value) != len(target.elts):
                raise _Stop(target, f"cannot unpack {value!r} into {len(target.elts)} names")
            for t, v in zip(target.elts, value):
                self.assign(t, v)
        elif isinstance(target, ast.Subscript) and isinstance(container := self.expr(target.value), (dict, list)):
            container[self.plain(self.expr(target.slice), target.slice)] = value
        else:
            raise _Stop(target, f"assignment to {ast.unparse(target)}")

    def is_read_base(self, node: ast.With) -> bool:
        if len(node.items) != 1 or node.items[0].optional_vars is not None:
            return False
        called = node.items[0].context_expr
        return (isinstance(called, ast.Call) and not called.args and not called.keywords
                and isinstance(target := self.expr(called.func), Symbol) and target.last == "read_base")

    def read_base_import(self, node: ast.stmt) -> None:
        """`from .base import *` / `from ..x.y import a, b` inside `with read_base():`: that config file's names."""
        if not isinstance(node, ast.ImportFrom):
            raise _Stop(node, "only imports of other config files belong in `with read_base():`")
        folder = self.path.parent
        for _ in range(max(node.level - 1, 0)):
            folder = folder.parent
        if node.level == 0:  # `from xtuner.configs.x import *`: inside the tree this file belongs to
            parts = (node.module or "").split(".")
            root = next((p for p in self.path.parents if p.name == parts[0]), None)
            if root is None:
                raise _Stop(node, f"read_base() import of {node.module}: not a config file beside this one")
            file = root.parent.joinpath(*parts).with_suffix(".py")
        else:
            file = folder.joinpath(*(node.module or "").split(".")).with_suffix(".py")
        if not file.is_file():
            raise _Stop(node, f"read_base() imports {'.' * node.level}{node.module}, but {file} does not exist")
        if file.resolve() in self.reading or self.depth >= MAX_DEPTH:
            raise _Stop(node, f"read_base() imports {file.name} again (a cycle, or deeper than {MAX_DEPTH} files)")
        base = _Evaluator(file, self.budget, self.depth + 1, self.reading).run()
        for alias in node.names:
            if alias.name == "*":
                self.ns.update({k: v for k, v in base.items() if not k.startswith("_")})
            elif alias.name in base:
                self.ns[alias.asname or alias.name] = base[alias.name]
            else:
                raise _Stop(node, f"{file.name} defines no {alias.name!r}")

    # ------------------------------------------------------------------ expressions

    def expr(self, node: ast.expr):
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise _Stop(node, f"more than {MAX_STEPS} expressions: too large to read")
        method = getattr(self, f"expr_{type(node).__name__}", None)
        if method is None:
            raise _Stop(node, f"{type(node).__name__} expressions ({ast.unparse(node)[:60]}) are not read in configs")
        return method(node)

    def name(self, node: ast.Name):
        if node.id in self.ns:
            return self.ns[node.id]
        if node.id in BUILTINS:
            return BUILTINS[node.id]
        raise _Stop(node, f"name {node.id!r} is not defined (or not one tuner reads in a config)")

    expr_Name = name

    def expr_Constant(self, node: ast.Constant):
        return node.value

    def expr_List(self, node: ast.List):
        return self.sized(self.elements(node.elts), node)

    def expr_Tuple(self, node: ast.Tuple):
        return tuple(self.sized(self.elements(node.elts), node))

    def expr_Set(self, node: ast.Set):
        return set(self.elements(node.elts))

    def elements(self, elts: list[ast.expr]) -> list:
        out = []
        for e in elts:
            if isinstance(e, ast.Starred):
                out.extend(self.plain(self.expr(e.value), e, (list, tuple)))
            else:
                out.append(self.expr(e))
        return out

    def expr_Dict(self, node: ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # {**other}
                out.update(self.plain(self.expr(value), value, dict))
            else:
                out[self.hashable(self.expr(key), key)] = self.expr(value)
        return out

    def expr_Attribute(self, node: ast.Attribute):
        if node.attr.startswith("_"):
            raise _Stop(node, f"attribute {node.attr!r}: private and dunder attributes are never read")
        owner = self.expr(node.value)
        if isinstance(owner, Symbol):
            return Symbol(f"{owner.name}.{node.attr}")
        if isinstance(owner, Call):
            return Symbol(f"{owner.target.name}(...).{node.attr}")
        if (isinstance(owner, str) and node.attr in STR_METHODS) or (isinstance(owner, dict) and node.attr in DICT_METHODS):
            return _Method(owner, node.attr)
        raise _Stop(node, f"attribute {node.attr!r} of {type(owner).__name__} {ast.unparse(node.value)[:40]}")

    def expr_Subscript(self, node: ast.Subscript):
        owner = self.expr(node.value)
        index = self.expr(node.slice)
        if not isinstance(owner, (dict, list, tuple, str)):
            raise _Stop(node, f"{ast.unparse(node.value)[:40]} ({owner!r}) cannot be indexed in a config")
        return owner[self.hashable(index, node.slice) if isinstance(owner, dict) else self.plain(index, node.slice)]

    def expr_Slice(self, node: ast.Slice):
        parts = [self.plain(self.expr(p), p, (int, type(None))) if p is not None else None
                 for p in (node.lower, node.upper, node.step)]
        return slice(*parts)

    def expr_UnaryOp(self, node: ast.UnaryOp):
        value = self.expr(node.operand)
        if isinstance(node.op, ast.Not):
            return not self.truth(value)
        value = self.plain(value, node.operand, (int, float, bool))
        return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}[type(node.op)](value)

    def expr_BinOp(self, node: ast.BinOp):
        return self.binary(node.op, self.expr(node.left), self.expr(node.right), node)

    def binary(self, op: ast.operator, left, right, node):
        if type(op) not in BINARY:
            raise _Stop(node, f"the operator {type(op).__name__} is not read in configs")
        for side in (left, right):
            self.plain(side, node, (int, float, bool, str, list, tuple))
        if isinstance(op, ast.Mult) and isinstance(left, (int, bool)) and isinstance(right, (str, list, tuple)):
            left, right = right, left
        if isinstance(op, ast.Mult) and isinstance(left, (str, list, tuple)) and isinstance(right, int):
            self.sized_count(len(left) * right, node)
        if isinstance(op, ast.Add) and isinstance(left, (str, list, tuple)):
            self.sized_count(len(left) + len(right), node)
        if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if right > 0 and right * max(abs(left).bit_length(), 1) > MAX_INT_BITS:
                raise _Stop(node, f"{left} ** {right} is too large")
        if isinstance(op, ast.Mod) and isinstance(left, str):  # '%10000000s' % x
            self.format_spec(left, node)
        result = BINARY[type(op)](left, right)
        return self.sized(result, node)

    def expr_BoolOp(self, node: ast.BoolOp):
        value = None
        for part in node.values:
            value = self.expr(part)
            if self.truth(value) == isinstance(node.op, ast.Or):
                return value
        return value

    def expr_Compare(self, node: ast.Compare):
        left = self.expr(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.expr(comparator)
            if isinstance(left, PLACEHOLDERS) or isinstance(right, PLACEHOLDERS):
                if not isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq)):
                    raise _Stop(node, f"{ast.unparse(node)[:60]}: a placeholder compared by order or membership")
                same = left is right  # (a placeholder equals only itself, as when XTuner runs the file)
                result = same if isinstance(op, (ast.Is, ast.Eq)) else not same
            else:
                result = COMPARE[type(op)](self.plain(left, node), self.plain(right, node))
            if not result:
                return False
            left = right
        return True

    def expr_IfExp(self, node: ast.IfExp):
        return self.expr(node.body) if self.truth(self.expr(node.test)) else self.expr(node.orelse)

    def expr_JoinedStr(self, node: ast.JoinedStr):
        return self.sized("".join(str(self.expr(v)) for v in node.values), node)

    def expr_FormattedValue(self, node: ast.FormattedValue):
        value = self.expr(node.value)
        if isinstance(value, PLACEHOLDERS):
            value = repr(value)
        value = {-1: value, 115: str(value), 114: repr(value), 97: ascii(value)}[node.conversion]
        spec = self.expr(node.format_spec) if node.format_spec is not None else ""
        self.format_spec("{:" + spec + "}", node)
        return format(self.plain(value, node), spec)

    def expr_Lambda(self, node: ast.Lambda):
        return Defined("<lambda>", node.lineno)

    def expr_Call(self, node: ast.Call):
        function = self.expr(node.func)
        args = []
        for a in node.args:
            if isinstance(a, ast.Starred):
                args.extend(self.plain(self.expr(a.value), a, (list, tuple)))
            else:
                args.append(self.expr(a))
        kwargs = {}
        for k in node.keywords:
            if k.arg is None:
                kwargs.update(self.plain(self.expr(k.value), k.value, dict))
            else:
                kwargs[k.arg] = self.expr(k.value)
        if isinstance(function, Symbol):
            real = PATH_FUNCTIONS.get(function.name)
            if real is not None and not kwargs and all(isinstance(a, str) for a in args):
                return self.sized(real(*args), node)
            return Call(function, tuple(args), kwargs)
        if isinstance(function, Defined):
            raise _Stop(node, f"calls the config's own {function.__name__}(): tuner does not run config code")
        if isinstance(function, _Method):
            return self.method(function, args, kwargs, node)
        if function is dict:
            return dict(*[self.plain(a, node, (dict, list, tuple)) for a in args], **kwargs)
        if any(function is b for b in BUILTINS.values()):
            for value in (*args, *kwargs.values()):
                self.plain(value, node)
            if function in (list, tuple, sorted) and args:
                self.sized_count(len(args[0]) if hasattr(args[0], "__len__") else MAX_SIZE + 1, node)
            return self.sized(function(*args, **kwargs), node)
        raise _Stop(node, f"calls {ast.unparse(node.func)[:60]} ({function!r}), which tuner does not run")

    def method(self, bound: _Method, args: list, kwargs: dict, node):
        owner, name = bound.owner, bound.name
        if name == "format":
            self.format_spec(owner, node)
            args = [repr(a) if isinstance(a, PLACEHOLDERS) else a for a in args]
            kwargs = {k: repr(v) if isinstance(v, PLACEHOLDERS) else v for k, v in kwargs.items()}
        for value in (*args, *kwargs.values()):
            self.plain(value, node)
        if name == "replace" and len(args) >= 2:
            self.sized_count(len(owner) + (owner.count(args[0]) * len(args[1])), node)
        if name == "join":
            self.sized_count(sum(len(str(x)) for x in args[0]) + len(owner) * len(args[0]), node)
        return self.sized(getattr(owner, name)(*args, **kwargs), node)

    # ------------------------------------------------------------------ checks

    def truth(self, value) -> bool:
        if isinstance(value, PLACEHOLDERS):
            return True  # (a placeholder is an object: true, as when XTuner runs the file)
        return bool(value)

    def plain(self, value, node, kinds: tuple = PLAIN):
        if not isinstance(value, kinds):
            raise _Stop(node, f"{ast.unparse(node)[:60]}: {value!r} is only known when XTuner runs"
                        if isinstance(value, PLACEHOLDERS) else
                        f"{ast.unparse(node)[:60]}: a {type(value).__name__} where a plain value is needed")
        return value

    def hashable(self, value, node):
        try:
            hash(value)
        except TypeError:
            raise _Stop(node, f"{value!r} cannot be a key") from None
        return value

    def sized(self, value, node):
        if isinstance(value, (str, list, tuple, dict, set)) and _weight(value, MAX_SIZE) > MAX_SIZE:
            raise _Stop(node, f"a value of more than {MAX_SIZE} items or characters (nested ones counted): too large "
                              "for a config")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _Stop(node, "a number too large for a config")
        return value

    def sized_count(self, count: int, node) -> None:
        if count > MAX_SIZE:
            raise _Stop(node, f"a value of {count} items or characters: too large for a config")

    def format_spec(self, text: str, node) -> None:
        """Widths and precisions in a format string ('{:>1000000000}', '%9999999d', '{:.999999f}') stay below
        MAX_SIZE: formatting is done only after this check. A width given as an argument ('{:>{}}', '%*d')
        cannot be checked here, so it is refused."""
        if re.search(r"(\{[^{}]*:|%)[^{}%]*?\d{6,}", text):
            raise _Stop(node, "a format width or precision too large for a config")
        if re.search(r"\{[^{}]*:[^{}]*\{", text) or re.search(r"%[-+ #0\d.]*\*", text):
            raise _Stop(node, "a format width or precision taken from an argument ('{:>{}}', '%*d') is not read")


def _weight(value, limit: int) -> int:
    """Characters and items of `value`, nested containers counted (stops counting past `limit`)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, tuple, set, dict)):
        return 1
    total = len(value)
    for item in (value.items() if isinstance(value, dict) else value):
        if total > limit:
            break
        total += _weight(item, limit - total)
    return total
