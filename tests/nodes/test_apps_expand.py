"""${VAR} expansion in process paths and arguments, and bus-ctl deploy --set."""

from __future__ import annotations

import click
import pytest

from nodes.apps import expand
from tools.ctl_apps import apply_sets


def test_expand_names_defaults_and_nothing_else():
    env = {"A": "x", "EMPTY": ""}
    assert expand("${A}/${B:-dflt}/${EMPTY:-e}/${C}", env) == "x/dflt/e/"
    assert expand("$A ${A ${ not-a-var} $$", env) == "$A ${A ${ not-a-var} $$"  # only ${NAME} forms


def test_set_substitutes_xml_escaped_values_and_leaves_the_rest():
    spec = '<arg>${PORT:-80}</arg><arg>${MSG}</arg><arg>${SNSBUS_NODE}</arg><arg>${PORTS}</arg>'
    out = apply_sets(spec, ["PORT=8080", 'MSG=a<b&"c"'])
    assert out == '<arg>8080</arg><arg>a&lt;b&amp;&quot;c&quot;</arg><arg>${SNSBUS_NODE}</arg><arg>${PORTS}</arg>'
    with pytest.raises(click.BadParameter):
        apply_sets(spec, ["no-equals"])
    with pytest.raises(click.BadParameter):
        apply_sets(spec, ["BAD KEY=1"])


def test_bus_node_does_not_import_the_worker_stub_until_a_service_needs_it():
    """RSS budget: most nodes never host workers, so nodes.stub is imported on first use."""
    import subprocess
    import sys

    code = ("import sys, nodes.agent; from nodes.stub import SVC_HANDLERS; "
            "assert set(nodes.agent._SVC_OPS) == set(SVC_HANDLERS)")
    check = "import sys, nodes.agent; print('nodes.stub' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bus_node_does_not_import_curve_key_management_unless_used():
    """RSS budget: bus.security (threads, key files) loads only when a node runs with keys."""
    import subprocess
    import sys

    check = "import sys, nodes.cli, nodes.agent, bus.planes; print('bus.security' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "False"


def test_curve_keeps_openssl_out_of_the_bus_node():
    """RSS budget: with CURVE on (the default) a bus-node imports bus.security, which must not map OpenSSL's
    libcrypto (hashlib does: 3.5 MB); fingerprints use CPython's own sha256."""
    import subprocess
    import sys

    check = ("import sys; sys.modules['ssl'] = None; import nodes.cli, bus.security, manager.keys; "
             "print(sorted(m for m in ('_hashlib', '_ssl', 'ssl') if sys.modules.get(m)))")
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "[]"
