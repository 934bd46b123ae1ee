"""`GETATrainer`: GETA inside the Hugging Face `Trainer` (public hooks only)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
from transformers import TrainerCallback

from ..compress.estimate import BopsEstimator
from ..config import GETAConfig
from ..graph.qadg import build_qadg
from ..quant.prepare import prepare_model
from ..utils import tune_cpu_allocator
from .card import GETA_TAGS
from .distill import DistillationTrainer
from . import peft as peft_support
from .resume import check_checkpoint, check_resume_state, checkpoint_step, last_complete_checkpoint
from .serialization import compress_model, save_compressed

__all__ = ["GETATrainer", "GETACallback", "STAGES"]

logger = logging.getLogger(__name__)

STAGES = ("warmup", "projection", "joint", "cooldown")


def _tensors_only(batch: Mapping[str, Any], rows: Optional[int] = None) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v[:rows] if (rows is not None and v.dim() > 0) else v
    return out


#: ``--optim`` values that mean "the default AdamW": QASSO's dense step is then AdamW
_DEFAULT_OPTIMS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


def _check_optim(args) -> None:
    """QASSO is the optimizer: a non-default ``--optim`` would be silently ignored, so refuse it."""
    optim = getattr(args, "optim", None)
    name = getattr(optim, "value", optim)
    if name is not None and name not in _DEFAULT_OPTIMS:
        raise ValueError(f"GETATrainer: --optim {name} is not supported: the optimizer is GETA's "
                         "QASSO, whose dense step is chosen with --geta_optimizer (one of "
                         "'adamw', 'adam', 'sgd'); leave --optim at its default")


def _push_only_at_end(args) -> None:
    """With ``push_to_hub``, checkpoints are not pushed (``hub_strategy='end'``, the default of
    :class:`GETATrainingArguments`): they hold the fake-quantized training model, which would
    replace the compressed model on the Hub."""
    from transformers.trainer_utils import HubStrategy

    if getattr(args, "push_to_hub", False) and args.hub_strategy != HubStrategy.END:
        raise ValueError(f"GETATrainer: --hub_strategy "
                         f"{getattr(args.hub_strategy, 'value', args.hub_strategy)} is not "
                         "supported with --push_to_hub; allowed: 'end' (the Hub receives the "
                         "compressed model once, from push_to_hub(), not the fake-quantized "
                         "checkpoints)")


class GETACallback(TrainerCallback):
    """Logs a progress line (``logging``, logger ``geta_hf.hf.trainer``) whenever QASSO enters a
    new stage, and asks the Trainer for a log there (so the ``geta/*`` figures are recorded)."""

    def __init__(self, trainer: "GETATrainer") -> None:
        self.trainer = trainer
        self.last_stage: Optional[str] = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Start from the stage of the last completed step (of the checkpoint, on resume), so
        that a resumed run logs the same stage changes as an uninterrupted one."""
        opt = self.trainer.geta_optimizer
        self.last_stage = opt.stage if opt is not None and state.global_step > 0 else None
        return control

    def on_step_end(self, args, state, control, **kwargs):
        """Ask for a log line when QASSO's stage changes."""
        opt = self.trainer.geta_optimizer
        if opt is None:
            return control
        stage = opt.stage
        if stage != self.last_stage:
            if self.last_stage is not None:
                control.should_log = True
                if state.is_world_process_zero:
                    d = opt.describe()
                    logger.info("[geta] step %d/%d: %s -> %s (weight bits <= %s, group sparsity "
                                "%.3f, avg weight bits %.2f)", state.global_step, state.max_steps,
                                self.last_stage, stage, d["b_u_weight"], d["group_sparsity"],
                                d["avg_weight_bits"] or 0.0)
            self.last_stage = stage
        return control


class GETATrainer(DistillationTrainer):
    """A `transformers.Trainer` that trains with GETA and yields a compressed model.

    On construction it inserts the quantizers (:func:`geta_hf.prepare_model`), initialises input
    ranges from the first training batches, and builds the pruning search space
    (:func:`geta_hf.build_qadg`) from one collated training batch. `create_optimizer` creates
    :class:`geta_hf.QASSO` with the Trainer's own step count, so every LR scheduler, gradient
    accumulation, ``max_grad_norm``, evaluation, checkpointing, ``resume_from_checkpoint`` and
    distributed data parallelism work as with `Trainer`. GETA's figures (stage, group sparsity,
    bits, estimated relative BOPs, steps skipped for a NaN/Inf gradient) are added to every
    training log. A step whose gradients hold NaN or Inf is skipped by QASSO with a warning
    (weights, quantizers and optimizer state untouched), and ``resume_from_checkpoint`` never
    picks a checkpoint that an interrupted save left incomplete.

    With ``teacher_model=`` it also distils (see :class:`geta_hf.DistillationTrainer`): the loss
    becomes ``(1 - w) * task_loss + w * KD`` with ``w``/``T`` from ``distillation_weight`` /
    ``distillation_temperature`` or ``--geta_distillation_weight`` /
    ``--geta_distillation_temperature``. The teacher is neither prepared for quantization nor
    pruned nor optimized.

    Args:
        geta_config: the :class:`geta_hf.GETAConfig`; by default taken from
            :class:`GETATrainingArguments` (``args.to_geta_config()``).
        example_inputs: the batch used for the search space and the BOP estimate (default: the
            first training batch).
        teacher_model, distillation_weight, distillation_temperature: knowledge distillation,
            as for :class:`geta_hf.DistillationTrainer` (default: no teacher).
        Everything else as for `transformers.Trainer`.

    The model's forward is assumed to return a mean loss that ignores ``num_items_in_batch``
    (true of HF's task heads with ``labels``/positions): the Trainer then averages over
    gradient-accumulation steps itself, avoiding the loss-scaling trap of HF-NOTES.
    """

    def __init__(self, model=None, args=None, *a, geta_config: Optional[GETAConfig] = None,
                 example_inputs: Optional[Mapping[str, torch.Tensor]] = None, **kwargs) -> None:
        if model is None:
            raise ValueError("GETATrainer: pass the model (model_init is not supported: the model "
                             "is prepared for quantization once, at construction)")
        if geta_config is None:
            if hasattr(args, "to_geta_config"):
                geta_config = args.to_geta_config()
            else:
                raise ValueError("GETATrainer: pass geta_config=GETAConfig(...) or use "
                                 "GETATrainingArguments")
        if not isinstance(geta_config, GETAConfig):
            raise TypeError(f"GETATrainer: geta_config must be a GETAConfig, got {type(geta_config).__name__}")
        opts = kwargs.get("optimizers")
        if opts is not None and opts[0] is not None:
            raise ValueError("GETATrainer: the optimizer is QASSO, created by the trainer; do not pass "
                             "`optimizers`")
        self.geta_config = geta_config
        #: the config GETA runs with: ``geta_config``, or for a PEFT model its variant that
        #: compresses the frozen base (see :mod:`geta_hf.hf.peft`); ``geta_config`` is unchanged
        self._geta_run_config = geta_config
        _check_optim(args)
        _push_only_at_end(args)
        super().__init__(model, args, *a, **kwargs)
        if getattr(self.args, "geta_tune_cpu_allocator", True) and self.args.device.type == "cpu":
            tune_cpu_allocator()
        # HF task heads return a mean loss and ignore num_items_in_batch: let the Trainer average
        # over accumulation steps (see HF-NOTES, "loss-scaling trap").
        self.model_accepts_loss_kwargs = False
        self._geta_total_steps: Optional[int] = None
        self._geta_step_offset = 0  # trainer steps done before QASSO's step 0 (a restart)
        if hasattr(self.model, "add_model_tags"):  # the Trainer's own card says it was GETA
            self.model.add_model_tags(list(GETA_TAGS))
        self._geta_setup(example_inputs)
        self.add_callback(GETACallback(self))

    # ------------------------------------------------------------------ set-up
    def _setup_batches(self, n: int):
        if self.train_dataset is None:
            raise ValueError("GETATrainer: a train_dataset is needed to set GETA up")
        loader = self.get_eval_dataloader(self.train_dataset)  # sequential: no RNG is consumed
        out = []
        for batch in loader:
            out.append(_tensors_only(batch))
            if len(out) >= n:
                break
        if not out:
            raise ValueError("GETATrainer: the train_dataset produced no batch")
        return out

    def _geta_setup(self, example_inputs) -> None:
        model = self.model
        self._geta_peft = peft_support.is_peft_model(model)
        if self._geta_peft:  # compress the base model, train the adapters (hf/peft.py)
            peft_support.check_supported(model)
            self._geta_run_config = peft_support.run_config(self.geta_config, model)
        cfg = self._geta_run_config
        n = cfg.act_calibration_batches if cfg.quantize_activations else 1
        batches = self._setup_batches(n)
        prepare_model(model, cfg, calibration_data=batches if cfg.quantize_activations else None)
        example = dict(example_inputs) if example_inputs is not None else _tensors_only(batches[0], rows=2)
        self._geta_example = example
        if self._geta_peft:
            peft_support.attach_adapters(model)
        self.qadg = build_qadg(model, example, cfg)
        if self._geta_peft:
            self.qadg = peft_support.adapter_members(self.qadg, model)
        self._bops = BopsEstimator(model, self.qadg, example)

    # ------------------------------------------------------------------ public hooks
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, resuming only from a *complete* checkpoint.

        ``resume_from_checkpoint=True`` picks the newest complete ``checkpoint-N`` of
        ``output_dir`` (a folder left partial by an interrupted save is skipped with a warning);
        an explicit path to an incomplete checkpoint raises
        :class:`geta_hf.hf.resume.IncompleteCheckpointError` instead of failing deep inside the
        load. See :mod:`geta_hf.hf.resume`.

        The checkpoint must also continue *this* run: it must hold the optimizer (QASSO) state,
        written with the same ``--geta_*`` settings on the same search space; otherwise
        :class:`geta_hf.hf.resume.ResumeStateError` names the missing files or every differing
        flag. With ``--geta_restart_compression_on_resume`` a checkpoint without optimizer state
        (``save_only_model=True``) is accepted: the compression restarts from its weights and
        runs its whole schedule over the remaining steps (logged).
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"GETATrainer.train: resume_from_checkpoint=True but "
                                 f"output_dir={self.args.output_dir!r} holds no complete "
                                 "checkpoint-N folder")
        elif isinstance(resume_from_checkpoint, str):
            check_checkpoint(resume_from_checkpoint)
        self._geta_step_offset = 0
        if isinstance(resume_from_checkpoint, str):
            self._geta_check_resume(resume_from_checkpoint)
            if self._geta_peft:  # the base model's quantizers and pruned rows (hf/peft.py)
                peft_support.load_base_state(self.accelerator.unwrap_model(self.model), self.qadg,
                                             resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; for a PEFT model also GETA's changes to the base model (its
        quantizers and pruned rows, which peft's adapter file lacks) in
        ``geta_base_state.safetensors``, so checkpoints resume exactly."""
        super().save_model(output_dir, _internal_call)
        if self._geta_peft and self.is_world_process_zero():
            peft_support.save_base_state(self.accelerator.unwrap_model(self.model), self.qadg,
                                         output_dir or self.args.output_dir)

    def _geta_check_resume(self, path: str) -> None:
        """Refuse a checkpoint that cannot continue this run (see :meth:`train`)."""
        from ..optim.layout import QuantTable, trained_quant_layers
        from ..optim.state import search_space

        cfg = self._geta_run_config
        space = search_space(self.qadg, QuantTable(trained_quant_layers(self.model,
                                                                        cfg.compress_frozen)))
        restart = bool(getattr(self.args, "geta_restart_compression_on_resume", False))
        if not check_resume_state(path, cfg, space, restart=restart):
            self._geta_step_offset = checkpoint_step(path)
            logger.warning("GETATrainer: %s holds no optimizer state; restarting the compression "
                           "from its weights at step %d (--geta_restart_compression_on_resume): "
                           "QASSO runs its whole schedule over the remaining steps", path,
                           self._geta_step_offset)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """Remember the run's step count (QASSO's schedule needs it), then the Trainer's own."""
        self._geta_total_steps = int(num_training_steps)
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        """Build :class:`geta_hf.QASSO` over the model's parameters (once)."""
        if self.optimizer is None:
            from ..optim import QASSO

            total = self._geta_total_steps or getattr(self.state, "max_steps", 0)
            if not total or total < 1:
                raise RuntimeError("GETATrainer.create_optimizer: the number of training steps is "
                                   "unknown; create the optimizer through trainer.train()")
            total -= self._geta_step_offset  # a restarted compression runs over what remains
            if total < 1:
                raise ValueError(f"GETATrainer: cannot restart the compression at step "
                                 f"{self._geta_step_offset}: the run has no steps left "
                                 "(raise --max_steps or --num_train_epochs)")
            args = self.args
            opt_model = self.model if model is None else model
            # the Trainer's own weight-decay split: biases and norm weights do not decay
            decayed = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = QASSO(
                opt_model, self.qadg, self._geta_run_config,
                lr=args.learning_rate, variant=getattr(args, "geta_optimizer", "adamw"),
                total_steps=int(total), weight_decay=args.weight_decay,
                betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                bops_estimator=self._bops,
                no_decay=[p for n, p in opt_model.named_parameters() if n not in decayed])
        return self.optimizer

    @property
    def geta_optimizer(self):
        """The QASSO instance (unwrapped from Accelerate's optimizer wrapper), or None."""
        opt = self.optimizer
        opt = getattr(opt, "optimizer", opt)
        return opt if opt is not None and hasattr(opt, "describe") else None

    def geta_metrics(self) -> Dict[str, float]:
        """GETA's current figures as floats (what `log` adds to the training logs)."""
        opt = self.geta_optimizer
        if opt is None:
            return {}
        d = opt.describe()
        est = self._bops.estimate(self.model)
        out = {"geta/stage": float(STAGES.index(d["stage"])),
               "geta/group_sparsity": float(d["group_sparsity"]),
               "geta/zero_units": float(d["zero_units"]),
               "geta/relative_bops": float(est["relative_bops"]),
               "geta/relative_macs": float(est["relative_macs"])}
        if d.get("avg_weight_bits") is not None:
            out["geta/avg_weight_bits"] = float(d["avg_weight_bits"])
        if d.get("avg_act_bits") is not None:
            out["geta/avg_act_bits"] = float(d["avg_act_bits"])
        if d.get("b_u_weight") is not None:
            out["geta/max_weight_bits"] = float(d["b_u_weight"])
        out["geta/skipped_steps"] = float(d["skipped_steps"])
        return out

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, with GETA's metrics added to training-loss entries."""
        if any(k in logs for k in ("loss", "train_loss")):
            logs = {**logs, **self.geta_metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ results
    def compressed_model(self):
        """A physically compressed copy of the trained model (the trainer's model is untouched).

        A PEFT model's adapters are merged into the base first; the result is the compressed
        base transformers model (see :mod:`geta_hf.hf.peft`)."""
        model = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        model.eval()
        qadg = self.qadg
        if self._geta_peft:
            model = peft_support.merged_base_model(model)
            qadg = build_qadg(model, self._geta_example, self._geta_run_config)
        compress_model(model, qadg, example_inputs=self._geta_example)
        return model

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, revision: Optional[str] = None, **kwargs):
        """Upload the **compressed** model, its tokenizer and the GETA model card.

        Written first to ``<output_dir>/compressed`` (:meth:`save_compressed`), then that folder
        is uploaded as it is to ``args.hub_model_id`` (default: the name of ``output_dir``).
        Keyword arguments: ``eval_results``, ``dataset``, ``license``, ``finetuned_from`` (the
        card's ``base_model``; default the model's ``name_or_path``), ``private``,
        ``create_pr``. ``transformers.Trainer``'s other model-card arguments (``tags``,
        ``tasks``, ``dataset_tags``, ...) do not apply to the GETA card: a warning names them,
        and the push goes on. The upload always completes before this returns (``blocking`` is
        accepted for compatibility). Rank 0 uploads; other ranks return None."""
        from .hub import upload_compressed_folder

        card = {k: kwargs.pop(k) for k in ("eval_results", "dataset", "license") if k in kwargs}
        card["base_model"] = kwargs.pop("finetuned_from", None)
        private = kwargs.pop("private", getattr(self.args, "hub_private_repo", None))
        create_pr = kwargs.pop("create_pr", False)
        if kwargs:
            logger.warning("GETATrainer.push_to_hub: ignoring %s (the GETA model card takes "
                           "eval_results, dataset, license and finetuned_from)", sorted(kwargs))
        folder = os.path.join(self.args.output_dir, "compressed")
        self.save_compressed(folder, **card)
        if not self.is_world_process_zero():
            return None
        args = self.args
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        return upload_compressed_folder(
            folder, repo_id, commit_message=commit_message or "End of training", private=private,
            token=token or getattr(args, "hub_token", None), revision=revision,
            create_pr=create_pr)

    def save_compressed(self, output_dir: Optional[str] = None,
                        eval_results: Optional[Mapping[str, float]] = None,
                        dataset: Optional[str] = None, license: Optional[str] = None,
                        base_model: Optional[str] = None):
        """Compress and write the model with :func:`geta_hf.save_compressed` (rank 0 writes);
        ``eval_results``, ``dataset``, ``license`` and ``base_model`` go to the model card.

        ``output_dir`` defaults to ``<args.output_dir>/compressed``, so the Trainer's checkpoints,
        logs and ``runs/`` beside it are never touched. Returns the compressed model."""
        output_dir = output_dir or os.path.join(self.args.output_dir, "compressed")
        small = self.compressed_model()
        if self.is_world_process_zero():
            save_compressed(small, output_dir, processing_class=self.processing_class,
                            example_inputs=self._geta_example, eval_results=eval_results,
                            geta_config=self.geta_config.to_dict(), dataset=dataset,
                            license=license, base_model=base_model)
        self.accelerator.wait_for_everyone()
        return small
