"""The policy compiled into CEL (`webhook.core.compiled`), against the engine it stands for.

Generated policies and pods, the CEL evaluated by the C++ CEL runtime (RE2 for `matches`):
- each matchCondition's CEL agrees with its predicate, and a pod for which one is false is
  one the engine returns unchanged, without a warning or a denial ("no call" is safe);
- a pod the webhook injected passes every validation of the guard, and so does a pod it is
  never sent; a pod a `require` rule covers fails exactly the validations of those rules when
  the webhook did not run, and an injected native sidecar without `restartPolicy: Always`
  fails its own;
- globs translate exactly as `fnmatch.fnmatchcase` reads them, literals quote exactly;
- a policy past CEL's limits falls back, saying why.
The same CEL through the real API server: tests/test_kube_compiled.py.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cel_runtime import evaluate, literal
from tests.conftest import FIXTURES
from webhook.core import annotations as ann
from webhook.core import cel
from webhook.core.compiled import (
    MAX_EXPRESSION_CODE_POINTS,
    CompiledPolicy,
    Subject,
    compile_policy,
)
from webhook.core.injector import InjectionDenied, RequestContext, inject
from webhook.core.policy import Policy, Rule, default_policy, load_policy, parse_policy

OWN = "outrigger-system"
BASE = default_policy().model_dump(mode="json")
NAMESPACES = [
    "default", "shop", "prod-eu", "prod-us", "payments", "ops", "batch-1", "test", "tast",
    "kube-system", "kube-public", OWN, "a1", "b", "p-x",
]  # fmt: skip
GLOBS = ["prod-*", "payments", "shop", "[!p]*", "*", "t?st", "batch-[0-9]", "[ab]*", "ops"]
SIDECARS = ["log-watcher", "ambassador"]


@st.composite
def selectors(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    selector: dict[str, Any] = {}
    if draw(st.booleans()):
        selector["matchLabels"] = draw(
            st.sampled_from(
                [{"tier": "frontend"}, {"app": "web"}, {"tier": "frontend", "app": "web"}]
            )
        )
    expressions = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "key": st.sampled_from(["tier", "tier", "app", "example.com/team"]),
                    "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
                    "values": st.lists(
                        st.sampled_from(["frontend", "backend", "web", "a"]), max_size=2
                    ),
                }
            ),
            max_size=2,
        )
    )
    if expressions:
        selector["matchExpressions"] = expressions
    return selector


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": draw(st.sampled_from(["r1", "team logs", "r'\"3"]))}
    namespaces = draw(st.lists(st.sampled_from(GLOBS), max_size=2))
    if namespaces and draw(st.booleans()):
        rule["namespaces"] = namespaces
    selector = draw(selectors())
    if selector is not None:
        rule["podSelector"] = selector
    if draw(st.integers(0, 5)) == 0:
        rule["exclude"] = True
    rule["inject"] = draw(st.lists(st.sampled_from(SIDECARS), max_size=1, unique=True))
    rule["require"] = draw(st.lists(st.just("log-watcher"), max_size=1))
    return rule


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    document = copy.deepcopy(BASE)
    document["rules"] = draw(st.lists(rules(), max_size=4))
    document["excludedNamespaces"] = draw(st.lists(st.sampled_from(GLOBS), max_size=2))
    document["nativeSidecars"] = draw(st.booleans())
    return parse_policy(document)


# Half the pods carry no annotation of Outrigger's: the rules alone decide for them.
ANNOTATIONS = st.sampled_from(
    [None, {}, {"example.com/owner": "team-a"}] * 3
    + [
        {"example.com/owner": "team-a"},
        {ann.INJECT: "log-watcher"},
        {ann.INJECT: "false"},
        {ann.INJECT: "bogus"},
        {"outrigger.dev/log-path": "/var/log/app"},
        {ann.STATUS: '{"injected":["log-watcher"],"policy":"0"}'},
        {"log-watcher.outrigger.dev/fluent-bit.yaml": "x"},
    ]
)
LABELS = st.sampled_from(
    [
        *(None, {}, {"tier": "frontend"}, {"tier": "backend"}, {"app": "web"}),
        *({"tier": "frontend", "app": "web"}, {"tier": "a", "example.com/team": "a"}),
    ]
)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p"}
    annotations, labels = draw(ANNOTATIONS), draw(LABELS)
    if annotations is not None:
        metadata["annotations"] = annotations
    if labels is not None:
        metadata["labels"] = labels
    spec = {"containers": [{"name": "app", "image": "registry.example.com/app:1.0"}]}
    return {"metadata": metadata, "spec": spec}


def subject(pod: dict[str, Any], namespace: str) -> Subject:
    metadata = pod["metadata"]
    return Subject(namespace, metadata.get("labels") or {}, metadata.get("annotations") or {})


def failing(compiled: CompiledPolicy, pod: dict[str, Any], namespace: str) -> list[str]:
    """The messages of the guard's validations `pod` fails (none where the guard skips it)."""
    assert compiled.validations is not None
    if not all(evaluate(c.expression, pod, namespace) for c in compiled.guard_conditions):
        return []
    return [v.message for v in compiled.validations if not evaluate(v.expression, pod, namespace)]


