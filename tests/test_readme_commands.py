"""Every command README.md and docs/*.md show (code blocks, and inline `python ...` / `ring-ext ...` spans) is
checked, so a stale command fails here instead of for a user:

- `main_ppo` commands are composed with verl's config and pass the driver's checks (verl's `validate_config`, with
  ring-ext's start-up checks inside, and the recipe key check): what runs before Ray starts. A paper-profile or
  multi-node command is only composed, with placeholders filled. README's main command also runs, e2e, as written.
- scripts (benchmarks, converters, `python -m ...` tools, the `ring-ext` CLI) exist and accept every flag shown
  (their `--help`); `ring-ext plugins` and `ring-ext recipes` run;
- test commands name test files that exist.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from shared_runs import RING1T_OVERRIDES, ResumedRun

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# inline spans that are whole commands: a script with its path, a module with arguments, a ring-ext subcommand
INLINE = r"(python \S+\.py|python -m \S+ \S|ring-ext \w|torchrun \S)"
MAIN_COMMAND = "python -m verl.trainer.main_ppo +recipe=ring1t"  # README's set-up command 1


def _code_lines(text: str) -> list[str]:
    """Command lines of ```bash blocks (continuations joined, comments dropped) and inline command spans."""
    lines, fence = [], None
    for raw in text.replace("\\\n", " ").splitlines():
        if raw.lstrip().startswith("```"):
            fence = None if fence is not None else raw.strip().removeprefix("```")
            continue
        if fence in ("bash", "sh"):
            line = re.split(r"\s+#", raw.strip(), maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
        elif fence is None:
            lines += [m for m in re.findall(r"`([^`]+)`", raw) if re.match(INLINE, m)]
    return lines


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for line in _code_lines(doc.read_text()):
            for part in line.split("&&"):
                cmd = re.sub(r"\[[^\]]*\.\.\.\]", "", part).strip()  # "[any verl override ...]"
                cmd = re.sub(r"^(\.venv/bin/)?python3? ", "python ", cmd)
                if cmd and not cmd.startswith(("bash scripts/install.sh", "pip ", "ray ")):
                    out.append((f"{doc.relative_to(ROOT)}", cmd))
    return sorted(set(out))


COMMANDS = _commands()


def _words(cmd: str) -> list[str]:
    return shlex.split(re.sub(r"<[^>]+>", "1", cmd))  # "<tokens>" placeholders become 1


def _kind(words: list[str]) -> str:
    if words[:3] == ["python", "-m", "verl.trainer.main_ppo"]:
        return "main_ppo"
    if "pytest" in words:
        return "pytest"
    if words[0] == "torchrun":
        return "sft"
    return "script"


def test_the_docs_show_commands_of_every_kind() -> None:
    kinds = {_kind(_words(c)) for _, c in COMMANDS}
    assert {"main_ppo", "pytest", "script"} <= kinds, COMMANDS
    assert any(c == MAIN_COMMAND for _, c in COMMANDS)


@pytest.mark.parametrize("doc, cmd", [c for c in COMMANDS if _kind(_words(c[1])) == "main_ppo"])
def test_main_ppo_command_composes_and_passes_the_driver_checks(doc: str, cmd: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import verl  # noqa: F401  (loads the plugins: their start-up checks wrap verl's validate_config)
    from verl.trainer.main_ppo import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from ring_ext.config_check import check_config_keys
    from ring_ext.verl_config import compose_verl

    monkeypatch.chdir(tmp_path)
    overrides = [w for w in _words(cmd)[3:] if "=" in w]
    cfg = compose_verl(overrides)
    check_config_keys(cfg)
    if cfg.get("model_engine") == "megatron":  # as README says: on CPU it stops before Ray, naming +recipe=ring1t
        with pytest.raises(ValueError, match=r"trains on CUDA GPUs only.*\+recipe=ring1t instead"):
            validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
        return
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


@pytest.mark.parametrize("doc, cmd", [c for c in COMMANDS if _kind(_words(c[1])) == "pytest"])
def test_test_command_names_existing_tests(doc: str, cmd: str) -> None:
    paths = [w for w in _words(cmd) if "/" in w or w.endswith(".py")]
    assert all((ROOT / p.split("::")[0]).exists() for p in paths), cmd


@functools.cache
def _run(argv: tuple[str, ...]) -> str:
    """A command's stdout, once per session: several pages show the same command (`ring-ext plugins` on seven), and
    each run imports verl and every plugin (6-9 s on 2 cores)."""
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _help(words: list[str]) -> str:
    if words[0] == "ring-ext":
        argv = [sys.executable, "-m", "ring_ext.cli", *[w for w in words[1:2] if not w.startswith("-")], "--help"]
    elif words[1] == "-m":
        argv = [sys.executable, "-m", words[2], "--help"]
    else:
        assert (ROOT / words[1]).is_file(), f"{words[1]} does not exist"
        argv = [sys.executable, words[1], "--help"]
    return _run(tuple(argv))


@pytest.mark.parametrize("doc, cmd", [c for c in COMMANDS if _kind(_words(c[1])) in ("script", "sft")])
def test_script_exists_and_takes_every_flag_shown(doc: str, cmd: str) -> None:
    words = _words(cmd)
    if words[0] == "torchrun":  # verl's SFT trainer: its recipe composes (tests/test_stage_recipes.py composes more)
        from ring_ext.verl_config import compose_verl

        compose_verl([w for w in words if "=" in w and not w.startswith("--")], config_name="sft_trainer_engine")
        return
    text = _help(words)
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    assert all(f in text for f in flags), (cmd, [f for f in flags if f not in text])
    if words[:2] in (["ring-ext", "plugins"], ["ring-ext", "recipes"]):
        assert _run((sys.executable, "-m", "ring_ext.cli", *words[1:])).strip()


@pytest.mark.e2e
def test_readme_main_command_trains_the_ring1t_loop(ring1t_run: ResumedRun) -> None:
    """README's set-up command 1 as written (the session's ring1t run, first process: its loggers, console and
    wandb, plus verl's file logger to read the steps): 3 steps of GRPO + IcePop + C3PO++ on the tiny default, wandb's
    files under the run's directory, and an end without a traceback (wandb's atexit teardown used to print a
    ConnectionResetError)."""
    assert ["python", "-m", "verl.trainer.main_ppo", *RING1T_OVERRIDES] == _words(MAIN_COMMAND)
    first = [ring1t_run.steps[s] for s in ring1t_run.first_steps if s > 0]
    assert [s for s in ring1t_run.first_steps if "c3po/budget_used" in ring1t_run.steps[s]] == [1, 2, 3]
    assert all(0.0 < d["actor/mismatch/kept_frac"] <= 1.0 for d in first)
    log = ring1t_run.log
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    # the pool's groups still decoding after the last step are stopped before the run's actors exit (else each
    # request dies under them with a traceback, as often as the exit races them)
    ended = re.findall(r"rollouts ended after the last step: (\d+) prompt groups in flight", log)
    assert len(ended) == 1 and int(ended[0]) > 0, ended
    workdir = ring1t_run.workdir
    assert not (workdir / "wandb").exists() and list((workdir / "checkpoints").glob("*/*/wandb/offline-run-*"))


TOP = ("ring_ext", "plugins", "tests", "docs", "benchmarks", "scripts", "recipes", "experiments", "hydra_conf",
       "hydra_plugins", ".ci")
# a repo path in a span or link: starts at a top-level folder of this repository; `<...>` placeholders and globs are
# output locations of a run, not files of the repository
_PATH = re.compile(r"(?<![\w./<-])((?:%s)/[^\s`()\[\],;'\"]*)" % "|".join(re.escape(t) for t in TOP))


def _named_paths() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks: the command tests read them
        spans = re.findall(r"`([^`]+)`", text) + re.findall(r"\]\(([^)#\s]+)", text)
        for span in spans:
            for path in _PATH.findall(span):
                if not re.search(r"[*{<\[]", path):
                    out.append((str(doc.relative_to(ROOT)), re.split(r"::|#", path)[0].rstrip(".:")))
        for link in re.findall(r"\]\(([^)#\s]+)", text):  # relative links resolve from the page's folder
            if "://" in link:
                continue
            out.append((str(doc.relative_to(ROOT)), str((doc.parent / link).resolve().relative_to(ROOT))))
    return sorted(set(out))


def test_every_file_path_named_in_readme_and_docs_exists() -> None:
    """A path a page names exists, or is where a committed script writes its results (named in that script)."""
    named = _named_paths()
    assert len(named) > 50, named  # the pattern still finds the paths the pages name
    writers = "\n".join(f.read_text() for f in [*(ROOT / "scripts").iterdir(), *(ROOT / "benchmarks").glob("*.py")]
                        if f.is_file())
    missing = [f"{doc}: {path}" for doc, path in named if not (ROOT / path).exists() and path not in writers]
    assert not missing, "\n".join(missing)
