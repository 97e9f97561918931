"""GRPO through TRL's ``GRPOTrainer``: the reinforcement-learning baseline for ``es``.

Each phase is handed to TRL: the phase's training prompts (already rendered in the task's
format), the same verifiable reward as ``es`` (exact answer plus ``format_weight`` for the
expected format), ``train.max_steps`` updates at ``train.lr``. Defaults follow the ES vs
GRPO forgetting comparison: KL beta 0.001 (set ``train.lr: 1.0e-6`` as it does). On CPU
bf16 is off and generation runs in transformers (no vLLM). ``lora+grpo`` trains the
adapter and needs no reference copy (TRL disables the adapter instead).
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from retain.errors import RetainError
from retain.rewards import FormatPattern, RewardKind, score
from retain.strategies.base import Context, Strategy, register


class GRPOOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(default=0.001, ge=0, description="KL penalty toward the reference model")
    num_generations: int = Field(default=4, ge=2, description="completions sampled per prompt (the group)")
    max_completion_length: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    reward: RewardKind = "exact"
    format_weight: float = Field(default=0.1, ge=0)
    format_pattern: FormatPattern = None


@register
class GRPO(Strategy):
    name = "grpo"
    not_private = "it trains each phase with TRL's trainer, which Opacus does not wrap"
    data_parallel = "it trains each phase with TRL's trainer, outside the loop's split step"
    sharded = "it trains each phase with TRL's trainer, outside the loop's step"
    summary = "GRPO with TRL's GRPOTrainer on the task's verifiable reward (the RL baseline for es)"
    options_key = "grpo"
    Options = GRPOOptions
    # TRL trains the weights the owner made trainable on the phase's own prompts, with its own
    # optimizer and schedule: every other training hook is refused (see base.refusal).
    honours = frozenset({"trainable_parameters"})
    # TRL's trainer runs the phase outside the loop: a kill inside it loses that phase.
    resumes_mid_phase = False
    incompatible = {"lora-per-task": "TRL's GRPO trainer works on a PEFT model's one adapter named 'default', "
                                     "and lora-per-task trains an adapter per task"}

    def __init__(self, options: GRPOOptions | None = None) -> None:
        super().__init__(options)
        self._stats: dict = {}

    def check(self, config, stream) -> None:
        bad = [t.name for t in stream.tasks if t.metric == "perplexity"]
        if bad:
            raise ValueError(f"grpo needs tasks with answers to reward; '{bad[0]}' is scored by perplexity")
        if config.train.batch_size % self.options.num_generations:
            raise ValueError(f"train.batch_size ({config.train.batch_size}) must be a multiple of "
                             f"grpo.num_generations ({self.options.num_generations})")

    def reward_fn(self):
        o = self.options

        def reward(prompts, completions, answer, **_):
            return [score(o.reward, c, p, a, o.format_weight, o.format_pattern)
                    for p, c, a in zip(prompts, completions, answer)]
        return reward

    def train_phase(self, ctx: Context, tasks, steps: int, on_step: Callable[[float, int], None]) -> bool:
        from datasets import Dataset
        from peft import PeftModel
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        o, cfg = self.options, ctx.config
        rows = [{"prompt": t.prompt(ctx.tokenizer, ex), "answer": t.target(ex.output)} for t in tasks for ex in t.train]
        model = ctx.accelerator.unwrap_model(ctx.model)

        class Relay(TrainerCallback):
            """TRL's per-step logs -> the loop's progress, analysis and timings."""

            seen_tokens = 0

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and math.isnan(float(logs.get("grad_norm", 0.0))):
                    # Stop here: the NaN weights would next fail deep inside sampling (a CUDA assert).
                    hint = (" bf16 GRPO gave NaN gradients on CUDA in retain's GPU check; set train.precision: no"
                            if cfg.train.precision != "no" else "")
                    raise RetainError(f"grpo: the gradient is NaN at step {state.global_step} of phase {ctx.phase}."
                                      + hint)
                if logs and "loss" in logs and "num_tokens" in logs:
                    tokens = int(logs["num_tokens"]) - Relay.seen_tokens
                    Relay.seen_tokens = int(logs["num_tokens"])
                    rewards.append(float(logs.get("reward", 0.0)))
                    on_step(float(logs["loss"]), tokens)

        rewards: list[float] = []
        name_or_path = model.config._name_or_path
        with tempfile.TemporaryDirectory() as tmp:
            if o.beta > 0 and not isinstance(model, PeftModel) and not os.path.isdir(model.config._name_or_path or ""):
                # TRL builds its reference model from the policy's path: give it one.
                model.save_pretrained(tmp)
                model.config._name_or_path = tmp
            args = GRPOConfig(
                output_dir=tmp, max_steps=steps, per_device_train_batch_size=cfg.train.batch_size,
                num_generations=o.num_generations, max_completion_length=o.max_completion_length,
                temperature=o.temperature, learning_rate=cfg.train.lr, beta=o.beta, warmup_steps=cfg.train.warmup_steps,
                max_grad_norm=cfg.train.max_grad_norm or 0.0, seed=ctx.phase_seed,
                bf16=cfg.train.precision == "bf16", use_cpu=not ctx.accelerator.device.type == "cuda",
                use_vllm=False, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
            )
            trainer = GRPOTrainer(model=model, reward_funcs=self.reward_fn(), args=args,
                                  train_dataset=Dataset.from_list(rows), processing_class=ctx.tokenizer,
                                  callbacks=[Relay()])
            # disable_tqdm makes the Trainer print every log dict instead; the loop's bar shows progress.
            trainer.remove_callback(PrinterCallback)
            try:
                trainer.train()
            finally:
                model.config._name_or_path = name_or_path
                # TRL adds a frozen copy of the adapter as its reference; the next phase's
                # trainer adds its own, so this one goes.
                if isinstance(model, PeftModel) and "ref" in model.peft_config:
                    model.delete_adapter("ref")
                    model.set_adapter("default")
        self._stats = {"reward_first": rewards[0] if rewards else None,
                       "reward_last": rewards[-1] if rewards else None}
        return True

    def stats(self) -> dict:
        return self._stats
