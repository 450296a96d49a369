"""Configuration: snsbus.toml < SNSBUS_* < flags, for the three daemons and bus-ctl; config show; completion.

The daemons are tested through click's ``make_context``: it reads every option
(including ``--config``, which loads the file) without running the daemon.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import tools.ctl_config  # noqa: F401  (registers config/completion on bus-ctl, as tools/ctl.py does)
from bus import config as cfg
from bus.policy import TreeConfig
from frontends.__main__ import main as frontend_main
from manager.__main__ import main as manager_main
from nodes.cli import main as node_main
from tools.ctl import main as ctl_main

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = {"manager": manager_main, "node": node_main, "frontend": frontend_main}
REQUIRED = {"manager": [], "node": ["--join", "tcp://127.0.0.1:1"], "frontend": ["--manager", "tcp://127.0.0.1:1"]}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No SNSBUS_* variable and no configuration file leaks in from the machine; cwd is empty."""
    for var in list(os.environ):
        if var.startswith("SNSBUS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _params(role: str, args=(), required=True):
    argv = [*(REQUIRED[role] if required else []), *args]
    ctx = DAEMONS[role].make_context(role, list(argv))
    return ctx, cfg.effective(ctx, role).roles[role]


# ------------------------------------------------------------------ precedence: default < file < env < flag

CASES = [  # role, key, flag, file value, env value, flag value
    ("manager", "max_children", "--max-children", 32, "48", "64"),
    ("manager", "heartbeat", "--heartbeat", 0.5, "0.25", "2"),
    ("node", "virtual", "--virtual", 2, "3", "4"),
    ("node", "join_timeout", "--join-timeout", 1.5, "2.5", "3.5"),
    ("frontend", "port", "--port", 9000, "9001", "9002"),
    ("frontend", "service", "--service", "fromfile", "fromenv", "fromflag"),
]
LAYERS = [(), ("file",), ("env",), ("flag",), ("file", "env"), ("file", "flag"), ("env", "flag"),
          ("file", "env", "flag")]


@pytest.mark.parametrize("layers", LAYERS, ids=lambda ls: "+".join(ls) or "default")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}.{c[1]}")
def test_precedence(case, layers, clean_env, monkeypatch):
    role, key, flag, file_value, env_value, flag_value = case
    args = []
    if "file" in layers:
        (clean_env / "snsbus.toml").write_text(f"[{role}]\n{key} = {cfg._toml(file_value)}\n")
    if "env" in layers:
        monkeypatch.setenv(cfg.env_name(role, key), env_value)
    if "flag" in layers:
        args = [flag, flag_value]
    ctx, eff = _params(role, args)
    kind = type(cfg.default(role, key))
    top = layers[-1] if layers else "default"
    expected = {"default": cfg.default(role, key), "file": file_value, "env": kind(env_value),
                "flag": kind(flag_value)}[top]
    assert ctx.params[key] == expected
    assert eff[key].value == expected and eff[key].source == top
    where = {"default": "default", "file": f"file {clean_env / 'snsbus.toml'}",
             "env": f"env {cfg.env_name(role, key)}", "flag": f"flag {flag}"}[top]
    assert eff[key].where() == where


def test_file_lookup_order(tmp_path, clean_env, monkeypatch):
    def write(path: Path, n: int) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"[node]\nvirtual = {n}\n")
        return path

    assert _params("node")[0].params["virtual"] == 1
    user = write(tmp_path / "xdg" / "snsbus" / "snsbus.toml", 5)
    assert _params("node")[1]["virtual"] == cfg.Value(5, "file", str(user))
    local = write(clean_env / "snsbus.toml", 6)
    assert _params("node")[1]["virtual"] == cfg.Value(6, "file", str(local))
    named = write(tmp_path / "named.toml", 7)
    monkeypatch.setenv("SNSBUS_CONFIG", str(named))
    assert _params("node")[1]["virtual"].value == 7
    given = write(tmp_path / "given.toml", 8)
    assert _params("node", ["--config", str(given)])[1]["virtual"].value == 8
    monkeypatch.setenv("SNSBUS_CONFIG", "")  # empty: no file at all
    assert _params("node")[1]["virtual"].source == "default"


