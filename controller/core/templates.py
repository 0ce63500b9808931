"""The ``{{ field }}`` syntax of alert templates: which fields exist, what is wrong with a template.

A module of its own, importing nothing of the project, so that the policy model can check a
template when it loads (``template_problems``) without importing ``controller.core.alerts``
(which imports the schedule, which imports the policy: a cycle).

No Jinja, on purpose: on-call engineers edit templates in a ConfigMap, and a template language
that can call methods or loop is code run by the controller with its secrets in reach. A fixed
list of fields substituted once can only print.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["MISSING", "TEMPLATE_FIELDS", "fill_template", "template_problems"]

#: The fields a template may use besides ``labels.<name>`` (one per label the policy declares).
TEMPLATE_FIELDS: tuple[str, ...] = (
    "policy",
    "kind",
    "severity",
    "summary",
    "reason",
    "weights_before",
    "weights_after",
    "target_weight",
    "source_weight",
    "gate",
    "value",
    "threshold",
    "baseline",
    "promql",
    "runbook_url",
    "alert_id",
    "at",
    "source_service",
    "target_service",
)

#: What a field without a value (no failing gate, no weights, no runbook) renders as.
MISSING = "n/a"

#: Anything between ``{{`` and ``}}`` on one line: each must name a field, or the template is refused.
_PLACEHOLDER = re.compile(r"\{\{([^{}\n]*)\}\}")
_LABEL_FIELD = re.compile(r"^labels\.([A-Za-z_][A-Za-z0-9_]*)$")


def template_problems(template: str, label_names: Iterable[str]) -> list[str]:
    """What is wrong with a template, each with what is allowed; empty when it can be rendered.

    Called when the policy loads, so a misspelt placeholder is refused then, with the list of
    fields, instead of reaching on-call as a literal ``{{ valeu }}``.
    """
    labels = set(label_names)
    problems: list[str] = []
    for match in _PLACEHOLDER.finditer(template):
        name = match.group(1).strip()
        label = _LABEL_FIELD.match(name)
        if name in TEMPLATE_FIELDS or (label is not None and label.group(1) in labels):
            continue
        if label is not None:
            declared = ", ".join(sorted(labels)) or "none"
            problems.append(f"{{{{ {name} }}}}: the policy declares no label {label.group(1)} (declared: {declared})")
        else:
            problems.append(f"unknown placeholder {{{{ {name[:60]} }}}}; allowed: {_allowed(labels)}")
    rest = _PLACEHOLDER.sub("", template)
    if "{{" in rest or "}}" in rest:
        problems.append("a '{{' or '}}' that is not part of a placeholder (write {{ field }} on one line)")
    return problems


def _allowed(labels: set[str]) -> str:
    names = [*TEMPLATE_FIELDS, *(f"labels.{label}" for label in sorted(labels))]
    return ", ".join("{{ " + name + " }}" for name in names)


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """Each ``{{ field }}`` replaced by ``values[field]`` (``MISSING`` when absent), in ONE pass.

    One pass: a value that itself contains ``{{ ... }}`` (a reason quoting a template) is printed,
    never expanded.
    """
    return _PLACEHOLDER.sub(lambda match: values.get(match.group(1).strip(), MISSING), template)
