"""Long fuzz runs of the targets in ``tests/fuzz/targets.py``: ``python -m tools.fuzz`` (``make fuzz``).

::

    python -m tools.fuzz [--target NAME ...] [--seconds S] [--twin compiled|pure|both]
                         [--engine atheris|hypothesis] [--examples N --seed N]
                         [--out DIR] [--report-known] [--no-save]
    python -m tools.fuzz --target NAME --twin T --replay FILE     # run one input, show the traceback

Each (target, twin) runs in its own child process, so ``BUS_NO_EXTENSIONS``
picks the twin.  The default engine is atheris (coverage-guided libFuzzer over
the instrumented Python of ``bus``, ``core``, ``manager``, ``nodes``,
``frontends`` and the targets; the compiled twin's C is not instrumented, so
its coverage is that of its Python callers); ``--engine hypothesis`` is the
fallback without atheris and what the short runs in ``make test`` use, with a
fixed seed and a number of examples instead of a time.

A crash (an exception a target does not document, a broken invariant, a hang
over 10 s) is saved under ``OUT/crashes/<target>/`` and, unless ``--no-save``,
as a regression input ``tests/fuzz/regressions/<target>/crash-<sha>.bin``,
which ``tests/fuzz/test_regressions.py`` replays (and fails on until the bug
is fixed).  Crashes of bugs listed in ``tests/fuzz/known.py`` are counted, not
saved, unless ``--report-known``.  The summary prints, per target and twin,
the inputs tried, inputs per second, coverage (atheris), the crashes by
signature and the command that reproduces each.  Exit status: 0 without new
crashes, 1 with.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import click

__all__ = ["main", "run_target"]

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "fuzz" / "regressions"
TWINS = ("compiled", "pure")
_RESULT = "FUZZ-RESULT "
_INSTRUMENTED = ["bus", "core", "manager", "nodes", "frontends", "tests.fuzz"]


def _env(twin: str) -> dict:
    env = dict(os.environ)
    env.pop("BUS_NO_EXTENSIONS", None)
    if twin == "pure":
        env["BUS_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class _Recorder:
    """Runs one target on each input; counts inputs, known bugs and new crashes (one file per signature)."""

    def __init__(self, target: str, crash_dir: Path, report_known: bool, deadline: float | None):
        from tests.fuzz import known, targets

        self.target = target
        self.fn = targets.TARGETS[target]
        self.known = known
        self.crash_dir = crash_dir
        self.report_known = report_known
        self.deadline = deadline
        self.inputs = 0
        self.known_hits: dict[str, int] = {}
        self.crashes: dict[str, dict] = {}
        self.t0 = time.monotonic()

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        try:
            self.fn(data)
        except Exception as e:  # every escape is a finding: sort it, keep going
            hit = None if self.report_known else self.known.match(self.target, e)
            if hit is not None:
                self.known_hits[hit.id] = self.known_hits.get(hit.id, 0) + 1
            else:
                self._crash(self.known.signature(e), data, e)
        if self.deadline is not None and self.inputs % 64 == 0 and time.monotonic() > self.deadline:
            self.finish()
            os._exit(0)  # libFuzzer's loop does not return; the results are written

    def _crash(self, sig: str, data: bytes, exc: BaseException) -> None:
        entry = self.crashes.get(sig)
        if entry is not None:
            entry["count"] += 1
            if len(data) < entry["size"]:  # keep the smallest input of each signature
                self._save(entry, data)
            return
        entry = self.crashes[sig] = {"signature": sig, "count": 1, "size": 0, "file": None,
                                     "message": f"{type(exc).__name__}: {exc}"[:300],
                                     "traceback": "".join(traceback.format_exception(exc))[-3000:]}  # fmt: skip
        self._save(entry, data)

    def _save(self, entry: dict, data: bytes) -> None:
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        path = self.crash_dir / f"crash-{hashlib.sha1(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        if entry["file"] and entry["file"] != str(path):
            Path(entry["file"]).unlink(missing_ok=True)
        entry["file"], entry["size"] = str(path), len(data)

    def finish(self) -> None:
        from core.fastpath import IMPLEMENTATION

        print(_RESULT + json.dumps({"target": self.target, "implementation": IMPLEMENTATION,
                                    "inputs": self.inputs, "seconds": round(time.monotonic() - self.t0, 3),
                                    "known": self.known_hits, "crashes": list(self.crashes.values())}),
              flush=True)  # fmt: skip


def _child(target: str, engine: str, seconds: float, examples: int, seed: int, crash_dir: Path,
           corpus: Path | None, report_known: bool) -> None:  # fmt: skip
    """Run in the child process: fuzz one target with one engine on this process's twin."""
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=_INSTRUMENTED):
            from tests.fuzz import targets

            targets.import_all()
        targets.setup()
        rec = _Recorder(target, crash_dir, report_known, time.monotonic() + seconds)
        args = [sys.argv[0], f"-max_total_time={int(seconds) + 30}", "-timeout=10", "-rss_limit_mb=3072",
                "-max_len=4096", f"-artifact_prefix={crash_dir}/"]  # fmt: skip
        if corpus is not None:  # new inputs go to the first directory; the saved crashes seed the search
            corpus.mkdir(parents=True, exist_ok=True)
            args.append(str(corpus))
            if (REGRESSIONS / target).is_dir():
                args.append(str(REGRESSIONS / target))
        crash_dir.mkdir(parents=True, exist_ok=True)
        atheris.Setup(args, rec)
        atheris.Fuzz()  # leaves through rec's deadline (os._exit) or a native crash / timeout
        return
    from tests.fuzz import targets

    targets.setup()
    rec = _Recorder(target, crash_dir, report_known, None)
    for path in sorted((REGRESSIONS / target).glob("*.bin")):  # the saved crashes first
        rec(path.read_bytes())
    run_hypothesis(rec, examples=examples, seed=seed, seconds=seconds)
    rec.finish()
    targets.teardown()


