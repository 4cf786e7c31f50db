"""No argparse below the command layer (issue 20): only a command's main and its argument parsing see a Namespace.

    .venv/bin/python -m pytest -q tests/test_no_namespace.py

An AST scan of every .py under runtime/, train/, export/ and benchmarks/. A function fails when
a parameter is annotated argparse.Namespace, or is named `args` or `ns` and read with attribute
access (`args.engine`) in the function's body: the untyped Namespace passed down under its usual
name. Allowed: main, parse_args and build_parser, and a classmethod `from_args` whose body only
converts (a docstring and one return), which is how a command turns its flags into the typed
job the library takes (runtime.infer.InferJob.from_args).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "train", "export", "benchmarks")
COMMAND_LAYER = {"main", "parse_args", "build_parser"}
# Triton's Python backend calls initialize(self, args) with a dict of strings (its model config, the
# instance's device), not a Namespace: the name is Triton's, so it is allowed by file and function.
ALLOWED = {("export/triton_model.py", "initialize")}
NAMES = {"args", "ns"}


def _only_converts(fn: ast.FunctionDef) -> bool:
    """A classmethod whose body is an optional docstring and one return statement."""
    is_classmethod = any(isinstance(d, ast.Name) and d.id == "classmethod" for d in fn.decorator_list)
    body = fn.body[1:] if fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value,
                                                                                       ast.Constant) else fn.body
    return is_classmethod and len(body) == 1 and isinstance(body[0], ast.Return)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    return [*a.posonlyargs, *a.args, *a.kwonlyargs, *(p for p in (a.vararg, a.kwarg) if p is not None)]


def _offences(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Why `fn` takes a Namespace, or [] when it does not."""
    read = {n.value.id for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    why = []
    for p in _params(fn):
        if p.annotation is not None and "Namespace" in ast.unparse(p.annotation):
            why.append(f"parameter {p.arg} annotated {ast.unparse(p.annotation)}")
        elif p.arg in NAMES and p.arg in read:
            why.append(f"parameter {p.arg} read as {p.arg}.<attribute>")
    return why


def scan(path: Path, rel: str) -> list[str]:
    """'file:line function: why' for each function of the file that takes a Namespace."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if fn.name in COMMAND_LAYER or (rel, fn.name) in ALLOWED:
            continue
        if fn.name == "from_args" and _only_converts(fn):
            continue
        found += [f"{rel}:{fn.lineno} {fn.name}: {why}" for why in _offences(fn)]
    return found


def test_the_scan_finds_what_it_should_and_only_that(tmp_path):
    """The rule on a file written for it: each kind of offence is found, each allowed form is not."""
    src = tmp_path / "sample.py"
    src.write_text(
        "import argparse\n"
        "def typed(ns: argparse.Namespace): return 1\n"                        # annotated: found
        "def untyped(args, device): return args.engine\n"                     # read as args.x: found
        "def quoted(x: 'argparse.Namespace'): pass\n"                          # annotation as a string: found
        "def fine(args: list[str]): return len(args)\n"                       # a list named args: allowed
        "def kw(*, engine: str, threads: int = 1): return engine\n"           # keyword arguments: allowed
        "def main(argv=None):\n    args = parse_args(argv)\n    return args.x\n"
        "def build_parser(): pass\n"
        "class Job:\n"
        "    @classmethod\n"
        "    def from_args(cls, ns):\n        'converts'\n        return cls(ns.engine)\n"
        "class Bad:\n"
        "    @classmethod\n"
        "    def from_args(cls, ns):\n        ns.engine = 'x'\n        return cls(ns.engine)\n")
    found = scan(src, "sample.py")
    assert [f.split(":")[1].split()[1] for f in found] == ["typed", "untyped", "quoted", "from_args"], found


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_below_main_takes_a_namespace(path):
    found = scan(path, path.relative_to(ROOT).as_posix())
    assert not found, "takes an argparse.Namespace below the command layer (use a dataclass or keyword " \
                      "arguments):\n" + "\n".join(found)
