"""The self-managed authority's decisions (pure): is a stored bundle valid for these names, is it
due, what the next bundle holds; and the helpers that publish and write it."""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from webhook.cluster.selftls import (
    Owner,
    ca_bundle_patch,
    owner_of,
    owner_references,
    take_turn,
    write_atomically,
)
from webhook.serving.authority import (
    Action,
    Bundle,
    BundleError,
    Settings,
    carry_out,
    plan,
)

NAMES = ("outrigger", "outrigger.system", "outrigger.system.svc")
DAY = datetime.timedelta(days=1)
SETTINGS = Settings(NAMES)  # 90 d certificates renewed 30 d early, 10 y CAs, 10 min overlap
T0 = datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # X.509 keeps seconds


def fresh(now: datetime.datetime = T0, settings: Settings = SETTINGS) -> Bundle:
    return carry_out(Action.NEW_ALL, None, settings, now)


def sans(bundle: Bundle) -> list[str]:
    extension = bundle.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(extension.value.get_values_for_type(x509.DNSName))


def test_nothing_stored_means_a_new_ca_and_certificate() -> None:
    decision = plan(None, SETTINGS, T0)
    assert decision.action is Action.NEW_ALL
    bundle = fresh()
    assert sans(bundle) == list(NAMES)
    assert len(bundle.cas) == 1
    bundle.cert.verify_directly_issued_by(bundle.newest_ca)
    assert bundle.cert.not_valid_after_utc - T0 == SETTINGS.cert_validity
    assert bundle.newest_ca.not_valid_after_utc - T0 == SETTINGS.ca_validity
    assert plan(bundle, SETTINGS, T0) == plan(bundle, SETTINGS, T0 + 59 * DAY)
    assert plan(bundle, SETTINGS, T0).action is Action.KEEP


def test_the_secret_data_round_trips() -> None:
    bundle = fresh()
    again = Bundle.from_data(bundle.data())
    assert again.data() == bundle.data()
    assert plan(again, SETTINGS, T0).action is Action.KEEP


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda d: d.pop("ca.key"), "missing ca.key"),
        (lambda d: d.update({"tls.crt": b"not a certificate"}), "does not parse as PEM"),
        (lambda d: d.update({"tls.key": b"garbage"}), "tls.key does not parse"),
        (lambda d: d.update({"tls.key": d["ca.key"]}), "tls.key does not belong to tls.crt"),
        (lambda d: d.update({"ca.key": d["tls.key"]}), "ca.key does not belong to the first CA"),
    ],
)
def test_spoiled_data_is_named_without_showing_a_key(spoil: object, message: str) -> None:
    data = fresh().data()
    secret = data["tls.key"].decode()
    spoil(data)  # type: ignore[operator]
    with pytest.raises(BundleError, match=message) as caught:
        Bundle.from_data(data)
    assert secret not in str(caught.value)


def test_a_certificate_lacking_a_name_is_reissued_by_the_same_ca() -> None:
    bundle = fresh()
    wider = Settings((*NAMES, "outrigger.system.svc.cluster.local"))
    decision = plan(bundle, wider, T0)
    assert decision.action is Action.NEW_CERT
    assert "outrigger.system.svc.cluster.local" in decision.reason
    renewed = carry_out(decision.action, bundle, wider, T0)
    assert renewed.cas == bundle.cas
    assert "outrigger.system.svc.cluster.local" in sans(renewed)
    assert plan(renewed, wider, T0).action is Action.KEEP


def test_a_certificate_is_renewed_within_its_window_not_before() -> None:
    bundle = fresh()
    assert plan(bundle, SETTINGS, T0 + 59 * DAY).action is Action.KEEP
    due = plan(bundle, SETTINGS, T0 + 61 * DAY)
    assert due.action is Action.NEW_CERT
    assert "expires" in due.reason
    renewed = carry_out(due.action, bundle, SETTINGS, T0 + 61 * DAY)
    assert renewed.cas == bundle.cas  # the API server's caBundle need not change
    assert renewed.cert.serial_number != bundle.cert.serial_number
    assert plan(renewed, SETTINGS, T0 + 61 * DAY).action is Action.KEEP


def test_an_expired_certificate_is_replaced() -> None:
    bundle = fresh()
    decision = plan(bundle, SETTINGS, T0 + 91 * DAY)
    assert decision.action is Action.NEW_CERT
    assert "expired" in decision.reason


def test_a_certificate_from_a_foreign_ca_is_replaced() -> None:
    ours, theirs = fresh(), fresh()
    mixed = Bundle(ours.cas, ours.ca_key, theirs.cert, theirs.key)
    decision = plan(mixed, SETTINGS, T0)
    assert decision.action is Action.NEW_CERT
    assert "not signed by a CA of the bundle" in decision.reason