def run_hypothesis(fn, *, examples: int, seed: int, seconds: float | None = None, shrink: bool = False) -> None:
    """Feed ``fn`` hypothesis-generated byte strings: ``examples`` of them per round, seeds from ``seed`` on.

    With ``seconds`` it runs rounds (seed, seed + 1, ...) until the time is up;
    without, exactly one round, so the same seed gives the same inputs.  With
    ``shrink`` an exception from ``fn`` is shrunk and re-raised (pytest);
    without, ``fn`` is expected to record failures itself.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    end = None if seconds is None else time.monotonic() + seconds
    s = seed
    while True:
        @hseed(s)
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(st.binary(max_size=1024))
        def prop(data: bytes) -> None:
            fn(data)

        prop()
        s += 1
        if end is None or time.monotonic() > end:
            return


def run_target(target: str, twin: str, *, engine: str, seconds: float, examples: int = 500, seed: int = 0,
               out: Path, report_known: bool = False) -> dict:  # fmt: skip
    """Fuzz ``target`` on ``twin`` in child processes for ``seconds``; the merged result.

    A child that dies (libFuzzer's timeout or a native crash) is restarted for
    the time left; what killed it becomes a crash entry.
    """
    result = {"target": target, "twin": twin, "inputs": 0, "seconds": 0.0, "known": {}, "crashes": [],
              "coverage": None, "implementation": None}  # fmt: skip
    end = time.monotonic() + seconds
    while True:
        left = end - time.monotonic() if engine == "atheris" else seconds
        if left < 1 and result["seconds"] > 0:
            break
        argv = [sys.executable, "-m", "tools.fuzz", "--child", "--target", target, "--engine", engine,
                "--seconds", str(max(left, 1.0)), "--examples", str(examples), "--seed", str(seed),
                "--out", str(out)] + (["--report-known"] if report_known else [])  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, env=_env(twin), capture_output=True, text=True,
                              timeout=max(left, 1.0) + 120)  # fmt: skip
        got = [json.loads(line[len(_RESULT):]) for line in proc.stdout.splitlines() if line.startswith(_RESULT)]
        cov = re.findall(r"cov: (\d+) ft: (\d+)", proc.stderr)
        if cov:
            result["coverage"] = {"edges": int(cov[-1][0]), "features": int(cov[-1][1])}
        if got:
            r = got[-1]
            result["inputs"] += r["inputs"]
            result["seconds"] += r["seconds"]
            result["implementation"] = r["implementation"]
            for k, n in r["known"].items():
                result["known"][k] = result["known"].get(k, 0) + n
            result["crashes"].extend(r["crashes"])
        else:
            result["seconds"] += time.monotonic() - t0
            written = re.findall(r"Test unit written to (\S+)", proc.stderr)
            why = "timeout (over 10 s on one input)" if "ALARM" in proc.stderr or "timeout" in proc.stderr else \
                f"child died with status {proc.returncode}"  # fmt: skip
            result["crashes"].append({"signature": why, "count": 1, "file": written[-1] if written else None,
                                      "message": proc.stderr[-2000:], "traceback": ""})  # fmt: skip
        if engine != "atheris" or got:
            break
    # One entry per signature across restarts.
    merged: dict[str, dict] = {}
    for c in result["crashes"]:
        m = merged.setdefault(c["signature"], dict(c, count=0))
        m["count"] += c["count"]
    result["crashes"] = list(merged.values())
    return result


def _save_regression(target: str, crash: dict) -> str | None:
    src = crash.get("file")
    if not src or not Path(src).is_file():
        return None
    data = Path(src).read_bytes()
    dest = REGRESSIONS / target / f"crash-{hashlib.sha1(data).hexdigest()[:12]}.bin"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return str(dest.relative_to(ROOT))


def _report(results: list[dict], save: bool) -> int:
    new = 0
    click.echo("")
    click.echo(f"{'target':<16}{'twin':<10}{'inputs':>10}{'inputs/s':>10}{'coverage':>10}  known bugs hit")
    for r in results:
        rate = r["inputs"] / r["seconds"] if r["seconds"] else 0.0
        cov = str(r["coverage"]["edges"]) if r["coverage"] else "-"
        known = ", ".join(f"{k} x{n}" for k, n in sorted(r["known"].items())) or "-"
        click.echo(f"{r['target']:<16}{r['twin']:<10}{r['inputs']:>10}{rate:>10.0f}{cov:>10}  {known}")
    for r in results:
        for c in r["crashes"]:
            new += 1
            click.echo(f"\nCRASH {r['target']} ({r['twin']} twin): {c['signature']} x{c['count']}")
            click.echo(f"  {c['message'].strip().splitlines()[-1] if c['message'].strip() else ''}")
            dest = _save_regression(r["target"], c) if save else None
            if c.get("file"):
                pure = "BUS_NO_EXTENSIONS=1 " if r["twin"] == "pure" else ""
                click.echo(f"  input: {dest or c['file']}")
                click.echo(f"  reproduce: {pure}python -m tools.fuzz --target {r['target']} --twin {r['twin']} "
                           f"--replay {dest or c['file']}")  # fmt: skip
    total = sum(r["inputs"] for r in results)
    click.echo(f"\n{total} inputs tried, {new} new crash signature(s)"
               + ("; regression inputs saved under tests/fuzz/regressions/" if new and save else ""))  # fmt: skip
    return 1 if new else 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", "targets", multiple=True, help="Target name (repeat or comma-separate); default all.")
@click.option("--seconds", type=float, default=60.0, show_default=True, help="Seconds per target and twin.")
@click.option("--twin", type=click.Choice(["compiled", "pure", "both"]), default="both", show_default=True)
@click.option("--engine", type=click.Choice(["atheris", "hypothesis"]), default=None,
              help="Default: atheris when installed, else hypothesis.")
@click.option("--examples", type=int, default=500, show_default=True, help="hypothesis: examples per round.")
@click.option("--seed", type=int, default=0, show_default=True, help="hypothesis: first seed.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(".fuzz"), show_default=True,
              help="Corpus and crash directory.")
@click.option("--report-known", is_flag=True, help="Treat the bugs of tests/fuzz/known.py as crashes too.")
@click.option("--save/--no-save", default=True, show_default=True, help="Copy new crashes into tests/fuzz/regressions.")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run one input on one target and show what it raises.")
@click.option("--child", is_flag=True, hidden=True)
def main(targets, seconds, twin, engine, examples, seed, out, report_known, save, replay, child) -> None:
    """Fuzz the frame parser, the PlaneLoop, every control handler and the parsers (issue 7)."""
    names = [n for t in targets for n in t.split(",") if n]
    out = out.resolve()
    if child:  # before anything imports the targets: atheris must instrument them as they load
        twin_dir = "pure" if os.environ.get("BUS_NO_EXTENSIONS") else "compiled"
        _child(names[0], engine, seconds, examples, seed, out / "crashes" / names[0] / twin_dir,
               out / "corpus" / names[0] if engine == "atheris" else None, report_known)  # fmt: skip
        return
    from tests.fuzz.targets import TARGETS

    names = names or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise click.UsageError(f"unknown target {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if engine is None:
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "hypothesis"
        else:
            engine = "atheris"
    if replay is not None:
        if len(names) != 1 or twin == "both":
            raise click.UsageError("--replay needs exactly one --target and --twin compiled or pure")
        if (os.environ.get("BUS_NO_EXTENSIONS") == "1") != (twin == "pure"):
            os.execvpe(sys.executable, [sys.executable, "-m", "tools.fuzz", *sys.argv[1:]], _env(twin))
        from tests.fuzz import known, targets as t

        t.setup()
        try:
            t.TARGETS[names[0]](replay.read_bytes())
        except Exception as e:
            traceback.print_exc()
            k = known.match(names[0], e)
            click.echo(f"\n{known.signature(e)}" + (f" (known bug {k.id})" if k else ""))
            sys.exit(1)
        click.echo("no crash: the input passes")
        return
    twins = TWINS if twin == "both" else (twin,)
    click.echo(f"fuzzing {', '.join(names)} with {engine} on the {' and '.join(twins)} twin(s), "
               + (f"{seconds:g}s each" if engine == "atheris" else f"{examples} examples from seed {seed}"))  # fmt: skip
    results = []
    for tw in twins:
        for name in names:
            r = run_target(name, tw, engine=engine, seconds=seconds, examples=examples, seed=seed, out=out,
                           report_known=report_known)  # fmt: skip
            want = "python" if tw == "pure" else "cython"
            if r["implementation"] not in (None, want):
                raise click.ClickException(f"the {tw} run used the {r['implementation']} twin; "
                                           "build the extension (make build) or check BUS_NO_EXTENSIONS")  # fmt: skip
            click.echo(f"  {name:<16}{tw:<10}{r['inputs']:>9} inputs, {len(r['crashes'])} crash signature(s)")
            results.append(r)
    sys.exit(_report(results, save))


if __name__ == "__main__":
    main()