def test_required_options_may_come_from_the_file(clean_env):
    (clean_env / "snsbus.toml").write_text('[node]\njoin = "tcp://10.0.0.1:7070"\nattr = ["rack=r1", "os=linux"]\n'
                                           '[frontend]\nmanager = "tcp://10.0.0.1:7070"\n'
                                           'origins = ["http://a:1", "http://b:2"]\n')
    ctx, _ = _params("node", required=False)
    assert ctx.params["join"] == "tcp://10.0.0.1:7070" and ctx.params["attr"] == ("rack=r1", "os=linux")
    ctx, _ = _params("frontend", required=False)
    assert ctx.params["manager"] == "tcp://10.0.0.1:7070" and ctx.params["origins"] == ("http://a:1", "http://b:2")


def test_environment_lists_bools_aliases_and_paths(monkeypatch):
    monkeypatch.setenv("SNSBUS_FRONTEND_ORIGINS", "http://a:1, http://b:2")
    monkeypatch.setenv("SNSBUS_FRONTEND_ACCESS_LOG", "yes")
    ctx, eff = _params("frontend")
    assert ctx.params["origins"] == ("http://a:1", "http://b:2") and ctx.params["access_log"] is True
    monkeypatch.setenv("SNSBUS_NODE_DIR", "/from/old/name")  # the older variable still works...
    assert _params("node")[1]["state_dir"] == cfg.Value("/from/old/name", "env", "SNSBUS_NODE_DIR")
    monkeypatch.setenv("SNSBUS_NODE_STATE_DIR", "~/nodes")  # ...below the canonical one; ~ is expanded
    assert _params("node")[1]["state_dir"] == cfg.Value(str(Path.home() / "nodes"), "env", "SNSBUS_NODE_STATE_DIR")
    monkeypatch.setenv("SNSBUS_NODE_ID", "12")  # what deployed processes get: not a key, ignored
    assert _params("node")[0].params["virtual"] == 1


@pytest.mark.parametrize("text, words", [
    ("[node]\nvirtaul = 2\n", ["[node]", "virtaul", "did you mean 'virtual'"]),
    ("[nodes]\nvirtual = 2\n", ["section 'nodes'", "did you mean 'node'"]),
    ("[node]\nvirtual = \"two\"\n", ["[node] virtual", "expected an integer", "'two'"]),
    ("[node]\nvirtual = true\n", ["[node] virtual", "expected an integer"]),
    ("[node]\nvirtual = 0\n", ["[node] virtual", "out of range", "between 1 and 100000"]),
    ("[manager]\npolicy = \"ring\"\n", ["[manager] policy", "randtree, balanced, star"]),
    ("[node]\nattr = \"rack=r1\"\n", ["[node] attr", "a list of strings"]),
    ("[frontend]\nport = 80.5\n", ["[frontend] port", "expected an integer"]),
    ("[node\n", ["not valid TOML"]),
    ("virtual = 2\n", ["section 'virtual'"]),
])
def test_bad_files_name_the_file_and_key(text, words, clean_env):
    path = clean_env / "snsbus.toml"
    path.write_text(text)
    res = CliRunner().invoke(node_main, ["--join", "tcp://127.0.0.1:1", "--print-config"])
    assert res.exit_code == 2, res.output
    assert str(path) in res.output
    for w in words:
        assert w in res.output


def test_bad_environment_and_missing_files_are_usage_errors(tmp_path, monkeypatch):
    res = CliRunner().invoke(manager_main, ["--config", str(tmp_path / "nope.toml"), "--print-config"])
    assert res.exit_code == 2 and "nope.toml (--config) does not exist" in res.output
    monkeypatch.setenv("SNSBUS_CONFIG", str(tmp_path / "gone.toml"))
    res = CliRunner().invoke(manager_main, ["--print-config"])
    assert res.exit_code == 2 and "$SNSBUS_CONFIG" in res.output
    monkeypatch.delenv("SNSBUS_CONFIG")
    monkeypatch.setenv("SNSBUS_MANAGER_HEARTBEAT", "fast")
    res = CliRunner().invoke(manager_main, ["--print-config"])
    assert res.exit_code == 2 and "SNSBUS_MANAGER_HEARTBEAT: expected a number, got 'fast'" in res.output