def test_a_ca_is_rotated_in_two_steps() -> None:
    """New CA published beside the old one first; the certificate moves to it only once it
    has been published for the overlap; the old CA is dropped once it has expired."""
    ca_due = T0 + SETTINGS.ca_validity - SETTINGS.ca_renew_before + DAY
    bundle = carry_out(Action.NEW_CERT, fresh(), SETTINGS, ca_due - 2 * DAY)  # renewed so far
    first = plan(bundle, SETTINGS, ca_due)
    assert first.action is Action.NEW_CA
    published = carry_out(first.action, bundle, SETTINGS, ca_due)
    assert published.cas[1:] == bundle.cas  # old CA still trusted
    assert published.cert == bundle.cert  # still served
    assert published.newest_ca.subject != bundle.newest_ca.subject
    # Within the overlap nothing is signed with the new CA, even if the certificate is due.
    within = plan(published, SETTINGS, ca_due + datetime.timedelta(minutes=5))
    assert within.action is Action.KEEP
    assert "waiting until the new CA has been published" in within.reason
    after = ca_due + datetime.timedelta(minutes=11)
    moved = plan(published, SETTINGS, after)
    assert moved.action is Action.NEW_CERT
    rotated = carry_out(moved.action, published, SETTINGS, after)
    rotated.cert.verify_directly_issued_by(published.newest_ca)
    assert rotated.cas == published.cas
    assert plan(rotated, SETTINGS, after).action is Action.KEEP
    # Once the old CA has expired, the next renewal drops it.
    late = T0 + SETTINGS.ca_validity + DAY
    renewed = carry_out(Action.NEW_CERT, rotated, SETTINGS, late)
    assert renewed.cas == (published.newest_ca,)


def test_certificates_never_outlive_their_ca() -> None:
    short = Settings(NAMES, datetime.timedelta(days=90), datetime.timedelta(days=30),
                     datetime.timedelta(days=240))  # fmt: skip
    bundle = fresh(settings=short)
    for day in range(0, 240, 7):
        now = T0 + day * DAY
        decision = plan(bundle, short, now)
        bundle = carry_out(decision.action, bundle, short, now)
        issuer = bundle.issuer_of_cert()
        assert issuer is not None
        assert bundle.cert.not_valid_after_utc <= issuer.not_valid_after_utc
        assert bundle.cert.not_valid_after_utc > now + short.renew_before - 7 * DAY


def test_an_expired_or_non_ca_is_replaced_whole() -> None:
    bundle = fresh()
    assert plan(bundle, SETTINGS, T0 + SETTINGS.ca_validity + DAY).action is Action.NEW_ALL
    not_a_ca = Bundle((bundle.cert,), bundle.key, bundle.cert, bundle.key)
    decision = plan(not_a_ca, SETTINGS, T0)
    assert decision.action is Action.NEW_ALL
    assert "not a CA" in decision.reason


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"renew_before": datetime.timedelta(days=90)}, "renewal window"),
        ({"ca_overlap": datetime.timedelta(days=31)}, "CA overlap"),
        ({"ca_validity": datetime.timedelta(days=200)}, "at least twice"),
        ({"dns_names": ("Not_A_Name",)}, "invalid DNS name"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"dns_names": NAMES, **kwargs}
    with pytest.raises(ValueError, match=message):
        Settings(**arguments)  # type: ignore[arg-type]