@st.composite
def precedence_policies(draw: st.DrawFn) -> Policy:
    """Policies where an `exclude` rule that selects by pod labels meets a `require` rule
    (and often one that excludes by namespace alone): the precedence in question."""
    document = copy.deepcopy(BASE)
    exclude = {"name": "by-labels", "exclude": True, "podSelector": draw(selectors()) or {}}
    exclude["podSelector"].setdefault("matchLabels", {"tier": "frontend"})
    if draw(st.booleans()):
        exclude["namespaces"] = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))
    require = {"name": "needs-logs", "require": ["log-watcher"], "inject": ["ambassador"]}
    if draw(st.booleans()):
        require["namespaces"] = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))
    others = draw(st.lists(rules(), max_size=2))
    if draw(st.booleans()):
        namespaces = draw(st.lists(st.sampled_from(GLOBS), min_size=1, max_size=2))
        others.append({"name": "by-namespace", "exclude": True, "namespaces": namespaces})
    document["rules"] = draw(st.permutations([exclude, require, *others]))
    document["nativeSidecars"] = draw(st.booleans())
    return parse_policy(document)


def selects_by_labels(rule: Rule) -> bool:
    selector = rule.podSelector
    return selector is not None and bool(selector.matchLabels or selector.matchExpressions)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), pods(), st.sampled_from(NAMESPACES))
def test_the_conditions_agree_with_the_engine(
    policy: Policy, pod: dict[str, Any], namespace: str
) -> None:
    conditions_agree(policy, pod, namespace)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(precedence_policies(), pods(), st.sampled_from(NAMESPACES))
def test_the_conditions_agree_on_exclusions_by_labels_that_meet_a_require(
    policy: Policy, pod: dict[str, Any], namespace: str
) -> None:
    conditions_agree(policy, pod, namespace)


def conditions_agree(policy: Policy, pod: dict[str, Any], namespace: str) -> None:
    compiled = compile_policy(policy, OWN)
    assert compiled.match_conditions is not None and not compiled.problems
    about = subject(pod, namespace)
    values = [evaluate(c.expression, pod, namespace) for c in compiled.match_conditions]
    assert values == [c.holds(about) for c in compiled.match_conditions]
    # Only what excludes by namespace exempts a pod from a require; pod labels do not.
    exempt = policy.excluded_namespace(namespace, OWN) or any(
        r.exclude and not selects_by_labels(r) and r.matches(namespace, about.labels)
        for r in policy.rules
    )
    required = [
        f"rule {name(rule.name)} requires the sidecar {sidecar}"
        for rule in policy.rules
        if not rule.exclude and rule.matches(namespace, about.labels)
        for sidecar in rule.require
    ]
    if required and not exempt:
        assert all(values), "a pod a rule requires a sidecar of is admitted without a call"
    try:
        injection = inject(pod, RequestContext(namespace, OWN), policy)
    except InjectionDenied:
        assert all(values), "a pod the webhook would deny was admitted without a call"
        return
    if required and not exempt:  # the engine injects what is required, whatever the labels
        needed = {
            s
            for r in policy.rules
            if not r.exclude and r.matches(namespace, about.labels)
            for s in r.require
        }
        assert needed <= set(injection.injected), (injection.reason, injection.explanation)
    if not all(values):  # no call: the webhook would have changed nothing, said nothing
        assert injection.pod == pod and not injection.warnings
        assert failing(compiled, pod, namespace) == []
        return
    assert failing(compiled, injection.pod, namespace) == []
    # The webhook down: the pod as sent fails exactly the rules that require a sidecar of it.
    expected = [] if exempt else required
    found = failing(compiled, pod, namespace)
    assert len(found) == len(expected)
    assert all(part in message for part, message in zip(expected, found, strict=True))


def name(rule_name: str) -> str:
    return f'"{rule_name}"'


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.sampled_from(NAMESPACES))
def test_a_native_sidecar_that_lost_its_restart_policy_is_refused(
    policy: Policy, namespace: str
) -> None:
    pod = {
        "metadata": {"name": "p", "annotations": {ann.INJECT: "log-watcher"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example.com/app:1.0"}]},
    }
    compiled = compile_policy(policy, OWN)
    injected = inject(pod, RequestContext(namespace, OWN), policy).pod
    if "log-watcher" not in str(injected["metadata"]["annotations"].get(ann.STATUS)):
        return  # excluded here
    assert failing(compiled, injected, namespace) == []
    broken = copy.deepcopy(injected)
    if policy.nativeSidecars:
        del broken["spec"]["initContainers"][0]["restartPolicy"]
        expected = "the injected sidecar log-watcher is an init container without restartPolicy"
    else:
        broken["spec"]["containers"][-1]["image"] = "docker.io/library/busybox:1.36"
        expected = "the image of the injected sidecar log-watcher was changed"
    messages = failing(compiled, broken, namespace)
    assert any(expected in message for message in messages)
    # A sidecar a rule requires is missing too, as a native one.
    others = [message for message in messages if expected not in message]
    assert all("requires the sidecar log-watcher" in message for message in others)


@settings(max_examples=3000, deadline=None)
@given(
    st.text(alphabet="ab-![]^\\*?c.&|~z_", max_size=8),
    st.text(alphabet="abcz-!]^[\\.&_", max_size=6),
)
def test_globs_translate_as_fnmatch_reads_them(pattern: str, namespace: str) -> None:
    regex = cel.glob_regex(pattern)
    expected = fnmatch.fnmatchcase(namespace, pattern)
    if regex is None:
        assert not expected
        return
    pod: dict[str, Any] = {}
    assert evaluate(f"request.namespace.matches({cel.quote(regex)})", pod, namespace) is expected


@given(st.text())
def test_literals_quote_exactly(text: str) -> None:
    assert literal(cel.quote(text)) == text


def test_the_platform_policy_compiles_to_what_the_docs_show() -> None:
    policy = load_policy(FIXTURES / "policies" / "good-platform-team.yaml")
    compiled = compile_policy(policy, OWN)
    assert compiled.match_conditions is not None
    conditions = {c.name: c.expression for c in compiled.match_conditions}
    assert conditions == {
        "outrigger.dev/namespace-not-excluded": "!(request.namespace in "
        "['kube-public', 'kube-system', 'monitoring', 'outrigger-system'] || "
        "request.namespace.matches('^(?s:batch-.*)$'))",
        "outrigger.dev/not-excluded-by-rule": "!(has(object.metadata.labels) && "
        "'app.kubernetes.io/component' in object.metadata.labels && "
        "object.metadata.labels['app.kubernetes.io/component'] == 'operator') || "
        "(request.namespace.matches('^(?s:prod-.*)$') && has(object.metadata.labels) && "
        "'tier' in object.metadata.labels && object.metadata.labels['tier'] == 'frontend')",
        "outrigger.dev/policy-applies": "(has(object.metadata.annotations) && "
        "object.metadata.annotations.exists(k, k.startsWith('outrigger.dev/'))) || "
        "(request.namespace.matches('^(?s:prod-.*)$') && has(object.metadata.labels) && "
        "'tier' in object.metadata.labels && object.metadata.labels['tier'] == 'frontend') || "
        "request.namespace == 'payments'",
    }
    assert compiled.validations is not None
    assert 'rule "frontends-ship-logs" requires the sidecar log-watcher' in (
        compiled.validations[0].message
    )


def test_without_rules_only_annotated_pods_are_sent() -> None:
    compiled = compile_policy(default_policy(), OWN)
    assert compiled.match_conditions is not None
    call, why = compiled.decides(Subject("shop", {}, {"example.com/a": "b"}))
    assert not call and "outrigger.dev/policy-applies is false" in why
    call, why = compiled.decides(Subject("shop", {}, {ann.INJECT: "true"}))
    assert call
    call, why = compiled.decides(Subject(OWN, {}, {ann.INJECT: "true"}))
    assert not call and "namespace-not-excluded" in why


def test_a_policy_past_the_expression_limit_falls_back_to_calling_for_every_pod() -> None:
    document = copy.deepcopy(BASE)
    document["rules"] = [
        {"name": f"r{i}", "namespaces": [f"team-{i:05d}-*"], "inject": ["log-watcher"]}
        for i in range(2000)
    ]
    compiled = compile_policy(parse_policy(document), OWN)
    assert compiled.match_conditions is None
    assert "outrigger.dev/policy-applies is" in compiled.problems[0]
    assert f"over {MAX_EXPRESSION_CODE_POINTS}" in compiled.problems[0]
    call, why = compiled.decides(Subject("shop", {}, {}))
    assert call and "too large" in why
    assert compiled.validations is not None  # the guard holds no rule that requires


@pytest.mark.parametrize("count", [100, 2500])
def test_the_guard_compiles_up_to_its_size_bound(count: int) -> None:
    document = copy.deepcopy(BASE)
    document["rules"] = [
        {"name": f"r{i}", "namespaces": [f"team-{i}"], "require": ["log-watcher"]}
        for i in range(count)
    ]
    compiled = compile_policy(parse_policy(document), OWN)
    if count == 100:
        assert compiled.validations is not None and len(compiled.validations) == 104
    else:
        assert compiled.validations is None
        assert any("the guard's expressions take" in p for p in compiled.problems)
