"""Prompt templates: an event's fields → (system, user) messages; the model's own format wraps them."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UsageError
from pipeline.events import Event


@dataclass(frozen=True)
class Template:
    """A prompt built from an event's fields: ``system`` and ``user`` are ``str.format`` strings over
    ``text``, ``source``, ``entity`` and ``label`` (missing fields are empty)."""

    name: str
    system: str
    user: str = "{text}"

    def render(self, text: str, source: str | None = None, entity: str | None = None,
               label: str | None = None) -> tuple[str, str]:
        f = {"text": text, "source": source or "", "entity": entity or "", "label": label or ""}
        return self.system.format(**f), self.user.format(**f)

    def for_event(self, ev: Event) -> tuple[str, str]:
        return self.render(ev.text, ev.source, ev.entity, ev.label)


TEMPLATES: dict[str, Template] = {
    "reply": Template("reply", "You are a customer-support agent. Write a short, polite reply to the customer's message."),
    "summary": Template("summary", "Summarize the text in one short sentence."),
    "explain-label": Template("explain-label", "Explain in one sentence why the message has the given label.",
                              "Message: {text}\nLabel: {label}"),
}


def template_from(name: str, system: str | None = None, user: str | None = None) -> Template:
    """A built-in template (``reply``, ``summary``, ``explain-label``), its parts overridden by config."""
    base = TEMPLATES.get(name)
    if base is None and not (system and user):
        raise UsageError(f"unknown prompt template '{name}'",
                         hint=f"use one of {', '.join(TEMPLATES)}, or set both generate.system and generate.user")
    t = Template(name, system if system is not None else base.system, user if user is not None else base.user)
    try:
        t.render("x")
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"prompt template '{name}' does not format: {exc!r}",
                         hint="use only {text}, {source}, {entity} and {label} as fields; write literal braces as {{ }}") from None
    return t
