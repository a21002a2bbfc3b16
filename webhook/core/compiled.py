"""The policy compiled into the API server, so that an outage of the webhook can neither block
the pods the policy leaves alone nor let a required sidecar be skipped silently.

- `match_conditions`: CEL for the webhook configuration. The API server calls the webhook only
  when every condition holds: the namespace is not excluded, no `exclude` rule excludes the pod
  (one that selects by pod labels does not where a `require` rule matches: see
  `webhook.core.selection`), and the pod carries an `outrigger.dev/` annotation (the status
  one too: reinvocation, re-injection) or a rule that `inject`s or `require`s a sidecar
  matches it. Any other pod the webhook would return unchanged, without a warning; the API
  server now admits it without a call.
- `validations`: CEL for a ValidatingAdmissionPolicy evaluated after every mutating webhook
  (under the same two exclusions): a pod that a `require` rule covers has the sidecar, and a
  sidecar the status says was injected still has `restartPolicy: Always` (if it is an init
  container) and an image of `images.allowed`. Not checkable in CEL: that a sidecar's command,
  arguments, mounts and configuration are what its template renders (rendering needs the
  engine; `outrigger audit` finds such pods afterwards).

Each condition carries, beside its CEL, the engine's own predicate (`holds`): the property
tests evaluate both on generated policies and pods, and `outrigger inject --explain` uses the
predicate to say which condition decides. A policy whose CEL would exceed the API server's
limits compiles to None for that part: the caller then calls the webhook for every pod, or
installs no guard, and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from webhook.core import annotations as ann
from webhook.core import cel
from webhook.core.cel import Cel
from webhook.core.policy import ALWAYS_EXCLUDED, LabelSelector, Policy, Rule

# kube-apiserver v1.36 refuses a CEL expression longer than 100,000 code points ("expression
# code point size exceeds limit") and a webhook with more than 64 matchConditions.
MAX_EXPRESSION_CODE_POINTS = 100_000
MAX_MATCH_CONDITIONS = 64
# Kept well inside the API server's request size (3 MiB) and etcd's (1.5 MiB) for one object.
MAX_GUARD_BYTES = 1_000_000

_LABELS = "object.metadata.labels"
_ANNOTATIONS = "object.metadata.annotations"
_INIT = "object.spec.initContainers"
_CONTAINERS = "object.spec.containers"
_STATUS = ann.STATUS


@dataclass(frozen=True, slots=True)
class Subject:
    """What a condition reads of a pod's creation."""

    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Condition:
    """A matchCondition: its name, its CEL, the engine's predicate for the same, and what it
    means when it is false (for `--explain`)."""

    name: str
    expression: str
    holds: Callable[[Subject], bool]
    when_false: str


@dataclass(frozen=True, slots=True)
class Validation:
    expression: str
    message: str


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    version: str
    # None: too large to compile: the webhook is called for every pod of its namespaces.
    match_conditions: tuple[Condition, ...] | None
    # The guard's own matchConditions (the exclusions) and validations; None: no guard.
    guard_conditions: tuple[Condition, ...]
    validations: tuple[Validation, ...] | None
    problems: tuple[str, ...] = ()

    def decides(self, subject: Subject) -> tuple[bool, str]:
        """Whether the API server calls the webhook for `subject`, and why."""
        if self.match_conditions is None:
            return True, "no matchConditions (the policy is too large to compile): every pod"
        for condition in self.match_conditions:
            if not condition.holds(subject):
                return False, f"{condition.name} is false: {condition.when_false}"
        names = ", ".join(condition.name for condition in self.match_conditions)
        return True, f"{names} hold"


def compile_policy(policy: Policy, own_namespace: str | None) -> CompiledPolicy:
    """`policy` compiled for a webhook installed in `own_namespace` (never sent its pods)."""
    exclusions = _exclusions(policy, own_namespace)
    conditions = (*exclusions, _applies(policy))
    problems = [problem for c in conditions for problem in _too_long(c.name, c.expression)]
    if len(conditions) > MAX_MATCH_CONDITIONS:
        problems.append(f"{len(conditions)} matchConditions, over {MAX_MATCH_CONDITIONS}")
    validations = _validations(policy)
    guard_problems = [p for v in validations for p in _too_long("a validation", v.expression)]
    size = sum(len(v.expression) + len(v.message) for v in validations)
    if size > MAX_GUARD_BYTES:
        guard_problems.append(f"the guard's expressions take {size} bytes, over {MAX_GUARD_BYTES}")
    return CompiledPolicy(
        policy.version,
        None if problems else conditions,
        exclusions,
        None if guard_problems else validations,
        (*problems, *guard_problems),
    )


