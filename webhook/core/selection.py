"""Which sidecars a pod gets, and why: decided before anything is built.

Precedence, from the strongest:
1. The namespace is excluded (kube-system, kube-public, the webhook's own namespace
   (`$POD_NAMESPACE`, handed on by the command line), the policy's excludedNamespaces) or a
   matching rule that selects by namespace alone says `exclude: true`: nothing is injected,
   whatever the pod or other rules say.
2. Sidecars that a matching rule `require`s are always injected; the pod cannot opt out, and
   an `exclude` rule that selects by pod labels does not exempt it either: the pod's creator
   writes its labels, and nothing a pod's creator writes may skip a required sidecar.
3. A matching `exclude` rule that selects by pod labels: nothing else is injected.
4. The pod's `outrigger.dev/inject`: a list of names is injected as asked; "false" (or empty)
   opts out of everything not required; absent or "true" takes the matching rules' `inject`
   defaults.
The injected sidecars are placed in the order the policy lists them. The first matching rule
with a `logOutput` gives the log-watcher's output, unless the pod's annotation picks one. A
pod that carries `outrigger.dev/status` is decided like any other: `webhook.core.injector`
compares what it holds with what this decision renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from webhook.core import annotations as ann
from webhook.core.policy import Policy, Rule

# Why a pod came out as it did: log fields, `--explain` output, metric labels.
INJECTED: Final = "injected"
ALREADY_INJECTED: Final = "already-injected"
NOT_REQUESTED: Final = "not-requested"
OPTED_OUT: Final = "opted-out"
NAMESPACE_EXCLUDED: Final = "namespace-excluded"
RULE_EXCLUDED: Final = "rule-excluded"
_NOT_EXEMPT: Final = (
    "rule {rule!r} excludes the pod by its labels, which exempt it from no rule's require "
    "(the pod's creator writes them): only the required sidecars are injected"
)


@dataclass(frozen=True, slots=True)
class Decision:
    sidecars: tuple[str, ...]
    reason: str
    explanation: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    # Those that only a rule's default asks for: skipped where they cannot run (webhook.core.fit).
    defaults_only: tuple[str, ...] = ()
    # The log output the first matching rule with one picks (the pod's annotation goes first).
    log_output: str | None = None


def decide(
    namespace: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    policy: Policy,
    own_namespace: str = "",
) -> Decision:
    """Raises `InvalidAnnotations` for an `outrigger.dev/inject` naming unknown sidecars.
    `own_namespace`: the webhook's, never injected into ("": none)."""
    if policy.excluded_namespace(namespace, own_namespace):
        return Decision((), NAMESPACE_EXCLUDED, (f"namespace {namespace!r} is excluded",))
    matching = policy.matching_rules(namespace, labels)
    by_namespace = [r.name for r in matching if r.exclude and not r.selects_by_labels]
    if by_namespace:
        return Decision((), RULE_EXCLUDED, (f"excluded by rule {by_namespace[0]!r}",))
    by_labels = [rule.name for rule in matching if rule.exclude]
    rules = [rule for rule in matching if not rule.exclude]
    why: dict[str, str] = {}
    for rule in rules:
        for name in rule.require:
            why.setdefault(name, f"required by rule {rule.name!r}")
    if by_labels and not why:
        return Decision((), RULE_EXCLUDED, (f"excluded by rule {by_labels[0]!r}",))
    choice = ann.parse_inject(annotations.get(ann.INJECT), policy.templates)
    defaults: set[str] = set()
    refused: tuple[str, ...] = ()
    if by_labels:  # what is required, and nothing else
        refused = tuple(name for name in choice.names if name not in why)
    else:
        if choice.defaults:
            for rule in rules:
                for name in rule.inject:
                    if name not in why:
                        why[name] = f"default of rule {rule.name!r}"
                        defaults.add(name)
        for name in choice.names:
            why.setdefault(name, f"asked for by {ann.INJECT}")
    sidecars = tuple(sorted(why, key=policy.order.__getitem__))
    explanation = tuple(f"{name}: {why[name]}" for name in sidecars)
    warnings = _opt_out_warnings(choice, sidecars)
    if by_labels:
        explanation += (_NOT_EXEMPT.format(rule=by_labels[0]),)
    if refused:
        warnings += (
            f"{ann.INJECT} asks for {', '.join(refused)}, which rule {by_labels[0]!r} "
            "excludes from this pod (by its labels): only the sidecars a rule requires are "
            "injected",
        )
    if sidecars:
        defaults_only = tuple(name for name in sidecars if name in defaults)
        chooser = _output_rule(rules, sidecars, policy)
        if chooser is None:
            return Decision(sidecars, INJECTED, explanation, warnings, defaults_only)
        explanation += (
            f"log output {chooser.logOutput}: rule {chooser.name!r}, unless the pod picks one",
        )
        return Decision(sidecars, INJECTED, explanation, warnings, defaults_only, chooser.logOutput)
    if choice.opt_out:
        return Decision((), OPTED_OUT, (f'{ann.INJECT} is "false"',))
    return Decision((), NOT_REQUESTED, ("no annotation or rule asks for a sidecar",))


def _output_rule(rules: list[Rule], sidecars: tuple[str, ...], policy: Policy) -> Rule | None:
    """The first matching rule that picks a log output, where a log-watcher is injected."""
    if not any(policy.templates[name].logWatcher is not None for name in sidecars):
        return None
    return next((rule for rule in rules if rule.logOutput is not None), None)


def _opt_out_warnings(choice: ann.InjectChoice, sidecars: tuple[str, ...]) -> tuple[str, ...]:
    if choice.opt_out and sidecars:
        return (f'{ann.INJECT} is "false" but the cluster policy requires {", ".join(sidecars)}',)
    return ()
