"""``bus-ctl keys``: the CurveZMQ keys the manager admits (init, list, add, accept, revoke).

Registered on :data:`tools.ctl.main`.  ``init`` works on files only.  The
others go through the manager's control API when a manager is reachable, so a
change reaches every node at once; otherwise they edit the key store's files
(``--keys DIR``, default ``STATE/keys``), which the manager reads when it
starts and re-reads at its next sync.  See docs/security.md.
"""

from __future__ import annotations

import getpass
import socket
import time
from pathlib import Path

import click

from tools.ctl import CtlCliError, NotRunningError, _call, _echo_json, _endpoint, _manager_options, _state_dir, main


def _keys_option(f):
    return click.option("--keys", "keys_dir", type=click.Path(file_okay=False), default=None,
                        help="Edit this key store's files directly (default: through the running manager, "
                             "else STATE/keys).")(f)


def _store(keys_dir, state_dir):
    from manager.keys import KeyStore

    return KeyStore(Path(keys_dir) if keys_dir else _state_dir(state_dir) / "keys")


def _run(args: dict, keys_dir, state_dir, endpoint, timeout) -> tuple[dict, str | None]:
    """``(result, where)``: where is None online, else the store edited offline."""
    if not keys_dir:
        try:
            ep = _endpoint(endpoint, state_dir)
        except NotRunningError:
            if endpoint:
                raise
            ep = None
        if ep is not None:
            try:
                return _call(ep, "keys", args, timeout=timeout), None
            except NotRunningError:
                if endpoint:
                    raise
    from bus.security import KeyFormatError, KeyStoreError
    from manager.keys import apply_key_command

    store = _store(keys_dir, state_dir)
    if not store.initialized():
        raise CtlCliError(f"no manager is running and {store.path} holds no key store: run `bus-ctl keys init`")
    try:
        return apply_key_command(store, args)[0], str(store.path)
    except (KeyStoreError, KeyFormatError) as e:
        raise CtlCliError(str(e)) from e


def _done(verb: str, res: dict, where: str | None) -> None:
    e = res["entry"]
    click.echo(f"{verb} {e['name']} ({e['fingerprint']}); keyring version {res['version']}")
    if where is not None:
        click.echo(f"no manager reachable: changed {where}; a running manager applies it within its resync "
                   f"period, a stopped one when it starts")
        return
    push = res.get("push") or {}
    missing = push.get("missing") or []
    behind = push.get("behind") or []
    line = f"pushed to the tree: {push.get('current', 0)} nodes hold it"
    if behind:
        line += f", {len(behind)} behind ({', '.join(behind[:5])}{' ...' if len(behind) > 5 else ''})"
    if missing:
        line += f", {len(missing)} did not answer (" + ", ".join(f"{m['node']}: {m['reason']}" for m in missing[:5])
        line += " ...)" if len(missing) > 5 else ")"
    click.echo(line)


@main.group()
def keys() -> None:
    """CurveZMQ keys: which nodes, front ends and bus-ctl clients the bus admits."""


@keys.command("init")
@_keys_option
@click.option("--force", is_flag=True, help="Replace an existing manager key (every node must pin the new one).")
@click.option("--client-only", is_flag=True, help="Only make this bus-ctl's client key (for a remote manager).")
@click.option("--client-name", default=None, help="Name of this client's key [default: ctl-USER@HOST].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory (default $SNSBUS_STATE_DIR or ~/.local/state/snsbus).")
def init(keys_dir, force, client_only, client_name, as_json, state_dir):
    """Create the manager's key store and this bus-ctl's client key (admitted by the store)."""
    from bus.security import (CLIENT_KEY, MANAGER_PUB, KeyPair, KeyStoreError, encode_key, read_key_file,
                              write_key_file)

    sdir = _state_dir(state_dir)
    out: dict = {}
    client = sdir / CLIENT_KEY
    if not client.exists():
        pair = KeyPair.generate()
        write_key_file(client, pair.public, pair.secret, name="bus-ctl")
    try:
        public = read_key_file(client)[0]
    except KeyStoreError as e:
        raise CtlCliError(str(e)) from e
    name = client_name or f"ctl-{getpass.getuser()}@{socket.gethostname().split('.')[0]}"
    out["client"] = {"file": str(client), "key": encode_key(public), "name": name}
    if not client_only:
        store = _store(keys_dir, state_dir)
        try:
            if force or not store.initialized():
                store.init(force=force)
            known = [e for e in store.entries() if e.key == public and e.state == "accepted"]
            if known:
                name = known[0].name  # already admitted: init again changes nothing
            else:
                store.add(name, public)
        except KeyStoreError as e:
            raise CtlCliError(str(e)) from e
        mk = store.manager_keypair()
        out["manager"] = {"store": str(store.path), "pub": str(store.path / MANAGER_PUB),
                          "fingerprint": mk.fingerprint, "key": encode_key(mk.public)}
        if store.path != sdir / "keys":  # a store elsewhere: this bus-ctl pins its manager key from STATE
            write_key_file(sdir / MANAGER_PUB, mk.public, name="manager")
    if as_json:
        _echo_json(out)
        return
    if "manager" in out:
        m = out["manager"]
        click.echo(f"manager key {m['fingerprint']} in {m['store']}")
        click.echo(f"  nodes pin it: copy {m['pub']} into each node's key dir, or run bus-node with "
                   f"--manager-key '{m['key']}'")
        click.echo(f"client key of this bus-ctl: {client}, admitted as {name}")
    else:
        click.echo(f"client key of this bus-ctl: {client}")
        click.echo(f"ask the manager's operator to run: bus-ctl keys add {name} '{out['client']['key']}'")


