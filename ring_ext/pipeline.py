"""`ring-ext pipeline ring1t`: Long-CoT SFT -> reasoning RL -> general RL, each stage from the last one's model.

Every stage is verl's own entry point in a subprocess (`verl.trainer.sft_trainer` under torchrun, then
`verl.trainer.main_ppo`) with a ring-ext recipe; the pipeline only hands checkpoints over:

    <workdir>/sft/ckpt/global_step_N/huggingface          -> rlvr's actor_rollout_ref.model.path
    <workdir>/rlvr/ckpt/global_step_N/actor/huggingface   -> rlhf's actor_rollout_ref.model.path

`<workdir>/pipeline.json` records each finished stage (its model, steps, first/last reward, time); a rerun
skips those, and a stage that died mid-way resumes from its own last checkpoint (verl's resume_mode=auto).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ring_ext.known_plugins import by_distribution
from ring_ext.verl_run import MAIN_PPO, run_verl, sft_command

STATE_FILE = "pipeline.json"
LATEST = "latest_checkpointed_iteration.txt"  # written by verl's SFT and PPO checkpointing alike


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str
    metric: str  # the per-step number reported before/after
    needs: tuple[str, ...] = ()  # distributions of the ring-ext plugins the recipe uses

    @property
    def is_sft(self) -> bool:
        return self.recipe.endswith("_sft")


PIPELINES: dict[str, tuple[Stage, ...]] = {
    "ring1t": (
        Stage("sft", "ring1t_sft", "train/loss"),
        Stage("rlvr", "ring1t_rlvr", "critic/score/mean",
              needs=("ring-ext-icepop", "ring-ext-c3po")),
        Stage("rlhf", "ring1t_rlhf", "critic/score/mean"),
    ),
}


class PipelineError(RuntimeError):
    pass


@dataclass
class StageResult:
    model: str  # HF directory the next stage starts from
    steps: int
    metric: str
    first: float | None
    last: float | None
    seconds: float


@dataclass
class PipelineState:
    stages: dict[str, StageResult] = field(default_factory=dict)

    @classmethod
    def load(cls, workdir: Path) -> PipelineState:
        path = workdir / STATE_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        return cls({name: StageResult(**r) for name, r in raw["stages"].items()})

    def save(self, workdir: Path) -> None:
        tmp = workdir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps({"stages": {n: asdict(r) for n, r in self.stages.items()}}, indent=2))
        tmp.replace(workdir / STATE_FILE)  # a crash never leaves half a state file


def check_plugins(stages: Sequence[Stage]) -> None:
    """Fail before the first stage starts, not after an hour of SFT, when a later recipe's plugin is missing."""
    missing = sorted({dist for s in stages for dist in s.needs if not by_distribution(dist).installed()})
    if missing:
        raise PipelineError(f"the pipeline's recipes need {', '.join(missing)}: pip install {' '.join(missing)}")


def last_checkpoint(ckpt_dir: Path) -> int:
    tracker = ckpt_dir / LATEST
    if not tracker.exists():
        raise PipelineError(f"no checkpoint in {ckpt_dir} (missing {LATEST}): the stage saved nothing")
    return int(tracker.read_text().strip())


def stage_model(stage: Stage, ckpt_dir: Path) -> Path:
    step_dir = ckpt_dir / f"global_step_{last_checkpoint(ckpt_dir)}"
    model = step_dir / "huggingface" if stage.is_sft else step_dir / "actor" / "huggingface"
    if not (model / "config.json").exists() or not any(model.glob("*.safetensors")):
        raise PipelineError(f"{model} holds no HF weights: the stage must save hf_model")
    return model


def total_steps(stage: Stage, overrides: Sequence[str]) -> int | None:
    """The stage's `trainer.total_training_steps` as verl will see it (None: set by epochs), for progress bars."""
    from omegaconf import OmegaConf

    from ring_ext.verl_config import compose_verl

    config = "sft_trainer_engine" if stage.is_sft else "ppo_trainer"
    cfg = compose_verl([f"+recipe={stage.recipe}", *overrides], config_name=config)
    value = OmegaConf.select(cfg, "trainer.total_training_steps")
    return value if isinstance(value, int) else None