def test_print_config_shows_every_layer(clean_env, monkeypatch):
    (clean_env / "snsbus.toml").write_text("[manager]\nmax_children = 32\npolicy = \"balanced\"\n")
    monkeypatch.setenv("SNSBUS_MANAGER_POLICY", "star")
    res = CliRunner().invoke(manager_main, ["--misses", "5", "--print-config"])
    assert res.exit_code == 0, res.output
    rows = {line.split(" = ")[0].strip(): line for line in res.output.splitlines() if " = " in line}
    assert rows["max_children"].endswith(f"# file {clean_env / 'snsbus.toml'}") and " 32 " in rows["max_children"]
    assert rows["policy"].endswith("# env SNSBUS_MANAGER_POLICY") and '"star"' in rows["policy"]
    assert rows["misses"].endswith("# flag --misses") and rows["control"].endswith("# default")
    assert res.output.startswith(f"config file: {clean_env / 'snsbus.toml'} (from ./snsbus.toml)")


# ------------------------------------------------------------------ the schema matches the daemons


@pytest.mark.parametrize("role", sorted(DAEMONS))
def test_schema_covers_every_daemon_option_with_its_default(role):
    command = DAEMONS[role]
    own = {"config_file", "print_config", "help"}
    assert {p.name for p in command.params} - own == {k.name for k in cfg.SCHEMA[role]}
    ctx, eff = _params(role)  # no file, no variable: what each option defaults to
    required = {"join", "manager"}
    for key in cfg.SCHEMA[role]:
        if key.name in required:
            continue
        value = ctx.params[key.name]
        assert (list(value) if isinstance(value, tuple) else value) == key.default, key.name
        assert eff[key.name].source == "default"


def test_manager_defaults_are_the_tree_defaults():
    tree = TreeConfig()
    for key in ("max_children", "heartbeat", "misses"):
        assert cfg.default("manager", key) == getattr(tree, key)
    assert cfg.default("manager", "policy") == tree.policy


def test_example_file_is_every_key_with_its_default(tmp_path):
    shipped = (ROOT / "examples" / "snsbus.toml").read_text()
    assert shipped == cfg.example_toml(), "regenerate with: bus-ctl config example > examples/snsbus.toml"
    assert cfg.read_file(ROOT / "examples" / "snsbus.toml") == {}  # all commented out: the defaults
    uncommented = re.sub(r"^# (\w+ = )", r"\1", shipped, flags=re.M)  # what an operator does to set a key
    path = tmp_path / "uncommented.toml"
    path.write_text(uncommented)
    values = cfg.read_file(path)
    for role, keys in cfg.SCHEMA.items():
        for key in keys:
            expected = key.default if key.default is not None else key.example
            expected = os.path.expanduser(expected) if key.path else expected
            assert values[role][key.name] == expected, (role, key.name)


# ------------------------------------------------------------------ bus-ctl


def _ctl(*args, **kw):
    return CliRunner().invoke(ctl_main, list(args), prog_name="bus-ctl", **kw)


