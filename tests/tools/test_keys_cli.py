"""``bus-ctl keys``: the key store round trip offline (files) and online (a fake manager's ``keys``)."""

from __future__ import annotations

import json
import stat

from click.testing import CliRunner

import tools.ctl_keys  # noqa: F401  (registers `keys` on the group, as tools/ctl.py does)
from bus.security import CLIENT_KEY, KeyPair, encode_key, fingerprint, read_key_file, write_key_file
from manager.keys import PENDING, KeyStore, apply_key_command
from tools.ctl import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def keys_json(sdir) -> dict:
    res = run("keys", "list", "--json", "--state-dir", str(sdir))
    assert res.exit_code == 0, res.output
    return {e["name"]: e for e in json.loads(res.stdout)["keys"]}


def test_offline_round_trip(state_dir, tmp_path):
    res = run("keys", "init", "--client-name", "ctl-me", "--state-dir", str(state_dir))
    assert res.exit_code == 0, res.output
    assert "manager key" in res.stdout and "admitted as ctl-me" in res.stdout
    store = KeyStore(state_dir / "keys")
    assert store.initialized() and stat.S_IMODE((state_dir / CLIENT_KEY).stat().st_mode) == 0o600
    assert run("keys", "init", "--state-dir", str(state_dir)).exit_code == 0  # idempotent for the client key
    assert run("keys", "init", "--client-name", "ctl-me", "--force", "--state-dir", str(state_dir)).exit_code == 0
    assert list(keys_json(state_dir)) == ["ctl-me"]

    # add: from z85 text and from a .pub file (pre-authorized by file)
    k1, k2 = KeyPair.generate(), KeyPair.generate()
    write_key_file(tmp_path / "web-2.pub", k2.public)
    res = run("keys", "add", "web-1", encode_key(k1.public), "--state-dir", str(state_dir))
    assert res.exit_code == 0 and "accepted web-1" in res.stdout and "no manager reachable" in res.stdout
    assert run("keys", "add", "web-2", str(tmp_path / "web-2.pub"), "--state-dir", str(state_dir)).exit_code == 0
    bad = run("keys", "add", "web-3", "not-a-key", "--state-dir", str(state_dir))
    assert bad.exit_code == 2 and "not a CURVE key" in bad.output

    # a node knocked (the manager's ZAP handler records it): accept it by a fingerprint prefix
    k3 = KeyPair.generate()
    store.note_pending(k3.public, "10.1.2.3")
    listing = run("keys", "list", "--state-dir", str(state_dir))
    assert "1 pending" in listing.stdout and "from 10.1.2.3" in listing.stdout
    assert keys_json(state_dir)[fingerprint(k3.public)]["state"] == PENDING
    res = run("keys", "accept", fingerprint(k3.public)[:8], "--name", "db-1", "--state-dir", str(state_dir))
    assert res.exit_code == 0 and "accepted db-1" in res.stdout

    # revoke, then adding it back needs --force
    assert run("keys", "revoke", "web-1", "--state-dir", str(state_dir)).exit_code == 0
    entries = keys_json(state_dir)
    assert {n: e["state"] for n, e in entries.items()} == {
        "ctl-me": "accepted", "web-1": "revoked", "web-2": "accepted", "db-1": "accepted"}
    ctl = read_key_file(state_dir / CLIENT_KEY)[0]
    assert store.authorized() == {store.manager_keypair().public, ctl, k2.public, k3.public}
    assert store.revoked() == {k1.public}
    refused = run("keys", "add", "web-1", encode_key(k1.public), "--state-dir", str(state_dir))
    assert refused.exit_code == 6 and "--force" in refused.output
    assert run("keys", "add", "web-1", encode_key(k1.public), "--force", "--state-dir", str(state_dir)).exit_code == 0
    missing = run("keys", "accept", "nosuch", "--state-dir", str(state_dir))
    assert missing.exit_code == 6 and "no pending key" in missing.output


def test_without_store_or_manager_says_what_to_do(state_dir):
    res = run("keys", "list", "--state-dir", str(state_dir))
    assert res.exit_code == 6 and "bus-ctl keys init" in res.output


def test_client_only_prints_the_add_command(state_dir):
    res = run("keys", "init", "--client-only", "--client-name", "alice", "--state-dir", str(state_dir))
    assert res.exit_code == 0 and "bus-ctl keys add alice '" in res.stdout
    assert not (state_dir / "keys").exists()


def test_online_through_the_manager(fake, tmp_path):
    store = KeyStore(tmp_path / "keys")
    store.init()

    def keys(args):  # the manager's `keys` command, pushing to a 28-node tree
        result, changed = apply_key_command(store, args)
        if changed:
            result["push"] = {"version": store.version, "current": 27, "behind": [],
                              "missing": [{"node": "node-7", "reason": "dead"}]}
        return result

    fake.handlers["keys"] = keys
    key = encode_key(KeyPair.generate().public)
    res = run("keys", "add", "edge-1", key, "--endpoint", fake.endpoint)
    assert res.exit_code == 0, res.output
    assert "accepted edge-1" in res.stdout and "27 nodes hold it" in res.stdout and "node-7: dead" in res.stdout
    res = run("keys", "revoke", "edge-1", "--json", "--endpoint", fake.endpoint)
    assert json.loads(res.stdout)["entry"]["state"] == "revoked"
    assert fake.requests[-1][0] == "keys"
    listing = run("keys", "list", "--endpoint", fake.endpoint)
    assert "revoked" in listing.stdout and "edge-1" in listing.stdout and "[offline" not in listing.stdout