def stage_overrides(stage: Stage, ckpt_dir: Path, model: str | None, save_freq: int) -> list[str]:
    """What the pipeline adds to a stage's recipe: where to save, HF weights for hand-over, where to start.

    (ring1t_sft already saves HF weights; the RL recipes do not, as most runs need no HF copy per checkpoint.)"""
    out = [f"+recipe={stage.recipe}", f"trainer.default_local_dir={ckpt_dir}", f"trainer.save_freq={save_freq}"]
    if stage.is_sft:
        if model is not None:
            out.append(f"model.path={model}")
    else:
        out.append("actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]")
        if model is not None:
            out.append(f"actor_rollout_ref.model.path={model}")
    return out


def run_pipeline(name: str, workdir: Path, *, overrides: Mapping[str, Sequence[str]] | None = None,
                 model: str | None = None, start_at: str | None = None, save_freq: int = 50, nproc: int = 1,
                 timeout: float = 7200,
                 on_step: Callable[[Stage, dict], None] | None = None,
                 on_stage: Callable[[Stage, StageResult | None], None] | None = None) -> PipelineState:
    """Run the stages of pipeline `name` in order; `overrides[stage]` are extra Hydra overrides for it.

    `model` is the first stage's starting model (default: the recipe's); `start_at` skips the stages before it
    (e.g. SFT done elsewhere: start_at="rlvr" with model=<its HF dir>). `on_stage(stage, None)` is called when
    a stage starts, `on_stage(stage, result)` when it ends or is skipped as already done.
    """
    stages = PIPELINES[name]
    names = [s.name for s in stages]
    unknown = set(overrides or {}) - set(names)
    if unknown:
        raise PipelineError(f"overrides for unknown stage(s) {sorted(unknown)}; stages: {names}")
    if start_at is not None:
        if start_at not in names:
            raise PipelineError(f"cannot start at {start_at!r}; stages: {names}")
        if model is None and start_at != names[0]:
            raise PipelineError(
                f"starting at {start_at!r} needs the model the earlier stages would have made (model=...)")
        stages = stages[names.index(start_at):]
    check_plugins(stages)
    workdir.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(workdir)
    for stage in stages:
        done = state.stages.get(stage.name)
        if done is not None:
            model = done.model
            if on_stage:
                on_stage(stage, done)
            continue
        if on_stage:
            on_stage(stage, None)
        stage_dir = workdir / stage.name
        stage_dir.mkdir(exist_ok=True)
        cmd = sft_command(nproc) if stage.is_sft else MAIN_PPO
        extra = [*stage_overrides(stage, stage_dir / "ckpt", model, save_freq), *(overrides or {}).get(stage.name, ())]
        start = time.monotonic()
        run = run_verl(cmd, extra, stage_dir, name=stage.name, timeout=timeout,
                       on_step=(lambda rec, s=stage: on_step(s, rec)) if on_step else None)
        values = [r["data"][stage.metric] for r in run.steps if stage.metric in r["data"]]
        result = StageResult(
            model=str(stage_model(stage, stage_dir / "ckpt")),
            steps=max((r["step"] for r in run.steps), default=0),
            metric=stage.metric,
            first=values[0] if values else None,
            last=values[-1] if values else None,
            seconds=round(time.monotonic() - start, 1),
        )
        state.stages[stage.name] = result
        state.save(workdir)
        model = result.model
        if on_stage:
            on_stage(stage, result)
    return state


def summary_table(state: PipelineState) -> str:
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    rows = ["| stage | steps | metric | first step | last step | time (s) |", "|---|---|---|---|---|---|"]
    rows += [f"| {n} | {r.steps} | {r.metric} | {num(r.first)} | {num(r.last)} | {r.seconds:.0f} |"
             for n, r in state.stages.items()]
    return "\n".join(rows)
