"""Helpers shared by Realm's Python guests (build with ``-p ../common``)."""

from componentize_py_types import Err
from wit_world.imports.types import Sampling


def describe(error) -> str:
    """A host `error` variant (e.g. ``Error_ModelNotFound(value=...)``) as one line."""
    name = type(error).__name__.removeprefix("Error_")
    value = getattr(error, "value", None)
    return f"{name}: {value}" if value else name


def host(call, *args):
    """Calls a host function, turning its typed error into this guest's error."""
    try:
        return call(*args)
    except Err as e:
        raise Err(describe(e.value))


def greedy(max_tokens: int, stop: list[str] | None = None) -> Sampling:
    """Greedy decoding (reproducible) of at most ``max_tokens``, ending at ``stop``."""
    return Sampling(
        max_tokens=max_tokens,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=None,
        stop=stop or [],
        constraint=None,
    )


def max_tokens(request: dict, default: int) -> int:
    """The request's ``max_tokens`` (1..=512), or ``default``."""
    value = request.get("max_tokens", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 512:
        raise Err("`max_tokens` must be an integer from 1 to 512")
    return value
