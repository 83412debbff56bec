"""The code's shape, checked (issue 16): module and function sizes, the two-tower contract spelled
once, and every error's gRPC status a real one."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import grpc
import pytest

from neuronserve import errors

ROOT = Path(__file__).resolve().parent.parent
TREES = ("neuronserve", "compile", "bench")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
CONTRACT_NAMES = ("pair_scorer", "user_tower", "peer_tower")


def sources() -> list[Path]:
    return sorted(
        p for tree in TREES for p in (ROOT / tree).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in sources() if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long():
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_stage_names_are_string_literals_in_one_module_only():
    spelled = {
        name: sorted(
            str(p.relative_to(ROOT))
            for p in sources()
            if any(
                isinstance(node, ast.Constant) and node.value == name for node in ast.walk(ast.parse(p.read_text()))
            )
        )
        for name in CONTRACT_NAMES
    }
    assert spelled == {name: ["neuronserve/contract.py"] for name in CONTRACT_NAMES}


ERROR_CLASSES = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.NeuronServeError)
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_maps_to_a_real_grpc_status(cls):
    assert isinstance(cls.status, errors.Status)
    assert isinstance(cls.status.code, grpc.StatusCode) and cls.status.code is not grpc.StatusCode.OK


def test_every_status_is_a_grpc_status():
    assert {status.code.name for status in errors.Status} <= {code.name for code in grpc.StatusCode}