def _when(value) -> str:
    return value.replace("T", " ") if isinstance(value, str) else ""


@keys.command("list")
@_keys_option
@_manager_options
def list_(keys_dir, as_json, state_dir, endpoint, timeout):
    """The manager key and every accepted, pending and revoked key."""
    res, where = _run({"op": "list"}, keys_dir, state_dir, endpoint, timeout)
    if as_json:
        _echo_json(res)
        return
    m = res["manager"]
    opened = " (open mode: every new key is accepted)" if res.get("open") else ""
    src = f" [offline: {where}]" if where else ""
    click.echo(f"manager key {m['fingerprint']}, keyring version {res['version']}{opened}{src}")
    rows = [("STATE", "NAME", "FINGERPRINT", "SINCE")]
    order = {"pending": 0, "accepted": 1, "revoked": 2}
    for e in sorted(res["keys"], key=lambda e: (order.get(e["state"], 3), e["name"])):
        since = e.get("revoked") or e.get("added") or e.get("seen") or ""
        note = f" from {e['address']}" if e["state"] == "pending" and e.get("address") else ""
        rows.append((e["state"], e["name"], e["fingerprint"], _when(since) + note))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    pending = [e for e in res["keys"] if e["state"] == "pending"]
    if pending:
        click.echo(f"{len(pending)} pending: admit one with `bus-ctl keys accept FINGERPRINT --name NAME`")


@keys.command("add")
@click.argument("name")
@click.argument("key")
@click.option("--force", is_flag=True, help="Admit a key that was revoked.")
@_keys_option
@_manager_options
def add(name, key, force, keys_dir, as_json, state_dir, endpoint, timeout):
    """Pre-authorize KEY (z85 text, hex, or a .pub/.key file) as NAME."""
    from bus.security import KeyFormatError, KeyStoreError, encode_key, load_public_key

    try:
        raw = load_public_key(key)
    except (KeyFormatError, KeyStoreError) as e:
        raise click.BadParameter(str(e), param_hint="KEY") from None
    res, where = _run({"op": "add", "name": name, "key": encode_key(raw), "force": force}, keys_dir, state_dir,
                      endpoint, timeout)
    if as_json:
        _echo_json(res)
    else:
        _done("accepted", res, where)


@keys.command("accept")
@click.argument("ref")
@click.option("--name", default=None, help="Name the key (default: its fingerprint).")
@_keys_option
@_manager_options
def accept(ref, name, keys_dir, as_json, state_dir, endpoint, timeout):
    """Admit the pending key REF (its fingerprint, a prefix of 6+ digits, or its key)."""
    res, where = _run({"op": "accept", "ref": ref, "name": name}, keys_dir, state_dir, endpoint, timeout)
    if as_json:
        _echo_json(res)
    else:
        _done("accepted", res, where)


@keys.command("revoke")
@click.argument("ref")
@_keys_option
@_manager_options
def revoke(ref, keys_dir, as_json, state_dir, endpoint, timeout):
    """Revoke REF (a name, fingerprint or key): refused everywhere, live connections cut."""
    t0 = time.monotonic()
    res, where = _run({"op": "revoke", "ref": ref}, keys_dir, state_dir, endpoint, timeout + 5)
    if as_json:
        _echo_json(res)
        return
    _done("revoked", res, where)
    if where is None:
        click.echo(f"done in {time.monotonic() - t0:.2f}s")