def _too_long(what: str, expression: str) -> list[str]:
    if len(expression) <= MAX_EXPRESSION_CODE_POINTS:
        return []
    return [f"{what} is {len(expression)} code points long, over {MAX_EXPRESSION_CODE_POINTS}"]


# The webhook's matchConditions --------------------------------------------------------------


def _exclusions(policy: Policy, own_namespace: str | None) -> tuple[Condition, ...]:
    """The namespaces and `exclude` rules under which the webhook changes nothing at all."""
    listed = policy.excludedNamespaces
    exact = {*ALWAYS_EXCLUDED, *([own_namespace] if own_namespace else [])}
    exact |= {name for name in listed if not cel.is_glob(name)}
    globs = [name for name in listed if cel.is_glob(name)]
    excluded = cel.any_of([_namespace_in(sorted(exact)), *map(_namespace_glob, globs)])

    def namespace_kept(subject: Subject) -> bool:
        return not policy.excluded_namespace(subject.namespace, own_namespace or "")

    conditions = [
        Condition(
            "outrigger.dev/namespace-not-excluded",
            cel.negate(excluded).text,
            namespace_kept,
            "the namespace is excluded (kube-system, kube-public, the webhook's own, or "
            "excludedNamespaces)",
        )
    ]
    excluding = [rule for rule in policy.rules if rule.exclude]
    if excluding:
        # An exclusion by pod labels, which the pod's creator writes, lifts no `require`.
        by_namespace = [rule for rule in excluding if not rule.selects_by_labels]
        by_labels = [rule for rule in excluding if rule.selects_by_labels]
        requiring = [rule for rule in policy.rules if rule.require and not rule.exclude]

        def not_excluded(subject: Subject) -> bool:
            def any_matches(rules: list[Rule]) -> bool:
                return any(rule.matches(subject.namespace, subject.labels) for rule in rules)

            if any_matches(by_namespace):
                return False
            return not any_matches(by_labels) or any_matches(requiring)

        expression = cel.all_of(
            [
                cel.negate(cel.any_of(map(_rule_matches, by_namespace))),
                cel.any_of(
                    [
                        cel.negate(cel.any_of(map(_rule_matches, by_labels))),
                        *map(_rule_matches, requiring),
                    ]
                ),
            ]
        )
        conditions.append(
            Condition(
                "outrigger.dev/not-excluded-by-rule",
                expression.text,
                not_excluded,
                "a rule with exclude: true matches the pod (by namespace, or by pod labels "
                "where no rule requires a sidecar of it)",
            )
        )
    return tuple(conditions)


def _applies(policy: Policy) -> Condition:
    """The pod asks for something, or a rule gives it something without asking."""
    giving = [rule for rule in policy.rules if (rule.inject or rule.require) and not rule.exclude]
    annotated = cel.atom(
        f"has({_ANNOTATIONS}) && {_ANNOTATIONS}.exists(k, k.startsWith({cel.quote(ann.PREFIX)}))"
    )

    def applies(subject: Subject) -> bool:
        if ann.ours(subject.annotations):
            return True
        return any(rule.matches(subject.namespace, subject.labels) for rule in giving)

    return Condition(
        "outrigger.dev/policy-applies",
        cel.any_of([annotated, *map(_rule_matches, giving)]).text,
        applies,
        f"no {ann.PREFIX} annotation, and no rule that injects or requires a sidecar matches",
    )


def _rule_matches(rule: Rule) -> Cel:
    namespaces = (
        cel.any_of(
            [
                _namespace_in([n for n in rule.namespaces if not cel.is_glob(n)]),
                *(_namespace_glob(n) for n in rule.namespaces if cel.is_glob(n)),
            ]
        )
        if rule.namespaces
        else cel.TRUE
    )
    selector = _selector(rule.podSelector) if rule.podSelector is not None else cel.TRUE
    return cel.all_of([namespaces, selector])


def _namespace_in(names: Sequence[str]) -> Cel:
    if not names:
        return cel.FALSE
    if len(names) == 1:
        return cel.atom(f"request.namespace == {cel.quote(names[0])}")
    return cel.atom(f"request.namespace in {cel.quote_list(names)}")


def _namespace_glob(pattern: str) -> Cel:
    if not cel.is_glob(pattern):
        return _namespace_in([pattern])
    regex = cel.glob_regex(pattern)
    return (
        cel.FALSE if regex is None else cel.atom(f"request.namespace.matches({cel.quote(regex)})")
    )


