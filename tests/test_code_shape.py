"""House rules that a reader of the package relies on (shared/DESIGN.md): no function longer
than 80 lines, no class defined inside a function."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ollama_ft"
MAX_LINES = 80


def _functions():
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PKG).as_posix(), node


def test_no_function_over_80_lines():
    long = [f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for rel, n in _functions() if n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert not long, long


def test_no_class_defined_inside_a_function():
    inner = [f"{rel}:{c.lineno} {c.name} in {n.name}" for rel, n in _functions()
             for c in ast.walk(n) if isinstance(c, ast.ClassDef)]
    assert not inner, inner


def test_llama_cpp_models_are_opened_in_one_place():
    """llamacpp.open_gguf decides how a GGUF is opened (llama.cpp#20824: no AMX repacking);
    a Llama(...) anywhere else in the package would open models around it."""
    calls = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == "Llama":
                    calls.append(f"{path.relative_to(PKG).as_posix()}:{node.lineno}")
    assert calls and all(c.startswith("llamacpp.py:") for c in calls), calls
