"""The type stubs of the native extension (python/innerpissa/_rust.pyi) name exactly what the extension exports."""

import ast
from pathlib import Path

import innerpissa
from innerpissa import _rust

STUB = Path(innerpissa.__file__).with_name("_rust.pyi")


def _stub_names():
    tree = ast.parse(STUB.read_text())
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    return funcs, classes


def test_stub_functions_and_classes_match_the_extension():
    funcs, classes = _stub_names()
    exported = {n for n in dir(_rust) if not n.startswith("_")}
    assert funcs | set(classes) == exported


def test_stub_engine_methods_match_the_extension():
    _, classes = _stub_names()
    stub = {n.name for n in classes["Engine"].body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    real = {n for n in dir(_rust.Engine) if not n.startswith("_")}
    assert stub == real
