"""Kubernetes names and labels for a pathway: module names become DNS-1035 labels (Service names)."""

from __future__ import annotations

import hashlib
import re

APP = "pathways"
# Label keys shared by every object; selectors use APP_LABEL + COMPONENT_LABEL (+ MODULE_LABEL).
APP_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODULE_LABEL = "pathways.dev/module"
MODULE_NAME_ANNOTATION = "pathways.dev/module-name"  # the spec's own spelling, before sanitising

GATEWAY = "pathways-gateway"
COORDINATOR = "pathways-coordinator"
BROKER = "pathways-broker"
HTTP_FRONT = "pathways-http-front"
DISCOVERY_ACCOUNT = "pathways-discovery"
RESERVED = frozenset(
    {
        GATEWAY,
        COORDINATOR,
        BROKER,
        HTTP_FRONT,
        DISCOVERY_ACCOUNT,
        "pathways-spec",
        "pathways-modules",
    }
)

_MAX = 63  # Service names are DNS-1035 labels


def dns_name(module: str) -> str:
    """The Deployment/Service name for a module: a DNS-1035 label (`attn_0` -> `attn-0`).

    Lower-cases, turns runs of other characters into '-', prefixes 'm-' when the name does not start
    with a letter, and shortens names over 63 characters with a hash of the original.
    """
    name = re.sub(r"[^a-z0-9]+", "-", module.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    if len(name) > _MAX:
        digest = hashlib.sha256(module.encode()).hexdigest()[:8]
        name = f"{name[:_MAX - 9].rstrip('-')}-{digest}"
    return name


def module_names(modules: list[str]) -> dict[str, str]:
    """Maps each module to its DNS name; raises ValueError on clashes with each other or platform names."""
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for m in modules:
        n = dns_name(m)
        if n in RESERVED:
            raise ValueError(
                f"module {m!r}: its Kubernetes name {n!r} is reserved for Pathways' own "
                f"objects; rename the module"
            )
        if n in owner:
            raise ValueError(
                f"modules {owner[n]!r} and {m!r} both become Kubernetes name {n!r}; "
                f"rename one of them"
            )
        owner[n] = m
        names[m] = n
    return names


def labels(component: str, module: str | None = None) -> dict[str, str]:
    """Labels for an object of `component` (module|gateway|coordinator|broker)."""
    out = {APP_LABEL: APP, COMPONENT_LABEL: component}
    if module is not None:
        out[MODULE_LABEL] = dns_name(module)
    return out
