"""Test helper: the tunix-rt backend's validation of one ReasoningTrace, copied by hand.

`trace_errors` gives the errors the backend's pydantic model would raise for a trace, FastAPI-style,
so the stub backend (backend_stub.py) can answer 422 as the real one does, and `validate_trace`
says in one line each why the backend would reject a trace the job wrote. The limits are the job's
own (job/outputs.py), so they are defined once.
"""

from __future__ import annotations

from job.formats import MAX_STEP_CONTENT, MAX_STEP_TYPE, MAX_STEPS, MAX_TEXT, MAX_TRACE_VERSION


def _string_errors(value: object, loc: tuple, max_length: int) -> list[dict]:
    if not isinstance(value, str):
        return [{"type": "string_type", "loc": loc, "msg": "Input should be a valid string", "input": value}]
    if len(value) < 1:
        return [{"type": "string_too_short", "loc": loc, "msg": "String should have at least 1 character",
                 "input": value, "ctx": {"min_length": 1}}]
    if len(value) > max_length:
        return [{"type": "string_too_long", "loc": loc, "msg": f"String should have at most {max_length} characters",
                 "input": value, "ctx": {"max_length": max_length}}]
    return []


def _missing(loc: tuple, value: object) -> dict:
    return {"type": "missing", "loc": loc, "msg": "Field required", "input": value}


def _not_object(loc: tuple, value: object) -> dict:
    return {"type": "model_attributes_type", "loc": loc,
            "msg": "Input should be a valid dictionary or object to extract fields from", "input": value}


def _step_errors(step: object, loc: tuple) -> list[dict]:
    if not isinstance(step, dict):
        return [_not_object(loc, step)]
    errors: list[dict] = []
    if "i" not in step:
        errors.append(_missing(loc + ("i",), step))
    elif not isinstance(step["i"], int) or isinstance(step["i"], bool):
        errors.append({"type": "int_type", "loc": loc + ("i",), "msg": "Input should be a valid integer",
                       "input": step["i"]})
    elif step["i"] < 0:
        errors.append({"type": "greater_than_equal", "loc": loc + ("i",),
                       "msg": "Input should be greater than or equal to 0", "input": step["i"], "ctx": {"ge": 0}})
    for field, limit in (("type", MAX_STEP_TYPE), ("content", MAX_STEP_CONTENT)):
        if field not in step:
            errors.append(_missing(loc + (field,), step))
        else:
            errors += _string_errors(step[field], loc + (field,), limit)
    return errors


def trace_errors(trace: object) -> list[dict]:
    """The backend's validation errors for one trace, FastAPI-style ({"type", "loc", "msg", "input"}).

    `loc` is relative to the trace ("steps", 0, "content"); the endpoint prefixes ("body", index).
    """
    if not isinstance(trace, dict):
        return [_not_object((), trace)]
    errors: list[dict] = []
    for field, limit in (("trace_version", MAX_TRACE_VERSION), ("prompt", MAX_TEXT), ("final_answer", MAX_TEXT)):
        if field not in trace:
            errors.append(_missing((field,), trace))
        else:
            errors += _string_errors(trace[field], (field,), limit)

    steps = trace.get("steps")
    if "steps" not in trace:
        errors.append(_missing(("steps",), trace))
    elif not isinstance(steps, list):
        errors.append({"type": "list_type", "loc": ("steps",), "msg": "Input should be a valid list", "input": steps})
    elif not 1 <= len(steps) <= MAX_STEPS:
        kind, bound = ("too_short", "at least 1 item") if not steps else ("too_long", f"at most {MAX_STEPS} items")
        errors.append({"type": kind, "loc": ("steps",), "input": steps,
                       "msg": f"List should have {bound} after validation, not {len(steps)}"})
    else:
        step_errors = [e for j, step in enumerate(steps) for e in _step_errors(step, ("steps", j))]
        errors += step_errors
        if not step_errors:  # the model validator runs only on well-formed steps
            indices = [step["i"] for step in steps]
            if len(set(indices)) != len(indices):
                errors.append({"type": "value_error", "loc": ("steps",),
                               "msg": "Value error, Step indices must be unique", "input": steps})

    meta = trace.get("meta")
    if meta is not None and not isinstance(meta, dict):
        errors.append({"type": "dict_type", "loc": ("meta",), "msg": "Input should be a valid dictionary",
                       "input": meta})
    return errors


def validate_trace(trace: dict) -> list[str]:
    """The problems the backend would reject this trace for ("steps.0.content: ..."); [] when valid."""
    return [".".join(str(part) for part in e["loc"]) + ": " + e["msg"] if e["loc"] else e["msg"]
            for e in trace_errors(trace)]
