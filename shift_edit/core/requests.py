"""The one request format every algorithm takes, and its tokenisation.

Accepted inputs (all become :class:`EditRequest`):

- ROME style: ``{"prompt": "{} plays for", "subject": "Lionel Messi",
  "target_new": {"str": "Paris"}, "target_true": {"str": "Barcelona"}}``
- a whole CounterFact record (its ``requested_rewrite`` is used, ``case_id`` kept),
- EasyEdit's flat style: ``{"prompt": "Lionel Messi plays for", "subject": "Lionel Messi",
  "target_new": "Paris", "ground_truth": "Barcelona"}``.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ShiftEditError


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after ``text`` the model should say ``target_new``.

    Attributes:
        prompt: the prompt, possibly a template with ``{}`` for the subject.
        target_new: the new object, with the leading space the tokenizer needs.
        subject: the subject (required when ``prompt`` has ``{}``).
        target_true: the object the model knew before (optional).
        case_id: an identifier carried through to results (optional).
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    case_id: int | str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject) if "{}" in self.prompt else self.prompt

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "target_true": self.target_true,
        }


def with_leading_space(prompt_text: str, target: str) -> str:
    """Normalise a target: strip surrounding whitespace, then put exactly one space in front
    (none after an empty prompt or a prompt ending in whitespace). ``'Paris'``, ``' Paris'``
    and ``'  Paris '`` all become ``' Paris'``, so a stray extra space never edits towards
    the token ``' '``."""
    target = target.strip()
    if prompt_text[-1:].isspace() or not prompt_text:
        return target
    return " " + target


def _object_str(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "str" not in value:
            raise ShiftEditError(f"request field {field!r} is a mapping without 'str': {value!r}")
        value = value["str"]
    if not isinstance(value, str):
        raise ShiftEditError(f"request field {field!r} must be a string, got {value!r}")
    return value


def check_template(prompt: str) -> None:
    """A prompt with ``{}`` must be a template with exactly one ``{}`` and nothing else to fill
    (literal braces are written ``{{`` and ``}}``); a prompt without ``{}`` is taken literally.

    Raises:
        ShiftEditError: two ``{}``, a named or numbered placeholder, or unbalanced braces.
    """
    if "{}" not in prompt:
        return
    try:
        fields = [(name, spec, conv) for _lit, name, spec, conv in string.Formatter().parse(prompt) if name is not None]
    except ValueError as exc:
        raise ShiftEditError(
            f"prompt {prompt!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
        ) from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        shown = ", ".join("{" + n + (f"!{c}" if c else "") + (f":{sp}" if sp else "") + "}" for n, sp, c in fields)
        raise ShiftEditError(
            f"prompt {prompt!r} must have exactly one '{{}}' for the subject and no other placeholder; "
            f"it has {len(fields)}: {shown} (write literal braces as {{{{ and }}}})"
        )


def make_request(obj: Mapping[str, Any] | EditRequest) -> EditRequest:
    """Normalise one request in any accepted format; errors name what is wrong."""
    if isinstance(obj, EditRequest):
        req = obj
    else:
        if not isinstance(obj, Mapping):
            raise ShiftEditError(f"a request must be a mapping, got {type(obj).__name__}")
        case_id = obj.get("case_id")
        if "requested_rewrite" in obj:
            obj = obj["requested_rewrite"]
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ShiftEditError(f"request has no prompt (got {prompt!r})")
        target_new = _object_str(obj.get("target_new"), "target_new")
        if target_new is None:
            raise ShiftEditError(f"request for prompt {prompt!r} has no target_new")
        target_true = _object_str(obj.get("target_true", obj.get("ground_truth")), "target_true")
        subject = obj.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise ShiftEditError(f"request subject must be a string, got {subject!r}")
        req = EditRequest(prompt, target_new, subject, target_true, case_id)
    check_template(req.prompt)
    if "{}" in req.prompt and not req.subject:
        raise ShiftEditError(f"prompt {req.prompt!r} has '{{}}' but no subject was given")
    if req.subject and "{}" not in req.prompt and req.subject not in req.prompt:
        raise ShiftEditError(f"subject {req.subject!r} does not occur in prompt {req.prompt!r}")
    if not req.target_new.strip():
        raise ShiftEditError(f"target_new for prompt {req.prompt!r} is empty")
    text = req.text
    fixed = {"target_new": with_leading_space(text, req.target_new)}
    if req.target_true is not None:
        fixed["target_true"] = with_leading_space(text, req.target_true)
    return EditRequest(**{**req.to_dict(), **fixed})


def make_requests(objs: Iterable[Mapping[str, Any] | EditRequest] | Mapping[str, Any]) -> list[EditRequest]:
    """Normalise one request or a list of them."""
    if isinstance(objs, (Mapping, EditRequest)):
        objs = [objs]
    out = [make_request(o) for o in objs]
    if not out:
        raise ShiftEditError("no requests given")
    return out


def encode_prompt(tok, text: str) -> list[int]:
    """Token ids of a prompt, with the special tokens the tokenizer adds by default."""
    return list(tok(text).input_ids)


def encode_target(tok, prompt_text: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt_text``.

    The continuation is read off the tokenisation of the whole string when the prompt's
    tokens are a prefix of it (so SentencePiece and BPE agree with what the model sees);
    otherwise the target is tokenised alone.

    Raises:
        ShiftEditError: the target tokenises to nothing or to the unknown token.
    """
    prompt_ids = encode_prompt(tok, prompt_text)
    full = encode_prompt(tok, prompt_text + target)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids = full[len(prompt_ids) :]
    else:
        ids = list(tok(target, add_special_tokens=False).input_ids)
    if not ids:
        raise ShiftEditError(f"target {target!r} tokenises to no tokens")
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None and unk in ids and getattr(tok, "unk_token", None) not in target:
        raise ShiftEditError(f"target {target!r} cannot be tokenised (it maps to the unknown token)")
    return ids