def test_ca_bundle_patch_tests_each_name_and_skips_what_is_set() -> None:
    bundle = base64.b64encode(fresh().data()["ca.crt"]).decode()
    configuration = {
        "webhooks": [
            {"name": "inject.outrigger.dev", "clientConfig": {"service": {"name": "x"}}},
            {"name": "other.outrigger.dev", "clientConfig": {"caBundle": bundle}},
            {"name": "third.outrigger.dev", "clientConfig": {"caBundle": "b2xk"}},
        ]
    }
    assert ca_bundle_patch(configuration, bundle) == [
        {"op": "test", "path": "/webhooks/0/name", "value": "inject.outrigger.dev"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle},
        {"op": "test", "path": "/webhooks/2/name", "value": "third.outrigger.dev"},
        {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": bundle},
    ]
    assert ca_bundle_patch({"webhooks": configuration["webhooks"][1:2]}, bundle) == []


def test_write_atomically_swaps_one_symlink(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    directory.mkdir()
    (directory / "tls.crt").write_bytes(b"a regular file from before")
    (directory / "..1").mkdir()  # what a crash between two writes leaves
    write_atomically(directory, {"tls.crt": b"one", "tls.key": b"key one"})
    first = os.readlink(directory / "..data")
    assert (directory / "tls.crt").read_bytes() == b"one"
    assert os.readlink(directory / "tls.crt") == "..data/tls.crt"
    write_atomically(directory, {"tls.crt": b"two", "tls.key": b"key two"})
    assert (directory / "tls.crt").read_bytes() == b"two"
    assert (directory / "tls.key").read_bytes() == b"key two"
    assert not (directory / first).exists()  # the old version is gone
    assert not (directory / "..1").exists()
    versions = [p for p in directory.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(versions) == 1
    mode = os.stat(directory / "tls.key").st_mode & 0o777
    assert mode == 0o600


def test_key_pem_is_unencrypted_pkcs8() -> None:
    key_pem = fresh().data()["tls.key"]
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    serialization.load_pem_private_key(key_pem, password=None)


# Which replica writes ----------------------------------------------------------------------


def test_the_first_replica_to_find_nothing_writes_a_new_bundle() -> None:
    turn = take_turn(None, "", None, SETTINGS, T0)
    assert turn.write and turn.action is Action.NEW_ALL
    assert plan(turn.bundle, SETTINGS, T0).action is Action.KEEP


def test_a_valid_stored_bundle_is_served_by_every_replica_whatever_it_served() -> None:
    stored, mine = fresh(), fresh()
    for serving in (None, stored, mine):
        turn = take_turn(stored, "", serving, SETTINGS, T0)
        assert not turn.write and turn.bundle is stored


def test_racing_replicas_agree_on_the_winner() -> None:
    """Both read the same due bundle and decide to write; the API server takes one write (a
    conditional update); the loser reads the winner's and its next turn writes nothing."""
    stored = fresh()
    due = T0 + 61 * DAY
    first = take_turn(stored, "", stored, SETTINGS, due)
    second = take_turn(stored, "", stored, SETTINGS, due)
    assert first.write and second.write
    assert first.bundle.cert != second.bundle.cert  # each made its own: only one may land
    again = take_turn(first.bundle, "", stored, SETTINGS, due)  # the loser re-reads
    assert not again.write and again.bundle is first.bundle


def test_a_bundle_deleted_or_spoiled_under_a_replica_is_written_back() -> None:
    serving = fresh()
    restored = take_turn(None, "", serving, SETTINGS, T0)
    assert restored.write and restored.bundle is serving and restored.reason == "restored"
    spoiled = take_turn(None, "missing ca.key", serving, SETTINGS, T0)
    assert spoiled.bundle is serving
    assert spoiled.reason == "restored (stored: missing ca.key)"
    # Nothing to restore from: a new bundle, and the reason says what was wrong.
    fresh_start = take_turn(None, "missing ca.key", None, SETTINGS, T0)
    assert fresh_start.action is Action.NEW_ALL
    assert fresh_start.reason.endswith("(stored: missing ca.key)")


def test_a_bundle_deleted_with_its_webhook_configuration_is_not_written_back() -> None:
    """At `helm uninstall` the garbage collector deletes the Secret with the configuration
    while replicas still run: writing it back would leave it behind. The replica keeps
    serving what it has; a spoiled Secret (it exists) and a first start are written as ever."""
    serving = fresh()
    held = take_turn(None, "", serving, SETTINGS, T0, owner_exists=False)
    assert not held.write and held.bundle is serving
    assert take_turn(None, "", serving, SETTINGS, T0, owner_exists=True).write
    spoiled = take_turn(None, "missing ca.key", serving, SETTINGS, T0, owner_exists=False)
    assert spoiled.write and spoiled.bundle is serving
    first = take_turn(None, "", None, SETTINGS, T0, owner_exists=False)
    assert first.write and first.action is Action.NEW_ALL


# Whose the Secret is -----------------------------------------------------------------------

OWNER = Owner("outrigger", "uid-2")
OWNER_REF = {
    "apiVersion": "admissionregistration.k8s.io/v1",
    "kind": "MutatingWebhookConfiguration",
    "name": "outrigger",
    "uid": "uid-2",
}


def test_the_owner_is_the_configuration_read_by_name_and_uid() -> None:
    assert owner_of({"metadata": {"name": "outrigger", "uid": "uid-2"}}) == OWNER
    assert OWNER.reference == OWNER_REF
    for spoiled in (None, {}, {"metadata": []}, {"metadata": {"name": "outrigger"}},
                    {"metadata": {"name": "outrigger", "uid": ""}}):  # fmt: skip
        assert owner_of(spoiled) is None


def test_a_secret_without_an_owner_gets_one() -> None:
    """A Secret created before the configuration existed, or by an older version."""
    assert owner_references((), OWNER) == (OWNER_REF,)
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "name": "outrigger", "uid": "c"}
    assert owner_references([theirs], OWNER) == (theirs, OWNER_REF)


def test_an_owner_already_named_changes_nothing() -> None:
    """Equal to what was stored: no write. A reference someone made stricter stays as is."""
    stored = [{**OWNER_REF, "blockOwnerDeletion": True}]
    assert owner_references(stored, OWNER) == tuple(stored)


def test_a_stale_uid_is_replaced_in_place() -> None:
    """A configuration of the same name recreated (a new release) has a new uid; the old one
    would make the garbage collector delete the Secret. Other owners stay, in their order."""
    stale = {**OWNER_REF, "uid": "uid-1"}
    theirs = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x", "uid": "d"}
    assert owner_references([stale, theirs], OWNER) == (OWNER_REF, theirs)
    assert owner_references([stale, {**stale, "uid": "uid-0"}], OWNER) == (OWNER_REF,)
    other_name = {**OWNER_REF, "name": "someone-else"}
    assert owner_references([other_name], OWNER) == (other_name, OWNER_REF)


def test_without_a_configuration_the_references_stay() -> None:
    """Not there yet (install) or being deleted (uninstall): the garbage collector decides."""
    stale = {**OWNER_REF, "uid": "uid-1"}
    assert owner_references([stale], None) == (stale,)
    assert owner_references([], None) == ()
