"""The Prune-OPD trainer: rollout -> score -> prune -> trimmed training -> metrics.

One :meth:`Trainer.train_step` is one rollout and its optimizer updates:

1. this data-parallel rank takes its prompts of the step;
2. the student samples ``n`` responses per prompt, at most ``budget.current`` new tokens
   (chunked online stop when ``rollout.chunk_size > 0``: the teacher scores each chunk as
   it is generated, and those scores are kept);
3. student and teacher score every response token (last pipeline stage,
   vocabulary-parallel; with chunked rollouts only the student runs here); drift events
   give reliability weights and loss weights;
4. effective lengths of the whole global batch update the ResponseBudget (identically
   on every rank);
5. the samples are split into ``training.num_mini_batches`` mini-batches; for each, the
   trimming plan is made on the last stage and broadcast to every stage, Megatron's
   schedule runs forward/backward over its trimmed micro-batches, and the optimizer steps
   (``training.num_epochs`` passes); the LR scheduler steps once and the rollout engine
   gets the new weights;
6. a step whose loss or gradients are not finite is skipped (logged); after
   ``max_consecutive_bad_steps`` in a row the run stops, keeping the last good checkpoint.

Teacher and student live on the same ranks with the same TP/PP layout (documented limit).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_opd.checkpoint import (
    check_steps_left,
    checkpoint_to_resume,
    load_checkpoint,
    save_checkpoint,
)
from megatron_opd.config.opd import OPDConfig
from megatron_opd.config.rollout import rollout_seed
from megatron_opd.distributed import ParallelGroups
from megatron_opd.prune import (
    ResponseBudget,
    drift_events,
    plan_trimming,
    reliability_weights,
)
from megatron_opd.prune.trimming import TrimPlan
from megatron_opd.rollout.batch import RolloutBatch
from megatron_opd.scoring import score_rollouts
from megatron_opd.training.forward_step import loss_tensor_names, make_forward_step
from megatron_opd.training.micro_batches import build_micro_batches, micro_batch_token_multiple
from megatron_opd.training.optimizer import (
    build_optimizer,
    gradients_are_finite,
    wrap_student_for_training,
)
from megatron_opd.training.pipeline_transport import (
    broadcast_from_last_stage,
    gather_across_data_parallel,
)
from megatron_opd.training.preemption import StopSignals, stop_after_signal
from megatron_opd.training.rollout_stats import COLUMNS, rollout_metrics, sample_stats


class TrainingStopped(RuntimeError):
    """The run stopped itself (e.g. repeated non-finite losses); the message says why."""


class Trainer:
    """Owns the models, engine, optimizer and state of one Prune-OPD run."""

    def __init__(
        self,
        config: OPDConfig,
        groups: ParallelGroups,
        components,
        *,
        stop_signals: StopSignals | None = None,
    ) -> None:
        """``components`` is a :class:`megatron_opd.training.setup.RunComponents`;
        ``stop_signals`` (installed by the caller) stops the run at a step boundary, with
        a checkpoint, when SIGTERM/SIGUSR1 arrives (:mod:`megatron_opd.training.preemption`)."""
        self.config = config
        self.groups = groups
        self.c = components
        self.stop_signals = stop_signals
        self.last_saved_step: int | None = None
        """Step of the newest checkpoint this run wrote or resumed from."""
        self.student = wrap_student_for_training(components.student_chunks, config.parallel, groups)
        self.optimizer, self.scheduler = build_optimizer(
            self.student, config.training, config.parallel, groups
        )
        self.budget = ResponseBudget.from_config(config.budget)
        self.step = 0
        self.consecutive_bad_steps = 0
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        """``eval.interval`` evaluations of this process's run: ``{"step", "eval/<set>/..."}``."""
        self.updates_per_step = config.training.num_mini_batches * config.training.num_epochs
        self.student_temperature = config.rollout.temperature or 1.0
        """The rollout's sampling temperature (greedy rollouts: 1); divides the student's
        scoring and training logits, as in the release."""
        self._forward_step = make_forward_step(
            loss_config=config.loss,
            tp_group=groups.tp_group,
            vocab_size=components.vocab_size,
            is_last_stage=groups.is_last_stage,
            device=groups.platform.device,
            old_from_scoring=self.updates_per_step > 1,
            temperature=self.student_temperature,
        )
        self.step_callbacks: list = []
        """Called as ``callback(trainer, metrics)`` after every completed step (all ranks),
        before evaluation and checkpointing: e.g. a benchmark collecting per-sample stats."""
        self.last_sample_stats: torch.Tensor | None = None
        """``[n, 7]`` per-sample facts of the last step's global batch
        (:data:`~megatron_opd.training.rollout_stats.COLUMNS`), on every rank."""
        self.announce()

    def announce(self) -> None:
        """Say once which objective is on, and warn when chunked scoring cannot pay off."""
        cfg = self.config
        self.c.log.message(cfg.prune.describe())
        if not cfg.rollout.chunk_size:
            return
        rule = cfg.prune.weight_rule()
        if not (cfg.prune.enable and cfg.prune.online_stop and rule.can_stop):
            why = (
                "prune.enable is false" if not cfg.prune.enable
                else "prune.online_stop is false" if not cfg.prune.online_stop
                else f"prune.mode=released with w_base={cfg.prune.w_base} > 0 trains every "
                "generated token"
            )  # fmt: skip
            text = (
                f"rollout.chunk_size={cfg.rollout.chunk_size} scores every chunk with the "
                f"teacher during generation, but no sample can ever stop ({why}): the chunked "
                "scoring costs time and saves none. Set rollout.chunk_size=0, or "
                "prune.mode=truncate to end responses at their stop point."
            )
            warnings.warn(text, RuntimeWarning, stacklevel=2)
            self.c.log.message("warning: " + text)

    # ------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        """JSON state saved beside the Megatron checkpoint (identical on every rank)."""
        return {
            "budget": self.budget.state_dict(),
            "data": self.c.dataset.state_dict(),
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "model": self.c.student_summary,
            "history": self.history[-1000:],
        }

    def maybe_resume(self) -> None:
        """Resume from ``checkpoint.load_dir`` (or the newest complete one in save_dir)."""
        found = checkpoint_to_resume(self.config.checkpoint)
        if found is None:
            return
        state = load_checkpoint(
            found,
            model_chunks=self.student,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            groups=self.groups,
            expected_model=self.c.student_summary,
        )
        self.step = int(state["step"])
        self.last_saved_step = self.step
        self.budget.load_state_dict(state["budget"])
        self.c.dataset.load_state_dict(state["data"])
        self.consecutive_bad_steps = int(state.get("consecutive_bad_steps", 0))
        self.history = list(state.get("history", []))
        # Steps after the checkpoint were logged by the run that died; they run again.
        self.c.log.resume_at(self.step)
        self.c.log.message(f"resumed from {found} at step {self.step}")
        check_steps_left(self.step, self.config.training.num_steps, found)
        if self.step == self.config.training.num_steps:
            self.c.log.message(
                f"the checkpoint is at training.num_steps={self.step}: nothing left to train"
            )

    def save(self) -> None:
        """Checkpoint now (all ranks)."""
        ckpt = self.config.checkpoint
        if ckpt.save_dir is None:
            return
        self.last_saved_step = self.step
        save_checkpoint(
            ckpt.save_dir,
            self.step,
            model_chunks=self.student,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.trainer_state(),
            groups=self.groups,
            keep_last=ckpt.keep_last,
        )

    def export_hf(self) -> None:
        """Write the student as an HF checkpoint to ``checkpoint.export_hf_dir`` (all ranks;
        a no-op when it is unset)."""
        target = self.config.checkpoint.export_hf_dir
        if not target:
            return
        from megatron_opd.checkpoint import unwrap_model
        from megatron_opd.conversion import export_hf_from_model

        info = self.c.student_info
        export_hf_from_model(
            [unwrap_model(chunk) for chunk in self.c.student_chunks],
            target,
            info,
            self.groups,
            tokenizer_dir=info.hf_dir or None,
            overwrite=self.config.checkpoint.export_hf_overwrite,
        )

    # ------------------------------------------------------------------ loop
    def train(self) -> list[dict[str, float]]:
        """Run until ``training.num_steps``; returns the per-step metrics."""
        cfg = self.config
        self.c.engine.sync_weights()  # an external engine (vLLM) starts from these weights
        evaluate_ends = bool(cfg.eval.datasets) and cfg.eval.interval == 0
        if evaluate_ends and self.step == 0:
            self._evaluate_and_log()  # eval.interval=0: before training ...
        while self.step < cfg.training.num_steps:
            # The step boundary: every rank takes the same decision (a world all-reduce).
            if self.stop_signals is not None and self.stop_signals.stop_requested(
                self.groups.platform.device
            ):
                stop_after_signal(self)
            start = time.perf_counter()
            metrics = self.train_step()
            metrics["time_step_wall_s"] = time.perf_counter() - start
            self.step += 1
            self.history.append({"step": self.step, **metrics})
            self.c.log.log(self.step, metrics)
            if metrics.get("skipped", 0.0):
                self.consecutive_bad_steps += 1
                self.c.log.message(
                    f"step {self.step}: non-finite loss or gradient, update skipped "
                    f"({self.consecutive_bad_steps} in a row)"
                )
                if self.consecutive_bad_steps >= cfg.training.max_consecutive_bad_steps:
                    # A skipped update never touched the weights or the optimizer: this saves
                    # the last good state (with the data position past the bad batches; with
                    # several mini-batches, the updates made before the bad one are kept).
                    self.save()
                    raise TrainingStopped(
                        f"{self.consecutive_bad_steps} steps in a row had a non-finite loss or "
                        "gradient; stopped. The last good state is the latest checkpoint in "
                        f"{cfg.checkpoint.save_dir}. Lower training.lr or check the data."
                    )
                continue
            self.consecutive_bad_steps = 0
            for callback in self.step_callbacks:
                callback(self, metrics)
            if cfg.eval.interval and cfg.eval.datasets and self.step % cfg.eval.interval == 0:
                self._evaluate_and_log()
            interval = cfg.checkpoint.save_interval
            if interval and self.step % interval == 0:
                self.save()
        if cfg.checkpoint.save_dir and self.last_saved_step != self.step:
            self.save()
        if evaluate_ends:
            self._evaluate_and_log()  # ... and after
        return self.history

    def _evaluate_and_log(self) -> None:
        start = time.perf_counter()
        scores = self.evaluate()
        seconds = time.perf_counter() - start
        self.eval_history.append({"step": self.step, **scores, "eval_seconds": seconds})
        self.c.log.log_extra(self.step, scores)

    def evaluate(self) -> dict[str, float]:
        """The student's scores on ``eval.datasets`` (``eval/<set>/<metric>``)."""
        from megatron_opd.training.evaluation import evaluate_model

        summaries = evaluate_model(
            self.student[0].module,
            self.c.tokenizer,
            self.groups,
            self.config.eval,
            vocab_size=self.c.vocab_size,
            seed=self.config.training.seed + self.step,
        )
        return {
            f"eval/{name}/{key}": float(value)
            for name, summary in summaries.items()
            for key, value in summary.items()
            if key.startswith(("avg@", "pass@"))
        }

    def train_step(self) -> dict[str, float]:
        """One rollout, then ``num_mini_batches * num_epochs`` optimizer updates on it;
        returns this step's metrics."""
        cfg = self.config
        timers: dict[str, float] = {}
        response_budget = self.response_budget()
        batch = self.rollout_and_score(timers)
        with _timed(timers, "prune"):
            self.prune(batch)
            global_effective = self._global_effective_lengths(batch)
            if cfg.budget.enable:
                self.budget.update(global_effective)
            mini_batches = [
                (rows, sub, self.plan(sub))
                for rows, sub in self.split_mini_batches(batch, cfg.training.num_mini_batches)
            ]
        loss_sum = num_tokens = 0.0
        skipped, grad_norms = False, []
        updates = [mb for _ in range(cfg.training.num_epochs) for mb in mini_batches]
        with _timed(timers, "train"):
            for _, sub, plan in updates:
                mb_loss, mb_tokens = self.forward_backward(sub, plan)
                skipped, grad_norm = self.apply_update(mb_loss, mb_tokens)
                loss_sum, num_tokens = loss_sum + mb_loss, num_tokens + mb_tokens
                if skipped:  # the rest of the step's updates are dropped with it
                    break
                grad_norms.append(grad_norm)
            if not skipped:
                self.scheduler.step(increment=1)
            if grad_norms:  # one weight push per step, however many updates changed them
                self.c.engine.sync_weights()
        metrics = self._metrics(batch, mini_batches, loss_sum, num_tokens, global_effective)
        metrics.update(self._rollout_metrics(batch, response_budget))
        metrics.update(
            {f"time_{name}_s": value for name, value in timers.items()},
            time_step_s=sum(timers.values()),
            budget=float(response_budget),
            next_budget=float(self.budget.current),
            skipped=float(skipped),
            grad_norm=sum(grad_norms) / len(grad_norms) if not skipped else float("nan"),
            lr=float(self.optimizer.param_groups[0]["lr"]),
        )
        return metrics

    def response_budget(self) -> int:
        """``max_new_tokens`` of this step's rollout."""
        cfg = self.config
        budget = self.budget.current if cfg.budget.enable else cfg.rollout.max_new_tokens
        return min(budget, cfg.rollout.max_new_tokens)

    def rollout_and_score(self, timers: dict[str, float] | None = None) -> RolloutBatch:
        """Sample this rank's responses of the step and score them (SCORE fields filled on
        the last stage)."""
        cfg, groups = self.config, self.groups
        timers = {} if timers is None else timers
        prompts, answers = self.c.dataset.next_prompts(
            dp_rank=groups.dp_rank, dp_size=groups.dp_size
        )
        max_new = self.response_budget()
        seed = rollout_seed(cfg.rollout, step=self.step, dp_rank=groups.dp_rank)
        # With one update per step the loss never reads the student's scoring-pass
        # log-probs at the teacher's ids: every student field scoring would compute comes
        # from the logits the rollout sampled from, and scoring skips the student forward.
        student_from_rollout = self.updates_per_step == 1 and getattr(
            self.c.engine, "records_student_scores", False
        )
        extra = {"student_top_k": cfg.prune.top_k} if student_from_rollout else {}
        with _timed(timers, "rollout"):
            listener = self.c.make_chunk_listener() if cfg.rollout.chunk_size else None
            sharded_before = getattr(self.c.engine, "decode_steps_on_shards", 0)
            batch = self.c.engine.generate(
                prompts, max_new_tokens=max_new, seed=seed, chunk_listener=listener, **extra
            )
            batch.extras["decode_steps_on_shards"] = (
                getattr(self.c.engine, "decode_steps_on_shards", 0) - sharded_before
            )
            batch.answers = [answers[i] for i in batch.prompt_index.tolist()]
            if listener is not None:
                batch.extras["stopped_early"] = listener.stopped_early.clone()
                batch.extras["chunk_forwards"] = (listener.chunks_scored, listener.chunks_deferred)
                # The teacher already read every generated token chunk by chunk: its scores
                # are kept, and scoring runs only the student (fused teacher scoring).
                listener.fill_scores(batch)
        with _timed(timers, "score"):
            if listener is None:
                self.c.teacher_onload()
            score_rollouts(
                batch,
                student=None if student_from_rollout else self.student[0].module,
                teacher=None if listener is not None else self.c.teacher_chunks[0],
                groups=groups,
                top_k=cfg.prune.top_k,
                micro_batch_size=self.c.score_micro_batch_size,
                vocab_size=self.c.vocab_size,
                student_temperature=self.student_temperature,
                teacher_temperature=cfg.loss.teacher_temperature,
                lean_forward=cfg.rollout.lean_decode,
            )
            self.c.teacher_offload()  # done with the teacher until the next rollout
        return batch

    # ------------------------------------------------------------------ pieces
    def prune(self, batch: RolloutBatch) -> None:
        """Drift events, reliability weights, loss weights and effective lengths of
        ``batch`` (last stage; other stages hold no scores)."""
        cfg = self.config
        if not self.groups.is_last_stage:
            return
        valid = batch.response_mask().to(batch.overlap_ratio.device)
        bad, _ = drift_events(
            metric=cfg.prune.metric,
            threshold=cfg.prune.threshold,
            valid_mask=valid,
            student_topk_ids=batch.student_topk_ids,
            teacher_topk_ids=batch.teacher_topk_ids,
            sampled_ids=batch.tokens.to(valid.device),
            teacher_topk_log_probs=batch.teacher_topk_log_probs,
            overlap=batch.overlap_ratio,  # scoring's: not computed twice
        )
        if cfg.prune.enable:
            result = reliability_weights(bad, valid, rule=cfg.prune.weight_rule())
            batch.weights = result.weights
            batch.loss_weights = result.loss_weights
            batch.effective_lengths = result.effective_length
            batch.extras["stop_position"] = result.stop_position
        else:
            batch.weights = valid.float()
            batch.loss_weights = valid.float()
            batch.effective_lengths = valid.sum(dim=1)
        batch.extras["bad_events"] = bad

    @staticmethod
    def split_mini_batches(
        batch: RolloutBatch, num_mini_batches: int
    ) -> list[tuple[torch.Tensor, RolloutBatch]]:
        """``(rows, sub_batch)`` of each of ``num_mini_batches`` interleaved, equal slices
        of ``batch``: mini-batch ``j`` takes rows ``j, j + m, j + 2m, ...``, so the ``n``
        samples of one prompt (adjacent rows) land in different mini-batches. The same on
        every stage: it depends only on the batch size."""
        if num_mini_batches == 1:
            return [(torch.arange(batch.batch_size), batch)]
        every = torch.arange(batch.batch_size)
        pieces = [every[j::num_mini_batches] for j in range(num_mini_batches)]
        return [(rows, batch.select(rows)) for rows in pieces]

    def plan(self, batch: RolloutBatch) -> TrimPlan:
        """The trimming plan of ``batch`` (made on the last stage from its loss weights,
        returned on every stage)."""
        cfg, groups = self.config, self.groups
        encoded = None
        if groups.is_last_stage:
            plan = plan_trimming(
                batch.loss_weights,
                max_tokens=cfg.training.micro_batch_tokens,
                max_rows=cfg.training.max_micro_batch_rows,
                pad_to_multiple=groups.tp_size if cfg.parallel.sequence_parallel else 1,
                trim=cfg.training.trim,
            )
            encoded = plan.to_tensor()
        encoded = broadcast_from_last_stage(encoded, groups)
        return TrimPlan.from_tensor(encoded.cpu())

    def prune_and_plan(self, batch: RolloutBatch) -> TrimPlan:
        """:meth:`prune` then :meth:`plan` of the whole batch."""
        self.prune(batch)
        return self.plan(batch)

    def _global_effective_lengths(self, batch: RolloutBatch) -> torch.Tensor:
        groups = self.groups
        local = batch.effective_lengths.to(torch.int64) if groups.is_last_stage else None
        local = broadcast_from_last_stage(local, groups)
        return gather_across_data_parallel(local.to(groups.platform.device), groups).cpu()

    def forward_backward(self, batch: RolloutBatch, plan: TrimPlan) -> tuple[float, float]:
        """Gradients of the OPD loss over the plan's micro-batches (grads left in the DDP
        buffers); returns the data-parallel ``(loss_sum, num_tokens)``."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        groups = self.groups
        micro_batches = build_micro_batches(
            batch,
            plan,
            is_last_stage=groups.is_last_stage,
            loss_tensor_names=loss_tensor_names(
                self.config.loss, old_from_scoring=self.updates_per_step > 1
            ),
            pad_to_multiple=micro_batch_token_multiple(self.config.student, self.config.parallel),
        )
        for chunk in self.student:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_backward = get_forward_backward_func()
        reports = forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro_batches),
            model=self.student,
            num_microbatches=len(micro_batches),
            seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
            micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
            forward_only=False,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=groups.platform.device)
        if groups.is_last_stage:
            for report in reports:
                totals += report["loss"].to(totals)
        # Loss sums live on the last stage of each pipeline: share them with every rank.
        totals = broadcast_from_last_stage(totals if groups.is_last_stage else None, groups)
        if groups.dp_size > 1:
            dist.all_reduce(totals, group=groups.dp_group)
        return float(totals[0]), float(totals[1])

    def apply_update(self, loss_sum: float, num_tokens: float) -> tuple[bool, float]:
        """Optimizer + LR step unless the loss or a gradient is non-finite anywhere;
        returns ``(skipped, grad_norm)``."""
        finite = torch.tensor(
            [1.0 if torch.isfinite(torch.tensor([loss_sum, num_tokens])).all() else 0.0],
            device=self.groups.platform.device,
        )
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1 or not gradients_are_finite(self.student, self.groups):
            self.optimizer.zero_grad()
            for chunk in self.student:
                chunk.zero_grad_buffer()
            return True, float("nan")
        _, grad_norm, _ = self.optimizer.step()
        return False, float(grad_norm or 0.0)

    def _rollout_metrics(self, batch: RolloutBatch, max_new_tokens: int) -> dict[str, float]:
        """Regime metrics of the global batch (:mod:`~megatron_opd.training.rollout_stats`);
        keeps the per-sample table in ``last_sample_stats``."""
        groups = self.groups
        table = None
        if groups.is_last_stage:
            table = sample_stats(
                batch,
                eos_id=self.c.tokenizer.eos_id,
                max_new_tokens=min(max_new_tokens, self.config.rollout.max_new_tokens),
                w_drop=self.config.prune.w_drop,
                positive_eps=self.config.prune.positive_eps,
                stop_position=batch.extras.get("stop_position"),
                stopped_early=batch.extras.get("stopped_early"),
            )
        table = broadcast_from_last_stage(table, groups).to(groups.platform.device)
        flat = gather_across_data_parallel(table.reshape(-1), groups)
        self.last_sample_stats = flat.reshape(-1, len(COLUMNS)).cpu()
        return rollout_metrics(self.last_sample_stats)

    def _metrics(
        self, batch, mini_batches, loss_sum, num_tokens, global_effective
    ) -> dict[str, float]:
        groups = self.groups
        metrics = {"loss": loss_sum / max(num_tokens, 1.0)}
        values = torch.zeros(13, dtype=torch.float64, device=groups.platform.device)
        # The chunked online stop's teacher forwards and deferred chunks (0 without it), and
        # the decode steps sampled on vocabulary shards (TP > 1).
        counters = (*batch.extras.get("chunk_forwards", (0, 0)),
                    batch.extras.get("decode_steps_on_shards", 0))  # fmt: skip
        values[10:13] = torch.tensor(counters, dtype=values.dtype)
        if groups.is_last_stage:
            valid = batch.response_mask().to(batch.overlap_ratio.device)
            num_valid = valid.sum()
            values[0] = (batch.overlap_ratio * valid).sum()
            values[1] = batch.extras["bad_events"].sum()
            values[2] = (batch.weights * valid).sum()
            values[3] = num_valid
            kept_lengths = torch.zeros(batch.batch_size, dtype=torch.int64)
            for rows, _, plan in mini_batches:
                kept_lengths[rows] = plan.kept_lengths.to(torch.int64)
            response_start = batch.prompt_lengths.cpu()
            kept_response = (kept_lengths - response_start).clamp(min=0)
            kept_response = torch.minimum(kept_response, batch.response_lengths.cpu())
            values[4] = kept_response.sum()
            values[5] = batch.response_lengths.sum()
            # Tokens through the training forward/backward, every epoch counted.
            values[6] = self.config.training.num_epochs * sum(
                plan.num_kept_tokens for _, _, plan in mini_batches
            )
            values[7] = batch.total_lengths().sum()
            # k1 estimate of KL(student || teacher) on the student's own samples.
            log_ratio = batch.student_sampled_log_probs - batch.teacher_sampled_log_probs
            values[8] = (log_ratio * valid).sum()
            # Expected reverse KL over the student's top-K (renormalised): far less noisy.
            student_topk = torch.log_softmax(batch.student_topk_log_probs, dim=-1)
            topk_kl = (student_topk.exp() * (batch.student_topk_log_probs
                       - batch.teacher_log_probs_at_student_ids)).sum(-1)  # fmt: skip
            values[9] = (topk_kl * valid).sum()
        values = broadcast_from_last_stage(values if groups.is_last_stage else None, groups)
        if groups.dp_size > 1:
            dist.all_reduce(values, group=groups.dp_group)
        valid_tokens = max(float(values[3]), 1.0)
        effective = global_effective.double()
        metrics.update(
            overlap_ratio_mean=float(values[0]) / valid_tokens,
            bad_event_rate=float(values[1]) / valid_tokens,
            weight_mean=float(values[2]) / valid_tokens,
            effective_length_mean=float(effective.mean()) if effective.numel() else 0.0,
            effective_length_p50=_quantile(effective, 0.5),
            effective_length_p90=_quantile(effective, 0.9),
            tokens_generated=float(values[5]),
            tokens_scored=float(values[7]),
            tokens_trained=float(values[6]),
            tokens_trimmed=float(values[3]) - float(values[4]),
            trimmed_fraction=1.0 - float(values[4]) / valid_tokens,
            reverse_kl=float(values[8]) / valid_tokens,
            reverse_kl_topk=float(values[9]) / valid_tokens,
            teacher_chunk_forwards=float(values[10]),
            chunks_deferred=float(values[11]),
            decode_steps_on_shards=float(values[12]),
        )
        return metrics


def _quantile(values: torch.Tensor, q: float) -> float:
    if values.numel() == 0:
        return 0.0
    return float(torch.quantile(values, q))


@contextmanager
def _timed(timers: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timers[name] = timers.get(name, 0.0) + time.perf_counter() - start
