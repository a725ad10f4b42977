"""Prompt rendering and token padding, shared by pair building, training, evaluation, the guard and transfer.

* :func:`render_prompt`: one prompt as text with the tokenizer's chat template (or a plain ``Question:/Answer:``
  layout for base models without one), optionally with an unfinished assistant reply.
* :func:`assistant_suffix`: the unfinished assistant reply two rendered prompts share.
* :func:`left_pad`: token lists → left-padded ``input_ids``, ``attention_mask``, ``position_ids``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["assistant_suffix", "left_pad", "render_prompt"]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _is_system_role_error(err: Exception) -> bool:
    return "system" in str(err).lower()


def render_prompt(tokenizer: Any, user: str, assistant_prefix: str = "", system: str | None = None) -> str:
    """Render one prompt as text with the tokenizer's chat template.

    With an ``assistant_prefix`` the assistant turn is left open (``continue_final_message=True``) so the model
    continues the prefix; without one a generation prompt is added (``add_generation_prompt=True``). Tokenize the
    result with ``add_special_tokens=False``.

    If the template rejects a system turn (e.g. Gemma 2's raises "System role not supported"), the system text is
    folded into the user turn as ``f"{system}\\n\\n{user}"``.

    Fallback for tokenizers **without** a chat template (base models such as Gemma 3 270M)::

        f"{system}\\n\\n" (only if system)  +  f"Question: {user}\\nAnswer:"  +  (f" {assistant_prefix}" if any)

    i.e. without a prefix the text ends in ``"Answer:"`` with no trailing space, so the next token carries its
    own leading space as in ordinary text.

    Args:
        tokenizer: a Hugging Face tokenizer (duck-typed: ``chat_template`` and ``apply_chat_template``).
        user: the user-turn text.
        assistant_prefix: the incomplete start of the assistant turn; leading/trailing whitespace is stripped
            (templates trim it anyway).
        system: optional system-turn text.

    Returns:
        The prompt text, ending exactly in ``assistant_prefix`` when one is given.

    Raises:
        ValueError: if ``user`` is empty.
    """
    if not user or not user.strip():
        raise ValueError("render_prompt: the user text is empty; pass the question or instruction to render")
    prefix = assistant_prefix.strip()
    if not _has_chat_template(tokenizer):
        head = f"{system}\n\n" if system else ""
        return f"{head}Question: {user}\nAnswer:" + (f" {prefix}" if prefix else "")

    def build(sys_text: str | None, user_text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": sys_text}] if sys_text else []
        msgs.append({"role": "user", "content": user_text})
        if prefix:
            msgs.append({"role": "assistant", "content": prefix})
        return msgs

    kwargs: dict[str, Any] = {"tokenize": False}
    if prefix:
        kwargs["continue_final_message"] = True
    else:
        kwargs["add_generation_prompt"] = True
    try:
        text = tokenizer.apply_chat_template(build(system, user), **kwargs)
    except Exception as err:  # jinja2 TemplateError from templates that reject a system turn
        if not system or not _is_system_role_error(err):
            raise
        text = tokenizer.apply_chat_template(build(None, f"{system}\n\n{user}"), **kwargs)
    if not isinstance(text, str):
        raise TypeError(
            f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str; "
            "is this a Hugging Face tokenizer?"
        )
    return text


_SENTINEL = "zqxjzqxj"


def assistant_suffix(tokenizer: Any, positive: str, negative: str) -> str:
    """The unfinished assistant reply two rendered prompts share: the text after the last assistant header
    (what :func:`render_prompt` writes between the user text and the reply, found by rendering a probe), when both
    prompts have it and the text after it is the same and not empty; else ``""``."""
    probe = render_prompt(tokenizer, _SENTINEL)
    header = probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
    if not header.strip():
        return ""
    tails = [t[t.rindex(header) + len(header) :] if header in t else None for t in (positive, negative)]
    if tails[0] is None or tails[0] != tails[1] or not tails[0].strip():
        return ""
    return tails[0]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists → input_ids, attention_mask, position_ids, each (B, T).

    Position ids count real tokens only, so a padded row sees the same positions as it would unpadded.
    """
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, t - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos
