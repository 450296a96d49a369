"""The remote half of the ssh bootstrap: the program :mod:`tools.bootstrap` runs on every ssh host.

Never imported by the local side: ``tools.bootstrap`` reads this file's text
and runs it on the remote host as ``python3 -c PROGRAM ACTION DIR DIGEST NAME
NUMBER -- BUS-NODE-ARGS...``, where ACTION is ``probe`` (start bus-node if the
install in DIR is the wheelhouse DIGEST, else answer "need-install" with this
Python's version and machine), ``install`` (unpack the wheelhouse tar arriving
on stdin into a new venv, then start bus-node) or ``stop`` (NUMBER is the
grace period before SIGKILL); for the other two NUMBER is how long a new
bus-node is watched for an early exit.  It owns the remote layout described
in ``tools.bootstrap``'s docstring.

It must run on any python3 >= 3.6 (to report a version mismatch), so it uses
only what 3.6 and its standard library have, and prints exactly one JSON line:
``{"ok": true, ...}`` or ``{"ok": false, "stage", "error", "tail"}``.
"""

import fcntl, json, os, shutil, signal, subprocess, sys, tarfile, time

def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()

def fail(stage, error, tail=""):
    say(ok=False, stage=stage, error=error, tail=tail[-3000:])
    sys.exit(1)

def tail_of(text, n=8):
    return "\n".join([l for l in text.splitlines() if l.strip()][-n:])

def log_tail(path, n=8):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            return tail_of(f.read().decode("utf-8", "replace"), n)
    except OSError:
        return ""

def locked(path):
    f = open(path, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f

def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().rstrip(b"\0").split(b"\0")
    except FileNotFoundError:
        return []
    except OSError:
        return None

def node_pid(pidfile, name):
    """The pid in pidfile if it is a live bus-node of that name, and its argv."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None, None
    argv = cmdline(pid)
    if argv is None:  # no /proc: trust the pid file
        return pid, []
    ours = any(a.endswith(b"/bus-node") for a in argv) and name.encode() in argv
    return (pid, argv) if ours else (None, None)

def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return False

def terminate(pid, grace):
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return "terminated"
    deadline = time.time() + grace
    while time.time() < deadline:
        if gone(pid):
            return "terminated"
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)  # bus-node leads its own session
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 5
    while time.time() < deadline and not gone(pid):
        time.sleep(0.05)
    return "killed"

def current(d):
    """The realpath of d/venv and its digest ("" when it has no usable bus-node)."""
    venv = os.path.realpath(os.path.join(d, "venv"))
    try:
        with open(os.path.join(venv, ".snsbus-digest")) as f:
            stamp = f.read().strip()
    except OSError:
        stamp = ""
    ok = os.access(os.path.join(venv, "bin", "bus-node"), os.X_OK)
    return venv, (stamp if ok else "")

def node_key(d):
    """The public key bus-node made in d/keys (its --key-dir), once it exists."""
    try:
        with open(os.path.join(d, "keys", "identity.key")) as f:
            for line in f:
                k, sep, v = line.strip().partition("=")
                if sep and k.strip() == "public-key":
                    return v.strip().strip('"')
    except OSError:
        pass
    return None

def start(d, name, settle, args, **extra):
    for sub in ("logs", "run"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    pidfile = os.path.join(d, "run", name + ".pid")
    logpath = os.path.join(d, "logs", name + ".log")
    lock = locked(os.path.join(d, "run", name + ".lock"))
    venv, _ = current(d)
    exe = os.path.join(venv, "bin", "bus-node")
    state = "started"
    pid, argv = node_pid(pidfile, name)
    if pid:
        want = [exe.encode()] + [a.encode() for a in args]
        if not argv or argv[-len(want):] == want:
            say(ok=True, state="running", pid=pid, log=logpath, key=node_key(d), **extra)
            return
        terminate(pid, 5.0)  # it runs from an older install, or with other arguments
        state = "restarted"
    with open(logpath, "ab") as logf:
        logf.write(("--- %s snsbus bootstrap: %s %s\n" % (
            time.strftime("%Y-%m-%d %H:%M:%S"), exe, " ".join(args))).encode())
        logf.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            p = subprocess.Popen([exe] + args, stdin=subprocess.DEVNULL, stdout=logf,
                                 stderr=subprocess.STDOUT, cwd=d, env=env, start_new_session=True)
        except OSError as e:
            fail("start", "bus-node could not be run: %s" % e)
    tmp = pidfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % p.pid)
    os.replace(tmp, pidfile)
    deadline = time.time() + settle
    secure = "--insecure" not in args
    while time.time() < deadline or (secure and node_key(d) is None and time.time() < deadline + 10):
        if p.poll() is not None:
            os.unlink(pidfile)
            fail("start", "bus-node exited with code %d right after it started; see %s" % (
                p.returncode, logpath), log_tail(logpath))
        time.sleep(0.05)
    lock.close()
    say(ok=True, state=state, pid=p.pid, log=logpath, key=node_key(d) if secure else None, **extra)

def run(argv):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return r.returncode, r.stdout.decode("utf-8", "replace")

def prune(d, keep):
    in_use = set()
    run_dir = os.path.join(d, "run")
    for entry in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        if entry.endswith(".pid"):
            pid, argv = node_pid(os.path.join(run_dir, entry), entry[:-4])
            for a in argv or ():
                in_use.add(a.decode("utf-8", "replace"))
    for entry in os.listdir(d):
        path = os.path.join(d, entry)
        if entry.startswith("venv-") and path != keep:
            if not any(a.startswith(path + "/") for a in in_use):
                shutil.rmtree(path, ignore_errors=True)

def install(d, digest):
    """Install the wheelhouse arriving on stdin; False if a concurrent call already did."""
    os.makedirs(d, exist_ok=True)
    lock = locked(os.path.join(d, ".install.lock"))
    if current(d)[1] == digest:
        with open(os.devnull, "wb") as sink:
            shutil.copyfileobj(sys.stdin.buffer, sink)
        lock.close()
        return False
    # A new directory each time: a running bus-node keeps the files it started from.
    venv = os.path.join(d, "venv-%s-%d-%d" % (digest[:16], time.time(), os.getpid()))
    wheels = os.path.join(d, "wheels.tmp-%d" % os.getpid())
    os.makedirs(wheels)
    try:
        try:
            with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tf:
                for m in tf:
                    base = m.name
                    if not m.isfile() or "/" in base or base.startswith(".") or not base.endswith(".whl"):
                        fail("unpack", "the wheelhouse holds an unexpected entry %r" % m.name)
                    src = tf.extractfile(m)
                    with open(os.path.join(wheels, base), "wb") as out:
                        shutil.copyfileobj(src, out)
        except (tarfile.TarError, OSError) as e:
            fail("unpack", "the wheelhouse could not be unpacked into %s: %s" % (wheels, e))
        if os.path.lexists(venv):
            shutil.rmtree(venv)
        code, out = run([sys.executable, "-m", "venv", venv])
        if code:
            fail("venv", "`%s -m venv` failed with code %d (on Debian/Ubuntu install python3-venv)" % (
                sys.executable, code), tail_of(out))
        code, out = run([os.path.join(venv, "bin", "python"), "-m", "pip", "install", "--no-index",
                         "--find-links", wheels, "--disable-pip-version-check", "--no-cache-dir",
                         "--no-input", "-q", "snsbus"])
        if code:
            fail("pip", "`pip install` from the shipped wheelhouse failed with code %d" % code, tail_of(out))
        if not os.access(os.path.join(venv, "bin", "bus-node"), os.X_OK):
            fail("pip", "pip installed snsbus but %s/bin/bus-node is missing" % venv)
        with open(os.path.join(venv, ".snsbus-digest"), "w") as f:
            f.write(digest + "\n")
        link = os.path.join(d, "venv")
        if os.path.lexists(link + ".new"):
            os.unlink(link + ".new")
        os.symlink(os.path.basename(venv), link + ".new")
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(link)
        os.replace(link + ".new", link)
    finally:
        shutil.rmtree(wheels, ignore_errors=True)
    lock.close()
    return True

def main():
    action, d, digest, name, number = sys.argv[1:6]
    args = sys.argv[7:]
    d = os.path.abspath(os.path.expanduser(d))
    if action == "probe":
        _, stamp = current(d)
        if stamp != digest:
            say(ok=True, state="need-install", impl=sys.implementation.name,
                version=list(sys.version_info[:2]), machine=os.uname().machine, python=sys.executable)
            return
        start(d, name, float(number), args)
    elif action == "install":
        installed = install(d, digest)
        start(d, name, float(number), args, installed=installed)
        prune(d, os.path.realpath(os.path.join(d, "venv")))
    elif action == "stop":
        pidfile = os.path.join(d, "run", name + ".pid")
        pid, _ = node_pid(pidfile, name)
        how = terminate(pid, float(number)) if pid else "not running"
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        say(ok=True, how=how, pid=pid)
    else:
        fail("usage", "unknown action %r" % action)

if __name__ == "__main__":
    main()