def test_config_show_text_and_json(clean_env, monkeypatch):
    path = clean_env / "snsbus.toml"
    path.write_text('[node]\nvirtual = 3\n[ctl]\nendpoint = "tcp://10.0.0.1:7070"\n')
    monkeypatch.setenv("SNSBUS_NODE_GROUP", "web")
    res = _ctl("config", "show")
    assert res.exit_code == 0, res.output
    for section in ("[manager]", "[node]", "[frontend]", "[ctl]"):
        assert section in res.output
    assert re.search(rf"virtual\s+= 3\s+# file {re.escape(str(path))}", res.output)
    assert re.search(r'group\s+= "web"\s+# env SNSBUS_NODE_GROUP', res.output)
    assert re.search(r"max_children\s+= 16\s+# default", res.output)

    res = _ctl("config", "show", "--role", "node", "--json")
    out = json.loads(res.stdout)
    assert out["file"] == str(path) and out["how"] == "./snsbus.toml" and list(out["roles"]) == ["node"]
    assert out["roles"]["node"]["virtual"] == {"value": 3, "source": "file", "origin": str(path)}
    assert out["roles"]["node"]["group"] == {"value": "web", "source": "env", "origin": "SNSBUS_NODE_GROUP"}
    assert out["roles"]["node"]["join"] == {"value": None, "source": "default", "origin": None}

    other = clean_env.parent / "other.toml"
    other.write_text("[manager]\nmisses = 9\n")
    out = json.loads(_ctl("config", "show", "--config", str(other), "--json").stdout)
    assert out["roles"]["manager"]["misses"]["value"] == 9 and out["how"] == "--config"


def test_config_show_reports_a_bad_file(clean_env):
    (clean_env / "snsbus.toml").write_text("[ctl]\nendpiont = 1\n")
    res = _ctl("config", "show")
    assert res.exit_code == 2 and "snsbus.toml: [ctl] unknown key 'endpiont'; did you mean 'endpoint'?" in res.output


def test_config_example_prints_the_shipped_file():
    res = _ctl("config", "example")
    assert res.exit_code == 0 and res.stdout == (ROOT / "examples" / "snsbus.toml").read_text()


def test_ctl_commands_take_endpoint_and_state_dir_from_the_config(fake, clean_env, monkeypatch):
    (clean_env / "snsbus.toml").write_text(f'[ctl]\nendpoint = "{fake.endpoint}"\n')
    res = _ctl("ping")
    assert res.exit_code == 0, res.output
    assert fake.requests[-1][0] == "ping"
    monkeypatch.setenv("SNSBUS_CTL_ENDPOINT", "tcp://127.0.0.1:1")  # env beats the file...
    res = _ctl("ping", "--timeout", "0.3")
    assert res.exit_code in (3, 5)
    res = _ctl("ping", "--endpoint", fake.endpoint)  # ...and the flag beats both
    assert res.exit_code == 0, res.output
    monkeypatch.setenv("SNSBUS_ENDPOINT", fake.endpoint)  # the older variable --endpoint reads itself wins
    assert _ctl("ping").exit_code == 0
    shown = json.loads(_ctl("config", "show", "--role", "ctl", "--json").stdout)["roles"]["ctl"]["endpoint"]
    assert shown == {"value": fake.endpoint, "source": "env", "origin": "SNSBUS_ENDPOINT"}


@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F"), ("zsh", "#compdef bus-ctl"),
                                           ("fish", "complete --no-files --command bus-ctl")])
def test_completion_scripts(shell, marker):
    res = _ctl("completion", shell)
    assert res.exit_code == 0, res.output
    assert "bus-ctl" in res.stdout and "_BUS_CTL_COMPLETE" in res.stdout
    assert marker.split()[0] in res.stdout


def test_completion_answers_like_the_script_asks(clean_env):
    # What the bash script runs when the user types `bus-ctl con<TAB>` and `bus-ctl config s<TAB>`.
    env = {"_BUS_CTL_COMPLETE": "bash_complete", "COMP_WORDS": "bus-ctl con", "COMP_CWORD": "1"}
    assert _ctl(env=env).stdout.split() == ["plain,config"]
    (clean_env / "snsbus.toml").write_text("[ctl]\nbroken = 1\n")  # completion never reads the file
    env.update(COMP_WORDS="bus-ctl config s", COMP_CWORD="2")
    assert _ctl(env=env).stdout.split() == ["plain,show"]
    res = _ctl("completion", "tcsh")
    assert res.exit_code == 2


def test_operations_doc_lists_every_key():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for role, keys in cfg.SCHEMA.items():
        for key in keys:
            assert f"| `{key.name}` |" in doc and f"`{cfg.env_name(role, key.name)}`" in doc, (role, key.name)
