"""The request fields CAB adds to vLLM's OpenAI protocol: top-level ``sparsity`` and ``attention_policy``.

vLLM's ChatCompletionRequest / CompletionRequest carry engine extras in ``vllm_xargs`` (-> SamplingParams.
extra_args), which the CAB backend reads as ``cab_sparsity`` / ``cab_policy``. ``apply_cab_fields`` validates
the two top-level fields (pydantic), removes them from the body and merges them into ``vllm_xargs``; vLLM then
parses the body with its own models. Imports neither vLLM nor FastAPI.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cab_vllm.config import POLICIES

FIELDS = {"sparsity": "cab_sparsity", "attention_policy": "cab_policy"}  # request field -> vllm_xargs key
PolicyName = Literal[POLICIES]  # type: ignore[valid-type]


class CABFieldError(ValueError):
    """A bad value of one CAB request field; ``param`` names the field (OpenAI error schema)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class CABFields(BaseModel):
    """sparsity: fraction of causal key blocks each query block drops, in [0, 1) (a JSON number);
    attention_policy: one of cab_vllm.config.POLICIES. Either may be absent or null (engine default)."""

    model_config = ConfigDict(extra="ignore")

    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, strict=True)
    attention_policy: PolicyName | None = None  # type: ignore[valid-type]


def _message(field: str, value: object) -> str:
    if field == "sparsity":
        return f"sparsity={value!r} is invalid: expected a number in [0, 1) (0 = dense, 0.9 = drop 90% of key blocks)"
    return f"attention_policy={value!r} is invalid: expected one of {', '.join(POLICIES)}"


def parse_cab_fields(body: dict[str, Any]) -> CABFields:
    """Validate the CAB fields of a request body; raise CABFieldError naming the first bad field."""
    try:
        return CABFields.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err.get("loc") else "sparsity"
        raise CABFieldError(_message(field, body.get(field)), field) from None


def _same(field: str, a: object, b: object) -> bool:
    if field == "sparsity":
        try:
            return float(a) == float(b)  # vllm_xargs values may be numeric strings
        except (TypeError, ValueError):
            return False
    return a == b


def apply_cab_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` with ``sparsity`` / ``attention_policy`` moved into ``vllm_xargs`` as cab_sparsity /
    cab_policy. Unchanged when neither field is present. Raises CABFieldError for a bad value, or when the
    body already has a different value for the same knob in vllm_xargs (the same value twice is accepted)."""
    if not any(f in body for f in FIELDS):
        return body
    fields = parse_cab_fields(body)
    out = {k: v for k, v in body.items() if k not in FIELDS}
    xargs = out.get("vllm_xargs")
    if xargs is not None and not isinstance(xargs, dict):
        raise CABFieldError("vllm_xargs must be an object when sparsity or attention_policy is given", "vllm_xargs")
    xargs = dict(xargs or {})
    for field, key in FIELDS.items():
        value = getattr(fields, field)
        if value is None:
            continue
        if key in xargs and xargs[key] is not None and not _same(field, xargs[key], value):
            raise CABFieldError(f"{field}={value!r} conflicts with vllm_xargs.{key}={xargs[key]!r}: give one", field)
        xargs[key] = value
    if xargs:
        out["vllm_xargs"] = xargs
    return out
