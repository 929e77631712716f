"""An OpenAI-compatible chat-completions endpoint used as a zero-shot image classifier.

``POST {base_url}{path}`` (default ``/v1/chat/completions``; OpenAI, Azure OpenAI ``/openai/v1``,
vLLM, SGLang, OpenRouter, ...) with ``Authorization: Bearer <key>`` (Azure: ``api-key``). One image
per call, as a ``data:image/jpeg;base64,...`` URL in the user message (``detail: "low"``: a 512 px
rendition at a small fixed token cost). The answer is constrained to the task's labels:

* ``structured=True`` (default): ``response_format`` = a strict JSON schema whose ``label`` is an
  ``enum`` of the task classes *including* ``other``, so decoding cannot leave the label set;
* ``guided_choice=True``: vLLM's ``guided_choice`` extension instead;
* always: the system prompt lists the labels, ``temperature: 0``, a fixed ``seed``, few tokens.

The reply (JSON ``{"label": ...}`` or bare text) is mapped through the label map; a refusal, an empty
or unparseable reply, a content-filter stop or a label outside the set is ``other`` (counted in
:meth:`LabelMap.unmapped_counts`), never an error. The model name the server reports is pinned.

Errors: 429 with ``error.code``/``type`` ``insufficient_quota`` is quota exhaustion (billing; not
retried); any other 429 is throttling: ``Retry-After``, else ``x-ratelimit-reset-requests``
(``"1s"``, ``"6m0s"``, ``"20ms"``), else exponential backoff. Price is per token: pass
``price_per_1k`` (per 1,000 images) for budgets; the default rate limit is 8 requests/s (a
500-RPM tier; set yours).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from blackbox_rs.errors import ConfigError, InvalidResponseError

from ._encoding import b64encode
from ._vendor import Item, VendorConnector, VendorSpec, WireRequest, json_error_text
from .http import ErrorClass

__all__ = ["OpenAIChatConnector", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in an OpenAI rate-limit reset value (``"1s"``, ``"6m0s"``, ``"20ms"``); None if unreadable."""
    if not text:
        return None
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


class OpenAIChatConnector(VendorConnector):
    """A vision chat model as a zero-shot classifier over the label map's classes (module docstring).

    Args:
        model: the model name sent in every request.
        base_url, path: the endpoint (``base_url + path``).
        detail: ``low`` / ``high`` / ``auto`` image detail.
        structured: constrain the reply with a strict JSON schema; guided_choice: vLLM's extension.
        prompt: the system prompt (``{labels}`` is replaced by the comma-separated labels).
        seed, max_tokens: decoding settings (temperature is always 0).
        extra_body: more fields for the request body (provider extensions).
        Other keyword arguments: see :class:`~blackbox_rs.connectors._vendor.VendorConnector`.
    """

    spec = VendorSpec(name="openai_chat", vendor="OpenAI-compatible chat", max_batch=1, max_in_flight=8,
                      rate_limit=8.0, max_image_bytes=20_000_000, env=("OPENAI_API_KEY",))

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com",
        path: str = "/v1/chat/completions",
        detail: str = "low",
        structured: bool = True,
        guided_choice: bool = False,
        prompt: str = "Classify the photo. Answer with exactly one label from: {labels}. "
                      "Answer 'other' if none fits.",
        seed: int = 0,
        max_tokens: int = 20,
        extra_body: Mapping[str, Any] | None = None,
        **common: Any,
    ) -> None:
        # every field of the request body can change the reply: the prompt (hashed: it may be long),
        # max_tokens (a cut reply is `other`) and any provider extension in extra_body
        extra = None if not extra_body else hashlib.sha256(
            json.dumps(extra_body, sort_keys=True, default=str).encode()).hexdigest()[:16]
        super().__init__(base_url, identity={"model": model, "path": path, "detail": detail, "structured": structured,
                                             "guided": guided_choice,
                                             "prompt": hashlib.sha256(prompt.encode()).hexdigest()[:16],
                                             "seed": seed, "max_tokens": int(max_tokens), "extra": extra}, **common)
        labels = list(self.label_map.class_names)
        if self.label_map.other is None:
            raise ConfigError("a chat classifier needs a label map with an 'other' class for non-answers")
        self._path = path
        body: dict[str, Any] = {"model": model, "temperature": 0, "seed": int(seed), "max_tokens": int(max_tokens)}
        if structured:
            schema = {"type": "object", "additionalProperties": False, "required": ["label"],
                      "properties": {"label": {"type": "string", "enum": labels}}}
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "cls", "strict": True, "schema": schema}}
        if guided_choice:
            body["guided_choice"] = labels
        body.update(extra_body or {})
        self._static = body
        self._system = prompt.format(labels=", ".join(labels))
        self._detail = detail

    def _request(self, images: list[bytes]) -> WireRequest:
        url = f"data:{self.encoding.mime};base64,{b64encode(images[0])}"
        messages = [
            {"role": "system", "content": self._system},
            {"role": "user", "content": [
                {"type": "text", "text": "Which label fits best?"},
                {"type": "image_url", "image_url": {"url": url, "detail": self._detail}},
            ]},
        ]
        return WireRequest(self._path, json_body={**self._static, "messages": messages})

    def _parse(self, body: Any, n: int) -> list[Item]:
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise InvalidResponseError("the chat endpoint answered without choices")
        choice = choices[0]
        message = choice.get("message") or {}
        content = message.get("content")
        if choice.get("finish_reason") == "content_filter" or message.get("refusal") or not isinstance(content, str):
            return [[]]  # a non-answer: other
        return [[((_answer(content),), 1.0)]]

    def _model_version(self, body: Any) -> str | None:
        return body.get("model") if isinstance(body, dict) else None

    def _classify(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorClass | None:
        obj, _ = json_error_text(body)
        err = obj.get("error") if isinstance(obj.get("error"), dict) else {}
        if "insufficient_quota" in (err.get("code"), err.get("type")):
            return ErrorClass("quota", reason="insufficient_quota (billing)")
        if status == 429 and headers.get("Retry-After") is None:
            wait = parse_duration(headers.get("x-ratelimit-reset-requests"))
            return ErrorClass("throttle", retry_after=wait)
        return None


def _answer(content: str) -> str:
    """The label in a reply: the ``label`` of a JSON object, else the text without quotes/punctuation."""
    text = content.strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        return str(obj.get("label", ""))
    return text.strip(" \t\n\"'`.!").strip() or "(empty reply)"
