"""CEL as the API server evaluates it, for the tests: the C++ CEL runtime (cel-expr-python,
RE2 for `matches`), with `object` and `request` bound as the admission request has them."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cel_expr_python import cel

_ENV = cel.NewEnv(variables={"object": cel.Type.DYN, "request": cel.Type.DYN})


@lru_cache(maxsize=4096)
def _compiled(expression: str) -> Any:
    return _ENV.compile(expression)


def evaluate(expression: str, pod: dict[str, Any], namespace: str) -> bool:
    """The boolean value of `expression` for the creation of `pod` in `namespace`; raises
    AssertionError when it is not a boolean (an evaluation error, as the API server has)."""
    value = _compiled(expression).eval(
        data={"object": pod, "request": {"namespace": namespace, "operation": "CREATE"}}
    )
    result = value.value()
    assert isinstance(result, bool), f"{expression!r} gave {result!r}"
    return result


def literal(expression: str) -> Any:
    """The value of a constant expression (a string literal, say)."""
    return _compiled(expression).eval(data={"object": {}, "request": {}}).value()