def _selector(selector: LabelSelector) -> Cel:
    """`LabelSelector.matches`, in CEL: every part must hold."""
    parts = [_label_is(key, [value]) for key, value in selector.matchLabels.items()]
    for requirement in selector.matchExpressions:
        key, values = requirement.key, list(requirement.values)
        match requirement.operator:
            case "In":
                parts.append(_label_is(key, values))
            case "NotIn":
                parts.append(cel.negate(_label_is(key, values)))
            case "Exists":
                parts.append(_label_present(key))
            case _:
                parts.append(cel.negate(_label_present(key)))
    return cel.all_of(parts)


def _label_present(key: str) -> Cel:
    return cel.atom(f"has({_LABELS}) && {cel.quote(key)} in {_LABELS}")


def _label_is(key: str, values: Sequence[str]) -> Cel:
    if not values:
        return cel.FALSE
    label = f"{_LABELS}[{cel.quote(key)}]"
    test = (
        f"{label} == {cel.quote(values[0])}"
        if len(values) == 1
        else (f"{label} in {cel.quote_list(values)}")
    )
    return cel.atom(f"{_label_present(key).text} && {test}")


# The guard's validations --------------------------------------------------------------------


def _validations(policy: Policy) -> tuple[Validation, ...]:
    version = policy.version
    validations = [
        Validation(
            cel.any_of([cel.negate(_rule_matches(rule)), _has_sidecar(name)]).text,
            f"Outrigger: rule {_named(rule.name)} requires the sidecar {name}, which this pod "
            "lacks: the webhook that injects it did not run (down or too slow) or another "
            f"admission webhook removed it; create the pod again once it runs (policy {version})",
        )
        for rule in policy.rules
        if not rule.exclude
        for name in rule.require
    ]
    for template in policy.sidecars:
        name = template.name
        validations.append(
            Validation(
                cel.any_of([cel.negate(_claims(name)), _init_always(name)]).text,
                f"Outrigger: the injected sidecar {name} is an init container without "
                "restartPolicy: Always (another admission webhook changed it after injection); "
                "it would run to completion before the app starts, and block it "
                f"(policy {version})",
            )
        )
        validations.append(
            Validation(
                cel.any_of([cel.negate(_claims(name)), _image_allowed(name, policy)]).text,
                f"Outrigger: the image of the injected sidecar {name} was changed after "
                "injection to one that images.allowed of the policy does not allow "
                f"({', '.join(policy.images.allowed)}) (policy {version})",
            )
        )
    return tuple(validations)


def _named(rule_name: str) -> str:
    """A rule's name for a message (the platform team wrote it; control characters out)."""
    printable = "".join(c if c.isprintable() else "?" for c in rule_name[:63])
    return f'"{printable}"'


def _has_sidecar(name: str) -> Cel:
    """A container `name`, or a native one (an init container that restarts)."""
    quoted = cel.quote(name)
    return cel.any_of(
        [
            cel.atom(f"{_CONTAINERS}.exists(c, c.name == {quoted})"),
            cel.atom(
                f"has({_INIT}) && {_INIT}.exists(c, c.name == {quoted} && "
                "has(c.restartPolicy) && c.restartPolicy == 'Always')"
            ),
        ]
    )


def _claims(name: str) -> Cel:
    """The status annotation names `name` among the injected sidecars."""
    status = f"{_ANNOTATIONS}[{cel.quote(_STATUS)}]"
    return cel.atom(
        f"has({_ANNOTATIONS}) && {cel.quote(_STATUS)} in {_ANNOTATIONS} && "
        f"{status}.contains({cel.quote(chr(34) + name + chr(34))})"
    )


def _init_always(name: str) -> Cel:
    quoted = cel.quote(name)
    return cel.atom(
        f"!has({_INIT}) || {_INIT}.all(c, c.name != {quoted} || "
        "(has(c.restartPolicy) && c.restartPolicy == 'Always'))"
    )


def _image_allowed(name: str, policy: Policy) -> Cel:
    quoted = cel.quote(name)
    prefixes = " || ".join(f"c.image.startsWith({cel.quote(p)})" for p in policy.images.allowed)
    allowed = f"(has(c.image) && ({prefixes or 'false'}))"
    return cel.atom(
        f"{_CONTAINERS}.all(c, c.name != {quoted} || {allowed}) && "
        f"(!has({_INIT}) || {_INIT}.all(c, c.name != {quoted} || {allowed}))"
    )
